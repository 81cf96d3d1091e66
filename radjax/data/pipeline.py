"""Grain input pipeline: source -> subset -> shuffle -> shard -> repeat -> preprocess -> batch.

    it = make_loader(config.data, "train", batch_size=64, seed=0, train=True, tokenizer=tok,
                     shard_index=jax.process_index(), shard_count=jax.process_count())
    batch = next(it)           # the batch contract of contracts.md (numpy, per-process batch)
    state = it.get_state()     # JSON-serialisable; it.set_state(state) resumes exactly

Order of operations (a grain ``MapDataset``, random access all the way to the batch):
1. ``get_source`` (SynthCXR on the fly, or ArrayRecord), optionally restricted to
   ``indices`` (e.g. a label-fraction subset from radjax.data.sampling);
2. train: a global shuffle with ``seed`` (grain reshuffles every epoch);
3. per-process shard ``ds[shard_index::shard_count]`` taken *after* the global shuffle,
   so each epoch's permutation is split across processes and every example is seen
   exactly once per epoch over all processes;
4. repeat (``num_epochs``; None = forever when training, one pass otherwise);
5. decode / resize / augment / tokenize / label policy, per element; augmentation
   randomness comes from grain's ``random_map`` (deterministic in (seed, position), so
   a resumed iterator reproduces the same crops);
6. batch (``drop_remainder=train``); then ``to_iter_dataset`` and, with
   ``data_cfg.num_workers > 0``, ``mp_prefetch`` worker processes.

Augmentation (train and ``data_cfg.augment``): random resized crop (area 0.8-1, aspect
0.9-1.1), rotation within +-5 degrees, brightness/contrast jitter; never a horizontal
flip (laterality matters on a chest film: the heart is on the left).

Labels: ``data_cfg.labels`` = "diagnostic" | "prognostic" | "all" | "a,b,c". Values 1/0
are kept; NaN (missing, censored) -> label_mask 0; -1 (uncertain) follows
``data_cfg.uncertain_policy``: "ignore" (masked), "ones" or "zeros".
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from radjax.config import ConfigError
from radjax.data import sources

UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
# Fixed normalisation (not per-image: global brightness carries signal, e.g. bone density).
_NORM = {"synth_cxr": (0.44, 0.245)}  # measured over 300 SynthCXR films (64 and 224 px)
_DEFAULT_NORM = (0.5, 0.25)
# Batches each loader worker process may hold ready (grain per_worker_buffer_size).
PER_WORKER_BUFFER_BATCHES = 2


def label_names(data_cfg: Any) -> tuple[str, ...]:
  """The label names selected by ``data_cfg.labels`` (order = column order of ``labels``)."""
  spec = str(data_cfg.labels).strip()
  if spec in ("diagnostic", "prognostic", "all"):
    names = sources.dataset_label_names(data_cfg, spec)
  else:
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    known = sources.dataset_label_names(data_cfg, "all", unbuilt_ok=True)
    unknown = [n for n in names if known and n not in known]
    if unknown:
      raise ConfigError(f"data.labels: unknown label(s) {unknown} for dataset {data_cfg.dataset!r}; "
                        f"known: {', '.join(known)}")
  if not names:
    raise ConfigError(f"data.labels={data_cfg.labels!r} selects no labels")
  return tuple(names)


def image_norm(data_cfg: Any) -> tuple[float, float]:
  """(mean, std) applied to images scaled to [0, 1]."""
  return _NORM.get(data_cfg.dataset, _DEFAULT_NORM)


class SubsetSource:
  """``source`` restricted to ``indices``; elements carry their index in the full split."""

  def __init__(self, source: Any, indices: Sequence[int] | None = None):
    self._source = source
    n = len(source)
    if indices is None:
      self._indices = None
      self._len = n
    else:
      idx = np.asarray(indices, dtype=np.int64).reshape(-1)
      if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"indices must lie in [0, {n}) for this split, got [{idx.min()}, {idx.max()}]")
      self._indices = idx
      self._len = int(idx.size)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, j: int) -> dict[str, Any]:
    i = int(j) if self._indices is None else int(self._indices[int(j)])
    ex = dict(self._source[i])
    ex["index"] = i
    return ex


class Preprocess:
  """Example dict -> batch-contract element (numpy). Picklable; no config objects inside."""

  def __init__(self, data_cfg: Any, tokenizer: Any, train: bool, names: tuple[str, ...],
               attributes: Sequence[str] = ()):
    policy = str(data_cfg.uncertain_policy)
    if policy not in UNCERTAIN_POLICIES:
      raise ConfigError(f"data.uncertain_policy={policy!r}; use one of {UNCERTAIN_POLICIES}")
    self.size = int(data_cfg.image_size)
    if self.size < 8:
      raise ConfigError(f"data.image_size must be >= 8, got {self.size}")
    self.channels = int(data_cfg.channels)
    if self.channels not in (1, 3):
      raise ConfigError(f"data.channels must be 1 or 3, got {self.channels}")
    self.max_len = int(data_cfg.max_text_len)
    if self.max_len < 2:
      raise ConfigError(f"data.max_text_len must be >= 2, got {self.max_len}")
    self.augment = bool(train and data_cfg.augment)
    self.names = names
    self.attributes = tuple(attributes)
    self.policy = policy
    self.mean, self.std = image_norm(data_cfg)
    self.tokenizer = tokenizer

  # ---------------------------------------------------------------- image
  def _to_uint8_2d(self, image: Any) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3:
      img = img[..., 0] if img.shape[-1] == 1 else img.mean(-1)
    if img.dtype != np.uint8:
      img = np.clip(img, 0, 255).astype(np.uint8)
    return img

  def _geometry(self, img: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    h, w = img.shape
    s = self.size
    pil = Image.fromarray(img)
    if rng is None:
      if (h, w) != (s, s):
        pil = pil.resize((s, s), Image.BILINEAR)
      return np.asarray(pil, dtype=np.float32)
    # Random resized crop + rotation as one affine map (output pixel -> input pixel).
    area = rng.uniform(0.8, 1.0)
    ratio = math.exp(rng.uniform(math.log(0.9), math.log(1.1)))
    cw = min(1.0, math.sqrt(area * ratio)) * w
    ch = min(1.0, math.sqrt(area / ratio)) * h
    cx = rng.uniform(cw / 2, w - cw / 2)
    cy = rng.uniform(ch / 2, h - ch / 2)
    theta = math.radians(rng.uniform(-5.0, 5.0))
    sx, sy = cw / s, ch / s
    c, sn = math.cos(theta), math.sin(theta)
    # input = centre + R(theta) @ diag(sx, sy) @ (output - s/2)
    a, b = c * sx, -sn * sy
    d, e = sn * sx, c * sy
    off_x = cx - (a + b) * s / 2
    off_y = cy - (d + e) * s / 2
    if s * 2 < min(h, w):  # large downscale: pre-shrink so bilinear sampling does not alias
      f = min(h, w) / (2 * s)
      pil = pil.resize((max(1, round(w / f)), max(1, round(h / f))), Image.BILINEAR)
      a, b, d, e, off_x, off_y = a / f, b / f, d / f, e / f, off_x / f, off_y / f
    out = pil.transform((s, s), Image.AFFINE, (a, b, off_x, d, e, off_y), resample=Image.BILINEAR)
    return np.asarray(out, dtype=np.float32)

  def image(self, image: Any, rng: np.random.Generator | None) -> np.ndarray:
    """uint8 [H, W] (or [H, W, 1]) -> float32 [S, S, C], normalised."""
    x = self._geometry(self._to_uint8_2d(image), rng) * np.float32(1 / 255)
    if rng is not None:
      contrast = np.float32(rng.uniform(0.85, 1.15))
      brightness = np.float32(rng.uniform(-0.06, 0.06))
      m = np.float32(x.mean())
      x = (x - m) * contrast + m + brightness
    x = (x - np.float32(self.mean)) * np.float32(1 / self.std)
    x = x[..., None]
    if self.channels == 3:
      x = np.repeat(x, 3, axis=-1)
    return x.astype(np.float32, copy=False)

  # ---------------------------------------------------------------- labels
  def labels(self, labels: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """dict -> (labels float32 [K], label_mask float32 [K]) under the uncertainty policy."""
    y = np.zeros((len(self.names),), np.float32)
    m = np.zeros((len(self.names),), np.float32)
    for k, name in enumerate(self.names):
      v = labels.get(name, math.nan)
      v = math.nan if v is None else float(v)
      if math.isnan(v):
        continue
      if v < 0:  # uncertain
        if self.policy == "ignore":
          continue
        v = 1.0 if self.policy == "ones" else 0.0
      y[k] = 1.0 if v >= 0.5 else 0.0
      m[k] = 1.0
    return y, m

  def __call__(self, ex: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    ids, mask = self.tokenizer.encode(ex["report"], self.max_len)
    y, m = self.labels(ex["labels"])
    out = {
        "image": self.image(ex["image"], rng if self.augment else None),
        "text_ids": ids,
        "text_mask": mask,
        "labels": y,
        "label_mask": m,
        "index": np.int32(ex["index"]),
    }
    if self.attributes:  # text, so only where asked: a training step takes arrays of numbers
      out["attributes"] = np.array([ex["attributes"].get(n, "") for n in self.attributes], dtype=str)
    return out


class _RandomPreprocess(grain.transforms.RandomMap):
  def __init__(self, fn: Preprocess):
    self.fn = fn

  def random_map(self, element, rng: np.random.Generator):
    return self.fn(element, rng)


class _PlainPreprocess(grain.transforms.Map):
  def __init__(self, fn: Preprocess):
    self.fn = fn

  def map(self, element):
    return self.fn(element, None)


def make_dataset(data_cfg: Any, split: str, *, batch_size: int, seed: int, train: bool, tokenizer: Any,
                 shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None,
                 indices: Sequence[int] | None = None, attributes: Sequence[str] = ()) -> grain.MapDataset:
  """The batched ``grain.MapDataset`` behind ``make_loader`` (random access to batches)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  if tokenizer is None:
    from radjax.data.tokenizer import get_tokenizer  # pylint: disable=import-outside-toplevel
    tokenizer = get_tokenizer(data_cfg)
  names = label_names(data_cfg)
  fn = Preprocess(data_cfg, tokenizer, train, names, attributes)
  source = SubsetSource(sources.get_source(data_cfg, split), indices)
  if len(source) == 0:
    raise ValueError(f"split {split!r} of {data_cfg.dataset!r} is empty" + (" after `indices`" if indices is not None else ""))
  ds = grain.MapDataset.source(source)
  if train:
    ds = ds.shuffle(seed=int(seed) % 2**32)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  if len(ds) == 0:
    raise ValueError(f"shard {shard_index}/{shard_count} of split {split!r} is empty ({len(source)} examples)")
  epochs = num_epochs if num_epochs is not None else (None if train else 1)
  if epochs != 1:
    ds = ds.repeat(epochs)
  if fn.augment:
    ds = ds.random_map(_RandomPreprocess(fn), seed=(int(seed) * 7919 + 17) % 2**32)
  else:
    ds = ds.map(_PlainPreprocess(fn))
  return ds.batch(batch_size, drop_remainder=train)


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags (e.g. grain_enable_multiprocess_worker_profiling),
  # which raise UnparsedFlagAccessError unless the program went through absl.app.run.
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_loader(data_cfg: Any, split: str, *, batch_size: int, seed: int, train: bool, tokenizer: Any,
                shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None,
                indices: Sequence[int] | None = None, attributes: Sequence[str] = ()) -> grain.DatasetIterator:
  """Iterator of batches (dicts of numpy arrays, leading dim ``batch_size``; see contracts.md).

  train: shuffle + augmentation + drop_remainder. num_epochs: None = forever when training,
  one pass otherwise. indices: restrict to these example indices of the split. attributes: names
  of the examples' attributes to add as ``attributes`` str [B, len(attributes)] ("" where blank).
  The returned iterator has ``get_state()`` / ``set_state(state)`` (JSON-serialisable).
  """
  ds = make_dataset(data_cfg, split, batch_size=batch_size, seed=seed, train=train, tokenizer=tokenizer,
                    shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs, indices=indices,
                    attributes=attributes)
  workers = int(data_cfg.num_workers)
  if workers < 0:
    raise ConfigError(f"data.num_workers must be >= 0, got {workers}")
  # Element-level prefetch threads only help while the GIL is released (PIL, tokenizers);
  # numpy-heavy SynthCXR rendering scales with worker processes instead.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2 if workers == 0 else 1, prefetch_buffer_size=4))
  if workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=PER_WORKER_BUFFER_BATCHES))
  return iter(it_ds)
