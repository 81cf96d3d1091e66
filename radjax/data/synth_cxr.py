"""SynthCXR: a seeded structural causal model of chest radiographs, reports and outcomes.

Every example is a function of ``(seed, split, index)`` only: three independent
``np.random.Generator(PCG64)`` streams seeded from ``SeedSequence([seed, split_id,
index, stream])`` drive (1) the patient and study ("case"), (2) the rendering and
(3) the report wording, so examples are random-access and byte-identical across
processes, and changing the report templates never changes an image.

Causal structure (all latents are unit-variance linear combinations of independent
standard normals, so finding/outcome prevalences are exact via Gaussian thresholds):

  age, severity, cardiac, infection ──> 8 findings ──> image + report (with radiologist error)
  age ──> calcification, bone density   (rendered; reported only with report_image_evidence > 0)
  habitus                               (rendered as body width / soft tissue; likewise)
  hidden risk h1, h2                    (neither shown nor reported)
  severity, age, calcification, bone, habitus, h1, h2 ──> readmission_12m, mortality_12m

The report's prognostic content is a set of clinical-history phrases whose
correlation with the outcome's risk signal is ``sqrt(text_label_association)``
(the phrase frequencies do not depend on the knob, only their fidelity), plus,
with probability ``text_leak``, a statement that nearly determines the outcome. With
probability ``report_image_evidence`` the radiologist also remarks on each notable film feature
that drives the outcomes and that the default reports leave out: aortic calcification,
osteopenia, body habitus (read from the same latents the renderer draws).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import numpy as np
from scipy import special

from radjax.config import ConfigError
from radjax.data import attributes

FINDINGS = ("cardiomegaly", "pleural_effusion", "pneumothorax", "consolidation", "edema",
            "atelectasis", "nodule", "support_device")
DIAGNOSTIC_LABELS = FINDINGS
PROGNOSTIC_LABELS = ("readmission_12m", "mortality_12m")
ALL_LABELS = DIAGNOSTIC_LABELS + PROGNOSTIC_LABELS
# What an example records about its film and patient, beside the labels, for subgroup evaluation.
ATTRIBUTES = ("view", "sex", "age")
SPLITS = ("pretrain", "train", "validation", "test")
_SPLIT_ID = {s: k for k, s in enumerate(SPLITS)}

DEFAULT_PREVALENCE = {
    "cardiomegaly": 0.25, "pleural_effusion": 0.22, "pneumothorax": 0.10, "consolidation": 0.18,
    "edema": 0.18, "atelectasis": 0.22, "nodule": 0.12, "support_device": 0.25,
    "readmission_12m": 0.25, "mortality_12m": 0.15,
}

# Latents as loadings on independent standard normals; each row has unit norm.
_BASE = ("sev", "age", "card", "inf", "hab", "bone", "calc", "h1", "h2")
_LATENTS = {
    "sev": {"sev": 1.0},
    "age": {"age": 1.0},
    "cardiac": {"age": 0.3, "sev": 0.3, "card": math.sqrt(1 - 0.18)},
    "infection": {"sev": 0.3, "inf": math.sqrt(1 - 0.09)},
    "habitus": {"hab": 1.0},
    "bone": {"age": -0.5, "bone": math.sqrt(0.75)},
    "calc": {"age": 0.55, "calc": math.sqrt(1 - 0.3025)},
    "h1": {"h1": 1.0},
    "h2": {"h2": 1.0},
}
# Finding liabilities: loadings on latents (a unit-variance residual makes up the rest).
_FINDING_LOADINGS = {
    "cardiomegaly": {"cardiac": 0.8},
    "pleural_effusion": {"cardiac": 0.55, "sev": 0.15},
    "pneumothorax": {"sev": 0.15},
    "consolidation": {"infection": 0.75},
    "edema": {"cardiac": 0.65, "sev": 0.1},
    "atelectasis": {"infection": 0.45, "sev": 0.1},
    "nodule": {"age": 0.3},
    "support_device": {"sev": 0.4},
}
# Outcome risk signals (normalised to unit variance) and the share of outcome variance they explain.
_OUTCOME_WEIGHTS = {
    "readmission_12m": {"sev": 0.3, "age": 0.15, "calc": 0.35, "bone": -0.3, "habitus": 0.45,
                        "h2": 0.6, "h1": 0.2},
    "mortality_12m": {"sev": 0.3, "age": 0.3, "calc": 0.5, "bone": -0.45, "habitus": -0.35,
                      "h1": 0.6},
}
_OUTCOME_SIGNAL_R2 = 0.75

_SIDES = ("right", "left", "bilateral")


def _level(x: float, at: float = 1.0, strong: float = 1.8) -> int:
  """0 unremarkable, 1 notable (x > at, ~16 %), 2 marked (x > strong, ~4 %)."""
  return 2 if x > strong else 1 if x > at else 0


# Film features the outcomes depend on and a report may remark on (report_image_evidence):
# name -> (latent, its level). Habitus is notable either way: -1 thin, 1 large.
_EVIDENCE_LEVELS = {
    "aortic_calcification": ("calc", _level),
    "osteopenia": ("bone", lambda x: _level(-x)),
    "habitus": ("habitus", lambda x: 1 if x > 1.0 else -1 if x < -1.0 else 0),
}


def label_names(kind: str = "all") -> tuple[str, ...]:
  """Label names of SynthCXR: ``kind`` in {"diagnostic", "prognostic", "all"}."""
  if kind == "diagnostic":
    return DIAGNOSTIC_LABELS
  if kind == "prognostic":
    return PROGNOSTIC_LABELS
  if kind == "all":
    return ALL_LABELS
  raise ValueError(f"unknown label kind {kind!r}; use 'diagnostic', 'prognostic' or 'all'")


def _vec(loadings: Mapping[str, float]) -> np.ndarray:
  """Latent-space loadings -> loadings on the independent base normals [len(_BASE)]."""
  v = np.zeros(len(_BASE))
  for name, w in loadings.items():
    for base, a in _LATENTS[name].items():
      v[_BASE.index(base)] += w * a
  return v


_LATENT_MAT = np.stack([_vec({k: 1.0}) for k in _LATENTS])  # [n_latents, n_base]
_FINDING_MAT = np.stack([_vec(_FINDING_LOADINGS[f]) for f in FINDINGS])  # [8, n_base]
_FINDING_RESID = np.sqrt(1.0 - np.sum(_FINDING_MAT ** 2, axis=1))  # [8]
assert np.all(np.sum(_FINDING_MAT ** 2, axis=1) < 1)
_OUTCOME_MAT = np.stack([_vec(_OUTCOME_WEIGHTS[o]) for o in PROGNOSTIC_LABELS])
_OUTCOME_MAT /= np.linalg.norm(_OUTCOME_MAT, axis=1, keepdims=True)  # unit-variance risk signal


@dataclasses.dataclass(frozen=True)
class SynthParams:
  """Validated SynthCXR knobs (see radjax.defaults.synth_cxr_config)."""
  seed: int = 0
  image_size: int = 64
  n_pretrain: int = 4000
  n_train: int = 2000
  n_validation: int = 500
  n_test: int = 1000
  text_label_association: float = 0.0
  text_leak: float = 0.0
  report_error_rate: float = 0.05
  report_image_evidence: float = 0.0
  prevalence: tuple[tuple[str, float], ...] = ()

  @classmethod
  def from_config(cls, cfg: Any = None, prefix: str = "synth") -> SynthParams:
    """Validates a config (ConfigDict, mapping or SynthParams) before any work is done.

    Raises ValueError naming the offending key, e.g. ``synth.prevalence.nodule``.
    """
    if cfg is None:
      return cls()
    if isinstance(cfg, SynthParams):
      return cfg
    get = (lambda k, d: cfg.get(k, d)) if hasattr(cfg, "get") else (lambda k, d: getattr(cfg, k, d))
    defaults = cls()
    vals = {}
    for f in ("seed", "image_size", "n_pretrain", "n_train", "n_validation", "n_test"):
      v = get(f, getattr(defaults, f))
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ConfigError(f"{prefix}.{f} must be an integer, got {v!r}")
      vals[f] = int(v)
    if vals["seed"] < 0:
      raise ConfigError(f"{prefix}.seed must be >= 0, got {vals['seed']}")
    if not 32 <= vals["image_size"] <= 512:
      raise ConfigError(f"{prefix}.image_size must be in [32, 512], got {vals['image_size']}")
    for f in ("n_pretrain", "n_train", "n_validation", "n_test"):
      if vals[f] < 0:
        raise ConfigError(f"{prefix}.{f} must be >= 0, got {vals[f]}")
    for f in ("text_label_association", "text_leak", "report_error_rate", "report_image_evidence"):
      v = get(f, getattr(defaults, f))
      try:
        v = float(v)
      except (TypeError, ValueError):
        raise ConfigError(f"{prefix}.{f} must be a number in [0, 1], got {v!r}") from None
      if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{prefix}.{f} must be in [0, 1], got {v}")
      vals[f] = v
    prev = get("prevalence", None) or {}
    items = prev.items() if hasattr(prev, "items") else prev
    checked = []
    for name, p in sorted(dict(items).items()):
      if name not in DEFAULT_PREVALENCE:
        raise ConfigError(f"{prefix}.prevalence.{name}: unknown label {name!r}; known: "
                          f"{', '.join(DEFAULT_PREVALENCE)}")
      try:
        p = float(p)
      except (TypeError, ValueError):
        raise ConfigError(f"{prefix}.prevalence.{name} must be a probability, got {p!r}") from None
      if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{prefix}.prevalence.{name} must be in [0, 1], got {p}")
      checked.append((name, p))
    vals["prevalence"] = tuple(checked)
    return cls(**vals)

  def prevalences(self) -> dict[str, float]:
    out = dict(DEFAULT_PREVALENCE)
    out.update(dict(self.prevalence))
    return out

  def num_examples(self, split: str) -> int:
    if split not in _SPLIT_ID:
      raise ConfigError(f"unknown split {split!r}; SynthCXR splits: {', '.join(SPLITS)}")
    return getattr(self, f"n_{split}")


def _threshold(p: float) -> float:
  """z such that P(N(0,1) > z) = p."""
  if p <= 0:
    return np.inf
  if p >= 1:
    return -np.inf
  return float(special.ndtri(1.0 - p))


@dataclasses.dataclass
class Case:
  """Everything the image, report and labels of one study share (no pixels, no words)."""
  age: float
  sex: str
  latents: dict[str, float]        # sev, age, cardiac, infection, habitus, bone, calc, h1, h2
  findings: np.ndarray             # float32 [8] 0/1 (ground truth = diagnostic labels)
  grade: np.ndarray                # float [8] in [0,1]: extent among positives
  visibility: np.ndarray           # float [8] in [0.15,1]: how conspicuous on the film
  side: np.ndarray                 # int [8]: 0 right, 1 left, 2 bilateral
  pos: np.ndarray                  # float [8, 2] in [0,1]: where in the lung
  devices: tuple[str, ...]         # subset of ett, ng, cvc, leads, pacer
  view: str                        # "PA" or "AP"
  rotation: float                  # degrees
  shift: tuple[float, float]
  zoom: float
  exposure: float
  contrast: float
  noise: float
  reported: np.ndarray             # int [8]: 1 if the report calls it present
  hedged: np.ndarray               # bool [8]: reported with hedging
  text_levels: dict[str, int]      # outcome -> -1 reassuring, 0 none, 1 mild, 2 strong phrase
  leaks: dict[str, int]            # outcome -> -1 none, else the outcome value the leak states
  comparison: bool
  evidence: dict[str, int]         # film feature -> level the report states (0 = not mentioned)
  outcomes: dict[str, float]       # readmission_12m, mortality_12m (0/1)

  def labels(self) -> dict[str, float]:
    out = {f: float(self.findings[k]) for k, f in enumerate(FINDINGS)}
    out.update(self.outcomes)
    return out


class SynthCXR:
  """Random-access SynthCXR: ``example(split, i)`` -> dict(image uint8 [S,S], report, labels, id)."""

  def __init__(self, cfg: Any = None):
    self.params = SynthParams.from_config(cfg)
    prev = self.params.prevalences()
    self._thr_find = np.array([_threshold(prev[f]) for f in FINDINGS])
    self._thr_out = np.array([_threshold(prev[o]) for o in PROGNOSTIC_LABELS])
    self._size = self.params.image_size

  # ---------------------------------------------------------------- randomness
  def _rng(self, split: str, i: int, stream: int) -> np.random.Generator:
    n = self.params.num_examples(split)
    if not 0 <= i < n:
      raise IndexError(f"SynthCXR {split} index {i} out of range [0, {n})")
    ss = np.random.SeedSequence([self.params.seed, _SPLIT_ID[split], int(i), stream])
    return np.random.Generator(np.random.PCG64(ss))

  def num_examples(self, split: str) -> int:
    return self.params.num_examples(split)

  # ---------------------------------------------------------------- case
  def case(self, split: str, i: int) -> Case:
    """Samples the study: latents, findings, acquisition and what the report will say."""
    rng = self._rng(split, i, 0)
    p = self.params
    # Fixed draw order: every example consumes the same random numbers whatever its branch.
    e = rng.standard_normal(len(_BASE))
    e_find = rng.standard_normal(len(FINDINGS))
    e_out = rng.standard_normal(len(PROGNOSTIC_LABELS))
    e_text = rng.standard_normal(len(PROGNOSTIC_LABELS))
    u = rng.random(64)

    lat = dict(zip(_LATENTS, _LATENT_MAT @ e))
    z_find = _FINDING_MAT @ e + _FINDING_RESID * e_find
    findings = (z_find > self._thr_find).astype(np.float32)
    # Conditional quantile among positives: uniform extent in [0, 1].
    thr_cdf = special.ndtr(self._thr_find)
    grade = np.clip((special.ndtr(z_find) - thr_cdf) / np.maximum(1 - thr_cdf, 1e-9), 0, 1)
    grade = np.where(findings > 0, grade, 0.0)
    # Per-example conspicuity: mostly clear, a sizeable minority subtle.
    visibility = 0.15 + 0.85 * u[0:8] ** 0.6
    side = np.where(u[8:16] < 0.45, 0, np.where(u[8:16] < 0.85, 1, 2))
    side[FINDINGS.index("edema")] = 2
    side[FINDINGS.index("pneumothorax")] = np.where(u[8] < 0.5, 0, 1)
    side[FINDINGS.index("nodule")] = np.where(u[9] < 0.5, 0, 1)
    side[FINDINGS.index("cardiomegaly")] = 2
    side[FINDINGS.index("support_device")] = 2
    pos = u[16:32].reshape(8, 2)

    sev = lat["sev"]
    dev_u = u[32:37]
    devices = tuple(d for d, q in zip(("ett", "ng", "cvc", "leads", "pacer"), (0.55, 0.45, 0.5, 0.6, 0.15))
                    if dev_u[("ett", "ng", "cvc", "leads", "pacer").index(d)] < q)
    if findings[FINDINGS.index("support_device")] and not devices:
      devices = (("ett", "cvc", "leads", "ng")[int(u[37] * 4)],)
    if not findings[FINDINGS.index("support_device")]:
      devices = ()
    # Portable AP films are a little more likely in sicker patients (a realistic, mild shortcut).
    view = "AP" if u[38] < special.expit(0.4 * sev - 0.9 + 1.5 * findings[FINDINGS.index("support_device")]) else "PA"
    rot_scale = 5.0 if view == "AP" else 2.5
    rotation = float((u[39] * 2 - 1) * rot_scale)
    shift = (float((u[40] * 2 - 1) * 0.04), float((u[41] * 2 - 1) * 0.04))
    zoom = float(0.93 + 0.12 * u[42])
    exposure = float((u[43] * 2 - 1) * 0.08)
    contrast = float(0.85 + 0.3 * u[44])
    noise = float((0.012 + 0.02 * u[45]) * (1.6 if view == "AP" else 1.0))

    # Radiologist error: each finding is missed / hallucinated with the configured rate.
    err = u[46:54] < p.report_error_rate
    reported = np.where(err, 1 - findings, findings).astype(np.int64)
    hallucinated = (reported == 1) & (findings == 0)
    hedged = (reported == 1) & ((visibility < 0.45) | hallucinated) & (u[54:62] < 0.85)

    # Outcomes: risk signal (unit variance) plus noise, thresholded at the prevalence.
    signal = _OUTCOME_MAT @ e  # [2]
    z_out = math.sqrt(_OUTCOME_SIGNAL_R2) * signal + math.sqrt(1 - _OUTCOME_SIGNAL_R2) * e_out
    outcomes = {o: float(z_out[k] > self._thr_out[k]) for k, o in enumerate(PROGNOSTIC_LABELS)}
    # Text channel: phrase level from a noisy copy of the risk signal; only fidelity depends on the knob.
    a = p.text_label_association
    m = math.sqrt(a) * signal + math.sqrt(1 - a) * e_text
    text_levels = {o: int(2 if m[k] > 1.0 else 1 if m[k] > 0.35 else -1 if m[k] < -1.0 else 0)
                   for k, o in enumerate(PROGNOSTIC_LABELS)}
    u2 = rng.random(4)
    leaks = {}
    for k, o in enumerate(PROGNOSTIC_LABELS):
      if u2[2 * k] < p.text_leak:
        truth = int(outcomes[o])
        leaks[o] = truth if u2[2 * k + 1] < 0.95 else 1 - truth
      else:
        leaks[o] = -1
    comparison = bool(u[62] < 0.4)
    # Drawn last, so that the knob changes no other part of the case.
    u3 = rng.random(len(_EVIDENCE_LEVELS))
    evidence = {name: level(lat[latent]) if u3[k] < p.report_image_evidence else 0
                for k, (name, (latent, level)) in enumerate(_EVIDENCE_LEVELS.items())}
    age = float(np.clip(62 + 15 * lat["age"], 18, 98))
    sex = "F" if u[63] < 0.5 else "M"
    return Case(age=age, sex=sex, latents={k: float(v) for k, v in lat.items()}, findings=findings,
                grade=grade, visibility=visibility, side=side, pos=pos, devices=devices, view=view,
                rotation=rotation, shift=shift, zoom=zoom, exposure=exposure, contrast=contrast,
                noise=noise, reported=reported, hedged=hedged, text_levels=text_levels, leaks=leaks,
                comparison=comparison, evidence=evidence, outcomes=outcomes)

  # ---------------------------------------------------------------- public API
  def labels(self, split: str, i: int) -> dict[str, float]:
    return self.case(split, i).labels()

  def labels_array(self, split: str, names: tuple[str, ...] = ALL_LABELS,
                   n: int | None = None) -> np.ndarray:
    """float32 [N, K] labels of the first ``n`` examples of ``split`` without rendering."""
    n = self.num_examples(split) if n is None else min(n, self.num_examples(split))
    out = np.zeros((n, len(names)), np.float32)
    for i in range(n):
      lab = self.labels(split, i)
      out[i] = [lab[k] for k in names]
    return out

  def report(self, split: str, i: int) -> str:
    """The report of example ``i`` without rendering its image (fast; for tokenizer training)."""
    return write_report(self.case(split, i), self._rng(split, i, 2))

  def image(self, split: str, i: int) -> np.ndarray:
    """uint8 [S, S] image of example ``i``."""
    return render(self.case(split, i), self._rng(split, i, 1), self._size)

  def example(self, split: str, i: int) -> dict[str, Any]:
    """dict(image uint8 [S, S], report str, labels dict name -> float, id str, attributes dict
    name -> str: ``ATTRIBUTES``, the view (PA/AP), sex (F/M) and ``attributes.age_band``)."""
    case = self.case(split, i)
    return {
        "image": render(case, self._rng(split, i, 1), self._size),
        "report": write_report(case, self._rng(split, i, 2)),
        "labels": case.labels(),
        "id": f"synth-{split}-{i:07d}",
        "attributes": {"view": case.view, "sex": case.sex, "age": attributes.age_band(case.age)},
    }

  def source(self, split: str) -> SynthCXRSource:
    return SynthCXRSource(self.params, split)


class SynthCXRSource:
  """grain RandomAccessDataSource over one split: ``len`` and ``[i]`` -> example dict. Picklable."""

  def __init__(self, params: SynthParams, split: str):
    self._params = params
    self._split = split
    self._len = params.num_examples(split)

  @functools.cached_property
  def _synth(self) -> SynthCXR:
    return SynthCXR(self._params)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self._synth.example(self._split, int(i))

  def report(self, i: int) -> str:
    """Example ``i``'s report without rendering its image."""
    return self._synth.report(self._split, int(i))

  def __getstate__(self):
    return {"_params": self._params, "_split": self._split, "_len": self._len}

  def __repr__(self) -> str:
    return f"SynthCXRSource(split={self._split!r}, n={self._len}, image_size={self._params.image_size})"


# ==================================================================== rendering
# Patient coordinates (u, v) in [-1, 1]: u to the image right (= patient's left), v down.
# The image is an attenuation map built from soft-edged analytic shapes, evaluated on
# windows around each structure so a 224 px film costs a few milliseconds.

_F = np.float32


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  lin = np.linspace(-1.0, 1.0, size, dtype=_F)
  return np.meshgrid(lin, lin, indexing="xy")  # X [S,S] varies along columns, Y along rows


@functools.lru_cache(maxsize=16)
def _interp_weights(size: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Linear interpolation from a k-point grid to ``size`` points: (lo, hi, w) each [size]."""
  t = np.linspace(0, k - 1, size)
  lo = np.clip(np.floor(t).astype(np.int64), 0, k - 2)
  return lo, lo + 1, (t - lo).astype(_F)


def _smooth_noise(rng: np.random.Generator, size: int, k: int) -> np.ndarray:
  """Smooth random field [size, size], roughly unit variance, correlation length ~ size / k."""
  # Separable linear interpolation by indexing: no BLAS (thread wake-ups cost milliseconds on
  # a busy machine) and no PIL filter setup.
  lo, hi, w = _interp_weights(size, k)
  g = rng.standard_normal((k, k)).astype(_F)
  rows = g[lo] + (g[hi] - g[lo]) * w[:, None]  # [size, k]
  return rows[:, lo] + (rows[:, hi] - rows[:, lo]) * w[None, :]


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
  """A fixed [2*size, 2*size] standard-normal field; films take random windows of it."""
  # Drawing size**2 normals per film would be the single largest cost of rendering.
  return np.random.Generator(np.random.PCG64(20251123)).standard_normal((2 * size, 2 * size), dtype=_F)


_ANAT_DY = 0.1  # anatomy sits a little below the image centre (neck and shoulders on top)


class _Canvas:
  """Attenuation map plus the patient-coordinate transform of one film."""

  def __init__(self, size: int, case: Case):
    self.size = size
    x, y = _grid(size)
    th = math.radians(case.rotation)
    self.c, self.s = math.cos(th), math.sin(th)
    self.dx, self.dy = case.shift
    self.zoom = case.zoom
    xs, ys = x - _F(self.dx), y - _F(self.dy)
    inv = _F(1.0 / self.zoom)
    self.u = (_F(self.c) * xs + _F(self.s) * ys) * inv
    self.v = (_F(-self.s) * xs + _F(self.c) * ys) * inv - _F(_ANAT_DY)
    self.a = np.zeros((size, size), _F)
    self.px = 2.0 / (size - 1) / self.zoom  # one pixel in patient units

  def to_pixels(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = v + _ANAT_DY
    x = self.zoom * (self.c * u - self.s * v) + self.dx
    y = self.zoom * (self.s * u + self.c * v) + self.dy
    return (y + 1) * 0.5 * (self.size - 1), (x + 1) * 0.5 * (self.size - 1)

  def window(self, u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice]:
    """Pixel slices covering the patient-coordinate box (with a small margin)."""
    r, c = self.to_pixels(np.array([u0, u0, u1, u1]), np.array([v0, v1, v0, v1]))
    n = self.size
    r0, r1 = int(max(0, math.floor(r.min()) - 2)), int(min(n, math.ceil(r.max()) + 3))
    c0, c1 = int(max(0, math.floor(c.min()) - 2)), int(min(n, math.ceil(c.max()) + 3))
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

  def splat(self, overlay: np.ndarray, u: np.ndarray, v: np.ndarray, value: float, width: int):
    """Draws the polyline through (u, v) (dense points) into ``overlay`` with a square pen."""
    r, c = self.to_pixels(u, v)
    r = np.round(r).astype(np.int64)
    c = np.round(c).astype(np.int64)
    n = self.size
    for dr in range(-(width // 2), width - width // 2):
      for dc in range(-(width // 2), width - width // 2):
        rr, cc = r + dr, c + dc
        ok = (rr >= 0) & (rr < n) & (cc >= 0) & (cc < n)
        overlay[rr[ok], cc[ok]] = np.maximum(overlay[rr[ok], cc[ok]], value)


def _soft(x: np.ndarray, width: float) -> np.ndarray:
  """0 -> 1 ramp of ``x`` over ``width`` (soft edge of a region x > 0)."""
  return np.clip(x * _F(1.0 / width) + _F(0.5), 0, 1)


def _bezier(p0, p1, p2, n: int) -> tuple[np.ndarray, np.ndarray]:
  t = np.linspace(0, 1, n)[:, None]
  pts = (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t ** 2 * np.asarray(p2)
  return pts[:, 0], pts[:, 1]


def render(case: Case, rng: np.random.Generator, size: int) -> np.ndarray:
  """Renders the film of ``case``: uint8 [size, size].

  Attenuation model: soft tissue and bone add attenuation, lung air removes it in
  proportion to the air fraction left after opacities inside the lung (heart, fluid,
  consolidation, edema, atelectasis) take their share, so overlapping findings never
  saturate; the film response is ``1 - exp(-k * attenuation)``.
  """
  cv = _Canvas(size, case)
  u, v, a = cv.u, cv.v, cv.a
  lat = case.latents
  # Python floats throughout: a numpy float64 scalar would silently promote float32 arrays.
  f = dict(zip(FINDINGS, case.findings.tolist()))
  g = dict(zip(FINDINGS, case.grade.tolist()))
  vis = {k: 0.2 + 0.8 * x for k, x in zip(FINDINGS, case.visibility.tolist())}
  side = dict(zip(FINDINGS, case.side.tolist()))
  pos = dict(zip(FINDINGS, case.pos.tolist()))
  ap = case.view == "AP"
  # Unreported, prognostic image features.
  habitus = float(np.clip(lat["habitus"], -2.5, 2.5))
  bone = float(np.clip(1.0 + 0.4 * lat["bone"], 0.2, 2.0))
  calc = float(np.clip(0.5 * (lat["calc"] + 0.7), 0.0, 1.8))
  r_vis = rng.random(16).tolist()
  tex_coarse = _smooth_noise(rng, size, 6)
  tex_fine = _smooth_noise(rng, size, max(10, min(28, size // 8)))
  phases = (rng.random(8) * 2 * np.pi).tolist()
  noise_off = rng.integers(0, size, 2).tolist()
  opac = np.zeros_like(a)  # fraction of lung air displaced, 0..1

  # --- body: neck, rounded shoulders, chest wall; habitus sets width and soft-tissue thickness.
  wb = float(np.clip(0.87 + 0.07 * habitus, 0.75, 1.02))
  au = np.abs(u)
  sh = np.clip((v + _F(1.02)) * _F(1 / 0.3), 0, 1)
  w = _F(0.24) + _F(1.25 - 0.24) * np.sqrt(sh * (2 - sh))  # neck -> rounded shoulders
  w = np.minimum(w, _F(wb) + _F(0.3) * np.clip(_F(-0.35) - v, 0, 1) ** 2 * _F(4))  # arms -> chest wall
  body = _soft(w - au, 0.06)
  thick = np.sqrt(np.clip(1 - (u / w) ** 2, 0, 1))
  a += body * (_F(0.22) + _F(0.22) * thick) * _F(np.clip(1 + 0.15 * habitus, 0.6, 1.5))

  # --- heart and aortic knob displace air; cardiomegaly widens the cardiac silhouette.
  if f["cardiomegaly"]:
    ctr = 0.47 + (0.02 + 0.15 * g["cardiomegaly"]) * vis["cardiomegaly"]
  else:
    ctr = 0.36 + 0.13 * r_vis[0]  # normal range overlaps mild cardiomegaly, as in real films
  hw = ctr * 0.7 * (1.07 if ap else 1.0)  # half the transverse cardiac diameter
  hxc = 0.11 + 0.45 * (hw - 0.3)
  hh = 0.3 + 0.15 * (hw - 0.3)
  hyc = 0.32 - (0.05 if ap else 0.0)
  rs, cs = cv.window(hxc - hw - 0.08, hxc + hw + 0.08, hyc - hh - 0.08, hyc + hh + 0.05)
  uu, vv = u[rs, cs], v[rs, cs]
  t = np.clip((vv - _F(hyc - hh)) * _F(1 / (1.4 * hh)), 0, 1)
  wv = _F(hw) * (_F(0.62) + _F(0.38) * np.sqrt(t))
  du = uu - _F(hxc) - _F(0.12 * hw) * t
  opac[rs, cs] += _soft(1 - (du / wv) ** 2 - ((vv - _F(hyc)) * _F(1 / hh)) ** 2, 0.2)
  kx, ky, kr = 0.08, -0.38, 0.085
  rs, cs = cv.window(kx - kr - 0.02, kx + kr + 0.02, ky - kr - 0.02, 0.3)
  uu, vv = u[rs, cs], v[rs, cs]
  dk = np.sqrt((uu - _F(kx)) ** 2 + (vv - _F(ky)) ** 2)
  opac[rs, cs] += _soft(_F(kr) - dk, 0.03)
  if calc > 0:  # calcification of the knob and descending aorta (never reported)
    rim = (_soft(_F(0.011) - np.abs(dk - _F(kr - 0.013)), 0.01)
           * _soft((uu - _F(kx)) * _F(0.8) - (vv - _F(ky)), 0.04))
    wall = _soft(_F(0.009) - np.abs(uu - _F(0.15) + _F(0.06) * vv), 0.01) * _soft(_F(0.2) - vv, 0.05)
    dots = np.clip(np.cos(_F(2 * np.pi / 0.09) * vv + phases[4]) * _F(3) - _F(2), 0, 1)
    a[rs, cs] += _F(0.22 * calc) * (rim + wall * dots * (vv > _F(ky)))

  # --- lungs, per hemithorax: masks, vessels, findings.
  hemis = []
  for s, sgn in ((0, -1.0), (1, 1.0)):
    apex = -0.8 + (0.05 if ap else 0.0)
    d0 = (0.40 if s == 0 else 0.45) - (0.07 if ap else 0.0)
    if f["atelectasis"] and side["atelectasis"] in (s, 2):
      d0 -= 0.07 * g["atelectasis"] * vis["atelectasis"]
    rs, cs = cv.window(min(0.0, sgn * 0.85), max(0.0, sgn * 0.85), -0.9, 0.72)
    uu, vv = u[rs, cs], v[rs, cs]
    lt = uu * _F(sgn)  # distance from the midline, towards this side
    p = np.clip(vv - _F(apex), 0, 1)
    lat_edge = _F(0.1) + _F(0.62) * np.sqrt(1 - (1 - p) ** 2)
    dome = _F(d0) + _F(0.12) * ((lt - _F(0.38)) * _F(1 / 0.3)) ** 2
    med = _F(0.14) - _F(0.05) * np.clip(vv + _F(0.3), 0, 1)
    lung = (_soft(lat_edge - lt, 0.035) * _soft(lt - med, 0.03) * _soft(dome - vv, 0.025)
            * _soft(vv - _F(apex), 0.05))
    op = opac[rs, cs]
    tex = tex_coarse[rs, cs]
    inner = None
    if f["pneumothorax"] and side["pneumothorax"] == s:
      # The visceral pleura retracts from the apex and lateral wall: beyond it, no vessels.
      c = 0.09 + 0.3 * g["pneumothorax"] * vis["pneumothorax"]
      gap = (lat_edge - lt) + (vv - _F(apex)) * _F(0.5)
      inner = _soft(gap - _F(c), 0.015)
      line = np.clip(1 - np.abs(gap - _F(c)) * _F(1 / max(0.01, 1.0 * cv.px)), 0, 1)
      a[rs, cs] += _F(0.2 * vis["pneumothorax"]) * line * lung - _F(0.1 * vis["pneumothorax"]) * lung * (1 - inner)
      op += _F(0.15 * vis["pneumothorax"]) * inner  # the collapsed lung is a little denser
    if f["pleural_effusion"] and side["pleural_effusion"] in (s, 2):
      # Dependent fluid with a meniscus rising laterally: blunts the costophrenic angle and
      # hides the hemidiaphragm (silhouette sign).
      e = 0.12 + 0.88 * g["pleural_effusion"]
      lat_q = np.clip((lt - _F(0.12)) * _F(1 / 0.6), 0, 1)
      v_top = _F(d0 + 0.08 - 0.5 * e) - _F(0.22) * lat_q ** 2
      op += _F(0.95 * vis["pleural_effusion"]) * _soft(vv - v_top, 0.15)
    if f["consolidation"] and side["consolidation"] in (s, 2):
      p0, p1 = pos["consolidation"]
      bx, by = sgn * (0.25 + 0.28 * p0), -0.35 + 0.65 * p1
      r = 0.11 + 0.1 * g["consolidation"]
      d2 = ((uu - _F(bx)) ** 2 + (vv - _F(by)) ** 2) * _F(1 / (r * r))
      fluff = np.clip(_F(1.1) + _F(0.6) * tex_fine[rs, cs] + _F(0.5) * tex - d2, 0, 1)
      op += _F(0.85 * vis["consolidation"]) * fluff
    if f["edema"]:
      hx, hy = sgn * 0.2, -0.05
      sig = 0.2 + 0.12 * g["edema"]
      peri = np.exp(-((uu - _F(hx)) ** 2 + (vv - _F(hy)) ** 2) * _F(1 / (2 * sig * sig)))
      amp = vis["edema"] * (0.5 + 0.5 * g["edema"])
      op += _F(0.4 * amp) * peri * (_F(1) + _F(0.3) * tex) + _F(0.04 * amp)
      kerley = np.clip(np.cos(_F(2 * np.pi / 0.04) * vv) * _F(4) - _F(3), 0, 1)
      op += _F(0.3 * amp) * kerley * _soft(lt - lat_edge + _F(0.12), 0.04) * _soft(vv - _F(0.05), 0.1)
    if f["atelectasis"] and side["atelectasis"] in (s, 2):
      p0, p1 = pos["atelectasis"]
      # Plate-like (discoid) atelectasis: a thin, slightly curved band tapering at both ends.
      x_ = (lt - _F(0.4)) * _F(1 / 0.22)
      line_v = _F(d0 - 0.1 - 0.14 * p1) + _F(0.05 * (p0 - 0.5)) * x_ + _F(0.03) * x_ * x_
      th_ = (0.016 + 0.024 * g["atelectasis"]) * np.clip(1 - x_ * x_, 0, 1)
      band = _soft(th_ - np.abs(vv - line_v), 0.014)
      op += _F(0.9 * vis["atelectasis"]) * band * (_F(0.9) + _F(0.3) * tex)
      a[rs, cs] += _F(0.05 * vis["atelectasis"]) * band * lung
    # Lung air, minus what opacities displace.
    a[rs, cs] -= _F(0.31) * lung * (1 - np.clip(op, 0, 1))
    # Vessels: branching lines radiating from the hilum, tapering outwards.
    hx, hy = sgn * 0.17, -0.1
    du, dv = (uu - _F(hx)) * _F(sgn), vv - _F(hy)
    rh = np.sqrt(du * du + dv * dv) + _F(1e-3)
    th = np.arctan2(dv, du)
    lr = np.log(rh)
    wig = _F(1.2) * tex_fine[rs, cs]
    ves = np.clip(np.cos(_F(11.0) * th + _F(1.5) * lr + wig + phases[0]) * _F(4) - _F(3), 0, 1)
    ves += _F(0.6) * np.clip(np.cos(_F(19.0) * th - _F(2.0) * lr + wig + phases[1]) * _F(4) - _F(3), 0, 1)
    mark = (_F(0.09 + (0.04 * vis["edema"] if f["edema"] else 0.0)) * ves * np.exp(-rh * _F(2.5))
            + _F(0.06) * np.exp(-rh * rh * _F(1 / 0.008)))
    a[rs, cs] += (mark + _F(0.012) * tex) * lung * (1 if inner is None else inner)
    if f["nodule"] and side["nodule"] == s:
      p0, p1 = pos["nodule"]
      nx, ny = sgn * (0.25 + 0.3 * p0), -0.5 + 0.6 * p1
      nr = 0.018 + 0.035 * g["nodule"]
      dn = np.sqrt((uu - _F(nx)) ** 2 + (vv - _F(ny)) ** 2)
      a[rs, cs] += _F(0.2 * vis["nodule"]) * _soft(_F(nr) - dn, max(cv.px * 1.5, 0.006))
    hemis.append(lung)

  # --- bones; brightness follows bone density (never reported).
  rs, cs = cv.window(-1.0, 1.0, -1.0, 0.75)
  uu, vv = u[rs, cs], v[rs, cs]
  auu = np.abs(uu)
  cage = _soft(_F(wb * 0.92) - auu, 0.05) * _soft(vv + _F(0.86), 0.05) * _soft(_F(0.6) - vv, 0.15)
  rib_v = vv - _F(0.1) * auu - _F(0.5) * auu * auu
  x_ = rib_v + _F(1.2)  # rib spacing widens downwards
  phi = (x_ - _F(0.1) * x_ * x_) * _F(1 / 0.11)
  post = np.clip(np.cos(_F(2 * np.pi) * phi) * _F(2.2) - _F(1.3), 0, 1)
  phi2 = (vv + _F(0.45) * auu) * _F(1 / 0.2)
  ant = np.clip(np.cos(_F(2 * np.pi) * phi2 + _F(1.0)) * _F(2.5) - _F(2.0), 0, 1)
  ribs = (post + _F(0.5) * ant) * cage * _soft(auu - _F(0.07), 0.03)
  a[rs, cs] += _F(0.05 * bone) * ribs
  # Spine, faint through the mediastinum, and the trachea.
  rs, cs = cv.window(-0.12, 0.12, -1.0, 1.0)
  uu, vv = u[rs, cs], v[rs, cs]
  auu = np.abs(uu)
  vert = _F(0.4) + _F(0.6) * np.cos(_F(2 * np.pi / 0.12) * vv) ** 2
  a[rs, cs] += _F(0.03 * bone) * _soft(_F(0.06) - auu, 0.03) * vert * _soft(vv + _F(0.9), 0.1)
  trachea = _soft(_F(0.028) - np.abs(uu + _F(0.01)), 0.02) * _soft(_F(-0.4) - vv, 0.08)
  a[rs, cs] -= _F(0.07) * trachea
  # Clavicles run from the sternal notch up and out to the shoulders.
  cl_v0, cl_slope = (-0.82, -0.06) if ap else (-0.74, -0.2)
  rs, cs = cv.window(-0.85, 0.85, -1.0, -0.6)
  uu, vv = u[rs, cs], v[rs, cs]
  auu = np.abs(uu)
  cl_c = _F(cl_v0) + _F(cl_slope) * (auu - _F(0.08)) + _F(0.2) * (auu - _F(0.45)) ** 2
  clav = (_soft(_F(0.03) - np.abs(vv - cl_c), 0.02) * _soft(auu - _F(0.08), 0.03)
          * _soft(_F(0.72) - auu, 0.06))
  a[rs, cs] += _F(0.1 * bone) * clav
  if ap:  # scapulae project over the lateral lung fields on AP films
    rs, cs = cv.window(-0.9, 0.9, -0.8, 0.1)
    uu, vv = u[rs, cs], v[rs, cs]
    sc = _soft(np.abs(uu) - _F(0.55) - _F(0.2) * (vv + _F(0.75)), 0.04) * _soft(_F(0.0) - vv, 0.15)
    a[rs, cs] += _F(0.04) * sc * _soft(_F(wb) - np.abs(uu), 0.05)
  if case.sex == "F":  # breast shadows over the lower lungs
    rs, cs = cv.window(-0.9, 0.9, -0.1, 0.7)
    uu, vv = u[rs, cs], v[rs, cs]
    bx = np.abs(uu) - _F(0.45)
    br = _soft(1 - (bx * _F(1 / 0.33)) ** 2 - ((vv - _F(0.2)) * _F(1 / 0.3)) ** 2, 0.3)
    a[rs, cs] += _F(0.05 * np.clip(1 + 0.2 * habitus, 0.5, 1.5)) * br

  # --- support devices: bright tubes, lines and leads drawn as polylines.
  if case.devices:
    over = np.zeros((size, size), _F)
    n = 3 * size
    pen = max(1, round(size / 150))
    if "ett" in case.devices:
      tip = -0.5 - 0.08 * r_vis[2]
      vv_ = np.linspace(-1.1, tip, n)
      for off in (-0.018, 0.018):
        cv.splat(over, np.full(n, off - 0.005), vv_, 0.5, pen)
      cv.splat(over, np.linspace(-0.023, 0.013, 20), np.full(20, tip), 0.5, pen)
    if "ng" in case.devices:
      u1, v1 = _bezier((0.03, -1.1), (0.0, 0.2), (0.1, 0.5), n)
      u2, v2 = _bezier((0.1, 0.5), (0.18, 0.75), (0.35 + 0.05 * r_vis[3], 0.66), n // 2)
      cv.splat(over, np.concatenate([u1, u2]), np.concatenate([v1, v2]), 0.45, pen)
    if "cvc" in case.devices:
      uc, vc = _bezier((-0.5, -1.0), (-0.12, -0.8), (-0.07, -0.25 + 0.06 * r_vis[4]), n)
      cv.splat(over, uc, vc, 0.45, pen)
    if "leads" in case.devices:
      t_ = np.linspace(0, 2 * np.pi, 64)
      for lx, ly in ((-0.6, -0.6), (0.6, -0.6), (0.55, 0.45 + 0.1 * r_vis[5])):
        for rr in (0.03, 0.018):
          cv.splat(over, lx + rr * np.cos(t_), ly + rr * np.sin(t_), 0.6, pen)
        wu, wv = _bezier((lx, ly), (lx * 1.3, ly + 0.3), (np.sign(lx) * 1.1, ly + 0.5), n // 2)
        cv.splat(over, wu, wv, 0.3, pen)
    if "pacer" in case.devices:
      gu = np.linspace(0.4, 0.58, 40)
      for gv in np.linspace(-0.72, -0.6, max(3, size // 16)):
        cv.splat(over, gu, np.full(40, gv), 0.9, pen)
      lu, lv = _bezier((0.42, -0.65), (0.0, -0.55), (0.05, 0.28), n)
      cv.splat(over, lu, lv, 0.55, pen)
    a += over

  # --- acquisition: slight blur, film response, exposure, quantum noise.
  img = a
  img[1:-1, :] = _F(0.25) * img[:-2, :] + _F(0.5) * img[1:-1, :] + _F(0.25) * img[2:, :]
  img[:, 1:-1] = _F(0.25) * img[:, :-2] + _F(0.5) * img[:, 1:-1] + _F(0.25) * img[:, 2:]
  img *= _F(-2.4 * case.contrast)
  np.exp(img, out=img)
  img *= _F(-1.0)
  img += _F(1.0 + case.exposure)
  r0, c0 = noise_off
  img += _F(case.noise) * _noise_bank(size)[r0:r0 + size, c0:c0 + size]
  np.clip(img, 0, 1, out=img)
  return (img * _F(255) + _F(0.5)).astype(np.uint8)


# ==================================================================== reports
# Reports are written from ``Case.reported`` (the radiologist's reading, with errors), never
# from the ground-truth labels directly. They never mention the patient's age, and mention
# habitus, bone density or calcification (the prognostic film features) only with
# report_image_evidence > 0.

def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def _grade_word(g: float, kind: str = "size") -> str:
  words = {"size": ("small", "moderate", "large"), "deg": ("mild", "moderate", "severe")}[kind]
  return words[0 if g < 0.4 else 1 if g < 0.75 else 2]


def _side_word(s: int) -> str:
  return ("right", "left", "bilateral")[int(s)]


_HEDGE_PRE = ("possible", "questionable", "probable", "suspected")
_HEDGE_POST = ("cannot be excluded", "is not excluded", "may be present")
_COMPARE_NEW = ("new since the prior study", "new compared with the prior radiograph", "not seen previously")
_COMPARE_OLD = ("unchanged from prior", "similar to the prior study", "stable compared with prior")


def _positive_sentence(name: str, case: Case, k: int, rng: np.random.Generator) -> str:
  g = float(case.grade[k]) if case.findings[k] else float(rng.random()) * 0.5
  s = int(case.side[k])
  hedged = bool(case.hedged[k])
  side = _side_word(s)
  if name == "cardiomegaly":
    if hedged:
      return _pick(rng, ("The heart size is borderline enlarged.", "Possible mild cardiomegaly.",
                         "Heart size is at the upper limits of normal, possibly mildly enlarged."))
    w = _grade_word(g, "deg")
    return _pick(rng, (f"{w.capitalize()} cardiomegaly.", f"The heart is {w}ly enlarged.",
                       f"{w.capitalize()} enlargement of the cardiac silhouette.",
                       "The cardiac silhouette is enlarged."))
  if name == "pleural_effusion":
    eff = "effusions" if s == 2 else "effusion"
    if hedged:
      return _pick(rng, (f"Possible trace {side} pleural {eff}.",
                         f"Blunting of the {side} costophrenic angle may reflect a small {eff}.",
                         f"A small {side} pleural {eff} cannot be excluded."))
    w = _grade_word(g)
    return _pick(rng, (f"{w.capitalize()} {side} pleural {eff}.", f"There is a {w} {side} pleural {eff}.",
                       f"{w.capitalize()} {side} pleural {eff} with blunting of the costophrenic angle.",
                       f"Layering {side} pleural {eff}, {w} in size."))
  if name == "pneumothorax":
    if hedged:
      return _pick(rng, (f"A tiny {side} apical pneumothorax cannot be excluded.",
                         f"Questionable {side} apical pleural line, possible small pneumothorax."))
    w = _grade_word(g)
    return _pick(rng, (f"{w.capitalize()} {side} pneumothorax.", f"There is a {w} {side} apical pneumothorax.",
                       f"{w.capitalize()} {side} pneumothorax with a visible pleural line."))
  if name == "consolidation":
    zone = "lower" if case.pos[k][1] > 0.5 else "mid"
    if hedged:
      return _pick(rng, (f"Subtle {side} {zone} lung opacity, possibly early consolidation.",
                         f"Hazy {side} {zone} lung opacity; consolidation cannot be excluded."))
    return _pick(rng, (f"Focal consolidation in the {side} {zone} lung.",
                       f"Airspace consolidation in the {side} {zone} lung, concerning for pneumonia.",
                       f"{side.capitalize()} {zone} lung consolidation."))
  if name == "edema":
    if hedged:
      return _pick(rng, ("Mild vascular congestion, possibly early pulmonary edema.",
                         "Questionable mild interstitial edema."))
    w = _grade_word(g, "deg")
    return _pick(rng, (f"{w.capitalize()} pulmonary edema.", f"{w.capitalize()} interstitial pulmonary edema.",
                       "Perihilar haziness and vascular congestion consistent with pulmonary edema.",
                       f"Findings of {w} pulmonary edema with Kerley B lines."))
  if name == "atelectasis":
    where = "bibasilar" if s == 2 else f"{side} basilar"
    if hedged:
      return _pick(rng, (f"Minimal {where} opacity, likely atelectasis.", f"Possible {where} atelectasis."))
    return _pick(rng, (f"{where.capitalize()} atelectasis.", f"Plate-like atelectasis at the {where.split()[0]} base.",
                       f"Linear {where} opacity consistent with atelectasis."))
  if name == "nodule":
    mm = int(round((0.018 + 0.035 * g) * 2 * 150))
    zone = "upper" if case.pos[k][1] < 0.5 else "mid"
    if hedged:
      return _pick(rng, (f"Possible {side} {zone} lung nodule, could represent a nipple shadow.",
                         f"Questionable nodular opacity in the {side} {zone} lung."))
    return _pick(rng, (f"{mm} mm nodule in the {side} {zone} lung.",
                       f"Rounded {mm} mm nodular opacity in the {side} {zone} lung; CT recommended.",
                       f"A {side} {zone} lung nodule measures {mm} mm."))
  if name == "support_device":
    devs = case.devices or ("leads",)
    parts = []
    for d in devs:
      parts.append({
          "ett": _pick(rng, ("Endotracheal tube terminates 4 cm above the carina.",
                             "The endotracheal tube is in standard position.")),
          "ng": _pick(rng, ("Enteric tube courses below the diaphragm.", "Nasogastric tube tip is in the stomach.")),
          "cvc": _pick(rng, ("Right internal jugular central venous catheter tip in the SVC.",
                             "Right IJ line terminates in the lower SVC.")),
          "leads": _pick(rng, ("Monitoring leads overlie the chest.", "External cardiac monitoring leads.")),
          "pacer": _pick(rng, ("Left-sided pacemaker with lead in the right ventricle.",
                               "Cardiac pacemaker device in place.")),
      }[d])
    if hedged:
      return "Possible external line overlying the chest."
    return " ".join(parts)
  raise AssertionError(name)


_NEGATIVE = {
    "cardiomegaly": ("Heart size is normal.", "The cardiac silhouette is within normal limits.",
                     "Normal cardiomediastinal silhouette.", "No cardiomegaly."),
    "pleural_effusion": ("No pleural effusion.", "The costophrenic angles are sharp.", "No effusion."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax."),
    "consolidation": ("No focal consolidation.", "No focal airspace opacity."),
    "edema": ("No pulmonary edema.", "No vascular congestion or edema."),
    "atelectasis": ("No atelectasis.",),
    "nodule": ("No suspicious pulmonary nodules.",),
    "support_device": ("No lines or tubes.",),
}
_NEG_RATE = {"cardiomegaly": 0.7, "pleural_effusion": 0.6, "pneumothorax": 0.6, "consolidation": 0.5,
             "edema": 0.35, "atelectasis": 0.1, "nodule": 0.1, "support_device": 0.05}

_IMPRESSION_SHORT = {
    "cardiomegaly": "cardiomegaly", "pleural_effusion": "{side} pleural effusion",
    "pneumothorax": "{side} pneumothorax", "consolidation": "{side} consolidation",
    "edema": "pulmonary edema", "atelectasis": "{side} atelectasis", "nodule": "{side} lung nodule",
    "support_device": "support devices in place",
}

# Clinical-history phrases: level 2 strong, 1 mild, -1 reassuring. Same frequencies at any knob value.
_HISTORY = {
    "mortality_12m": {
        2: ("frail with progressive functional decline", "known metastatic malignancy",
            "end-stage renal disease on dialysis", "chronic respiratory failure on home oxygen"),
        1: ("multiple comorbidities", "deconditioning and weight loss", "recent falls and fatigue"),
        -1: ("otherwise healthy", "active and independent at baseline"),
    },
    "readmission_12m": {
        2: ("multiple recent hospitalizations", "recently discharged, returns with dyspnea",
            "poor medication adherence and frequent admissions"),
        1: ("prior admission for similar symptoms", "follow-up after recent hospital stay"),
        -1: ("no prior admissions", "first presentation"),
    },
}
# Near-determinants of the outcome ("overly predictive text"), keyed by the outcome value they state.
_LEAK = {
    "mortality_12m": {1: ("Patient transitioned to comfort care.", "Goals of care changed to hospice.",
                          "DNR/DNI, comfort measures only."),
                      0: ("Expected full recovery, discharge home planned.",
                          "Routine outpatient follow-up, no acute concerns.")},
    "readmission_12m": {1: ("Readmission already scheduled per care team.",
                            "Addendum: patient readmitted shortly after this study."),
                        0: ("Discharged home with no further admissions anticipated.",
                            "Care transferred to outpatient clinic, no readmission expected.")},
}
# Remarks on film features the outcomes depend on (report_image_evidence), keyed by Case.evidence level.
_EVIDENCE = {
    "aortic_calcification": {1: ("Atherosclerotic calcification of the aortic knob.",
                                 "Calcified aortic arch."),
                             2: ("Dense calcification of the aortic arch and descending aorta.",
                                 "Extensive aortic atherosclerotic calcification.")},
    "osteopenia": {1: ("The bones are osteopenic.", "Diffuse osteopenia."),
                   2: ("Marked osteopenia.", "Severe demineralization of the osseous structures.")},
    "habitus": {1: ("Large body habitus limits evaluation.", "Large body habitus."),
                -1: ("Thin body habitus.", "Cachectic habitus with little soft tissue.")},
}
_REASONS = ("shortness of breath", "cough", "chest pain", "fever", "evaluate for pneumonia", "dyspnea",
            "pre-operative evaluation", "hypoxia", "follow-up")


def write_report(case: Case, rng: np.random.Generator) -> str:
  """FINDINGS / IMPRESSION report of ``case`` as read by the (fallible) radiologist."""
  who = _pick(rng, ("___-year-old woman", "___F", "female patient") if case.sex == "F"
              else ("___-year-old man", "___M", "male patient"))
  reason = _pick(rng, _REASONS)
  history = []
  for o in PROGNOSTIC_LABELS:
    lvl = case.text_levels[o]
    if lvl != 0:
      history.append(_pick(rng, _HISTORY[o][lvl]))
  hist = (", " + ", ".join(history)) if history else ""
  lines = [f"INDICATION: {who} with {reason}{hist}."]
  leak = [_pick(rng, _LEAK[o][case.leaks[o]]) for o in PROGNOSTIC_LABELS if case.leaks[o] >= 0]
  if leak:
    lines[0] += " " + " ".join(leak)
  lines.append("COMPARISON: " + ("Prior chest radiograph." if case.comparison else "None."))

  findings = []
  if case.view == "AP" and rng.random() < 0.6:
    findings.append(_pick(rng, ("Portable AP view of the chest.", "Single portable AP view.")))
  rep = case.reported
  lung_pos = any(rep[FINDINGS.index(n)] for n in ("consolidation", "edema", "atelectasis", "nodule"))
  order = list(range(len(FINDINGS)))
  # Devices first (radiologists' habit), then the rest in a random order.
  rest = [k for k in order if FINDINGS[k] != "support_device"]
  rng.shuffle(rest)
  positives = []
  for k in [FINDINGS.index("support_device")] + rest:
    name = FINDINGS[k]
    if rep[k]:
      sent = _positive_sentence(name, case, k, rng)
      if case.comparison and rng.random() < 0.4 and not case.hedged[k]:
        sent = sent[:-1] + ", " + _pick(rng, _COMPARE_NEW if rng.random() < 0.5 else _COMPARE_OLD) + "."
      findings.append(sent)
      positives.append(k)
    elif rng.random() < _NEG_RATE[name]:
      findings.append(_pick(rng, _NEGATIVE[name]))
  if not lung_pos and rng.random() < 0.6:
    findings.append(_pick(rng, ("The lungs are clear.", "Lungs are well expanded and clear.")))
  if rep[FINDINGS.index("pleural_effusion")] == 0 and rep[FINDINGS.index("pneumothorax")] == 0 and rng.random() < 0.4:
    findings.append("No pleural effusion or pneumothorax.")
  findings += [_pick(rng, _EVIDENCE[name][level]) for name, level in case.evidence.items() if level]
  lines.append("FINDINGS: " + " ".join(findings))

  if not positives or positives == [FINDINGS.index("support_device")] and rng.random() < 0.5:
    imp = _pick(rng, ("No acute cardiopulmonary process.", "No acute intrathoracic abnormality.",
                      "Normal chest radiograph.", "No acute cardiopulmonary abnormality."))
    if positives:
      imp = "Support devices as above. " + imp
  else:
    parts = []
    for k in positives:
      name = FINDINGS[k]
      short = _IMPRESSION_SHORT[name].format(side=_side_word(case.side[k]))
      if case.hedged[k]:
        short = (_pick(rng, _HEDGE_PRE) + " " + short) if rng.random() < 0.6 else \
            (short + " " + _pick(rng, _HEDGE_POST))
      elif name in ("pleural_effusion", "pneumothorax", "cardiomegaly", "edema"):
        short = _grade_word(float(case.grade[k]), "deg" if name in ("cardiomegaly", "edema") else "size") + " " + short
      parts.append(short)
    imp = "; ".join(parts)
    imp = imp[0].upper() + imp[1:] + "."
  lines.append("IMPRESSION: " + imp)
  return "\n".join(lines)
