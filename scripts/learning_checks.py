"""Longer learning checks of the pre-training methods on SynthCXR: do they learn what they should?

    python scripts/learning_checks.py --workdir runs/learning_checks

Pre-trains every method of configs/pretrain_synth.py (CPU size: the study's small ViT on 64 px
films; its own steps, or ``--steps N`` for all) into ``WORKDIR/pretrain/<method>`` (resumable: a
rerun reuses finished runs), then measures, on held-out splits the pre-training never saw:

* retrieval (clip, siglip, clip_ssl, unicl): image -> report recall@1 / @5 over the whole
  validation split (N pairs; chance = 1/N, 5/N);
* masked-token accuracy (mrm): the masked report tokens of validation reports predicted by
  (a) MRM with the paired image, (b) the same MRM model with the batch's images shuffled
  (another patient's film), and (c) a text-only control: the same architecture trained for the
  same steps on the same reports with every image replaced by zeros (so the image path carries
  no information), evaluated with zero images. (c) is the honest baseline: it is what a model
  that was *trained* to do its best from the report context alone reaches; (b) only says how
  much this MRM model relies on its image input. Accuracy is given over all masked tokens, over
  the masked "finding words" (finding names, normal/clear/no, laterality, size/degree, devices:
  what the film shows) and per class of them;
* captioning (caption): greedy reports for validation films; a finding counts as mentioned when
  one of its keywords appears in the generated IMPRESSION section (where SynthCXR reports list
  only positive, possibly hedged, findings). Per finding, balanced accuracy of "mentioned" as a
  prediction of the ground-truth label, macro over the 8 findings (chance 0.5); the same score
  with the labels shuffled across films (an empirical chance level), and of the true reports'
  impressions (the ceiling set by SynthCXR's radiologist errors);
* linear probe: a logistic head (radjax.methods.distill.fit_head, the study's head) on each
  method's frozen features (radjax.eval.features.encode_images) fitted on the train split and
  scored on the test split: macro AUROC over the 8 diagnostic labels (and over the 2 prognostic
  outcomes, for information), against the untrained ``none`` encoder.

Prints a markdown table (and writes WORKDIR/learning_checks.json). Never prints report text. With
every method at its own steps this is hours on 2 CPU cores, MRM and its control about 1.7 h of it:
``--methods clip,caption`` picks some.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from radjax import compile_cache, host_malloc, xla_flags  # noqa: E402

host_malloc.reexec_with_malloc_defaults()  # as the radjax command does, before jax starts
xla_flags.apply_default_xla_flags()
compile_cache.enable()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from radjax import methods  # noqa: E402
from radjax.config import load_config  # noqa: E402
from radjax.data.pipeline import label_names, make_loader  # noqa: E402
from radjax.data.synth_cxr import DIAGNOSTIC_LABELS, PROGNOSTIC_LABELS  # noqa: E402
from radjax.data.tokenizer import get_tokenizer  # noqa: E402
from radjax.eval import metrics as metrics_lib  # noqa: E402
from radjax.eval.features import encode_images  # noqa: E402
from radjax.losses import l2_normalize  # noqa: E402
from radjax.methods import mrm as mrm_lib  # noqa: E402
from radjax.methods.distill import HeadConfig, fit_head  # noqa: E402
from radjax.train import loop  # noqa: E402
from radjax.train.checkpoint import load_pretrained  # noqa: E402

PROBE_METHODS = ("supervised", "ssl", "clip", "siglip", "mrm", "clip_ssl", "caption", "unicl")
RETRIEVAL_METHODS = ("clip", "siglip", "clip_ssl", "unicl")
# Keywords of each finding in an IMPRESSION (SynthCXR's _IMPRESSION_SHORT, plus common synonyms).
KEYWORDS = {
    "cardiomegaly": ("cardiomegaly", "enlarged", "enlargement"),
    "pleural_effusion": ("effusion",),
    "pneumothorax": ("pneumothorax",),
    "consolidation": ("consolidation", "pneumonia"),
    "edema": ("edema", "congestion"),
    "atelectasis": ("atelectasis",),
    "nodule": ("nodule", "nodular"),
    "support_device": ("support device", "tube", "catheter", "pacemaker", "line", "leads"),
}
# Report words about what the film shows (what is seen, where, how much), by class. The rest of a
# SynthCXR report often gives names and normal words; side and grade mostly only the film does
# (BUILD_NOTES.md), so which classes the film helps to predict says what the model reads in it.
FINDING_WORD_CLASSES = {
    "name": ("cardiomegaly", "enlarged", "effusion", "effusions", "pneumothorax", "consolidation", "edema",
             "atelectasis", "nodule", "opacity", "pneumonia", "congestion"),
    "normal": ("normal", "clear", "no"),
    "side": ("right", "left", "bilateral"),
    "grade": ("small", "moderate", "large", "mild", "severe"),
    "device": ("tube", "catheter", "pacemaker", "leads"),
}

log = logging.getLogger("learning_checks")


class TextOnlyMRM(mrm_lib.MRM):
  """MRM trained with every image replaced by zeros: the text-only control (same architecture)."""

  def loss(self, model, batch, key, train):
    return super().loss(model, dict(batch, image=jnp.zeros_like(batch["image"])), key, train)


# ----------------------------------------------------------------------------- pre-training


def config_for(method: str, args) -> ml_collections.ConfigDict:
  path = f"configs/pretrain_synth.py:{method}" + ("," + args.variant if args.variant else "")
  steps = args.steps or load_config(path, list(args.overrides)).train.steps
  overrides = [f"--config.train.steps={steps}", f"--config.train.checkpoint_every={steps}",
               "--config.train.progress=False", f"--config.train.log_every={max(steps // 10, 1)}"]
  return load_config(path, overrides + list(args.overrides))


def pretrain(name: str, args, method_obj=None) -> tuple[str, float]:
  workdir = os.path.join(args.workdir, "pretrain", name)
  method = "mrm" if name == "mrm_text_only" else name
  t0 = time.perf_counter()
  result = loop.train(config_for(method, args), workdir, method=method_obj)
  wall = time.perf_counter() - t0
  log.info("%s: %d steps, loss %.4f, %.0f s", name, result.get("step", -1), result.get("train/loss", float("nan")), wall)
  return workdir, wall


# ----------------------------------------------------------------------------- data


def eval_data(config, labels: str = "diagnostic") -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.labels = labels
  data.augment = False
  return data


def batches(config, split: str, batch_size: int, labels: str = "diagnostic"):
  return make_loader(eval_data(config, labels), split, batch_size=batch_size, seed=0, train=False,
                     tokenizer=get_tokenizer(config.data), num_epochs=1)


def _split_jit(fn, module):
  """jit of ``fn(module, *arrays)`` with the module's state as an argument (no retrace per call)."""
  graphdef, state = nnx.split(module)
  compiled = jax.jit(lambda st, *xs: fn(nnx.merge(graphdef, st), *xs))
  return lambda *xs: compiled(state, *xs)


# ----------------------------------------------------------------------------- checks


def retrieval(model, config, batch_size: int) -> dict:
  embed_img = _split_jit(lambda m, x: l2_normalize(m.embed_images(x)), model)
  embed_txt = _split_jit(lambda m, i, k: l2_normalize(m.embed_texts(i, k)), model)
  imgs, txts = [], []
  for b in batches(config, "validation", batch_size):
    imgs.append(np.asarray(embed_img(jnp.asarray(b["image"]))))
    txts.append(np.asarray(embed_txt(jnp.asarray(b["text_ids"]), jnp.asarray(b["text_mask"]))))
  img, txt = np.concatenate(imgs), np.concatenate(txts)
  sims = img @ txt.T  # [N, N], row i: image i against every report
  own = np.diagonal(sims)[:, None]
  rank = (sims > own).sum(1)  # 0 = own report retrieved first
  n = len(rank)
  return {"n": n, "recall@1": float((rank < 1).mean()), "recall@5": float((rank < 5).mean()),
          "chance@1": 1.0 / n, "chance@5": 5.0 / n}


def _finding_token_ids(tok) -> dict[str, np.ndarray]:
  """Single-piece token ids of each class of FINDING_WORD_CLASSES."""
  out = {}
  for name, words in FINDING_WORD_CLASSES.items():
    pieces = [tok.backend.encode(w, add_special_tokens=False).ids for w in words]
    out[name] = np.asarray(sorted({p[0] for p in pieces if len(p) == 1}), np.int32)
  return out


def masked_tokens(model, config, batch_size: int, image_mode: str, repeats: int = 4) -> dict:
  """Masked-token accuracy of an MRM model on validation reports; image_mode: paired|shuffled|zeros.

  Over all masked tokens, over the masked finding words, and per class of finding word
  (``by_class``: accuracy and count)."""
  tok = get_tokenizer(config.data)
  class_ids = {k: jnp.asarray(v) for k, v in _finding_token_ids(tok).items()}

  def acc(m, batch, key):
    _, _, logits, predict = mrm_lib.token_predictions(m, batch, key)
    correct = (logits.argmax(-1) == batch["text_ids"]) * predict
    counts = [correct.sum(), predict.sum()]
    for ids in class_ids.values():
      in_class = jnp.isin(batch["text_ids"], ids) * predict
      counts += [(correct * in_class).sum(), in_class.sum()]
    return jnp.stack(counts)

  fn = _split_jit(acc, model)
  totals = np.zeros(2 + 2 * len(class_ids))
  for i, b in enumerate(batches(config, "validation", batch_size)):
    image = jnp.asarray(b["image"])
    if image_mode == "shuffled":
      image = jnp.roll(image, 1, axis=0)
    elif image_mode == "zeros":
      image = jnp.zeros_like(image)
    batch = {"image": image, "text_ids": jnp.asarray(b["text_ids"]), "text_mask": jnp.asarray(b["text_mask"])}
    for r in range(repeats):  # several maskings of the same reports: more masked tokens to count
      totals += np.asarray(fn(batch, jax.random.key(1000 * i + r)), np.float64)
  correct, count = totals[2::2], totals[3::2]
  return {"token_accuracy": totals[0] / totals[1],
          "finding_token_accuracy": correct.sum() / max(count.sum(), 1),
          "by_class": {k: {"accuracy": c / max(n, 1), "n": int(n)} for k, c, n in zip(class_ids, correct, count)},
          "n_masked": int(totals[1]), "n_finding_masked": int(count.sum())}


def _impression(text: str) -> str | None:
  j = text.rfind("impression")
  return None if j < 0 else text[j + len("impression"):]


def _mentions(texts: list[str]) -> tuple[np.ndarray, float]:
  """[N, 8] 0/1 finding mentions in each text's IMPRESSION; fraction of texts that had one."""
  out = np.zeros((len(texts), len(DIAGNOSTIC_LABELS)), np.float32)
  found = 0
  for i, t in enumerate(texts):
    imp = _impression(t.lower())
    if imp is None:
      continue
    found += 1
    for k, name in enumerate(DIAGNOSTIC_LABELS):
      out[i, k] = float(any(w in imp for w in KEYWORDS[name]))
  return out, found / max(len(texts), 1)


def _balanced_accuracy(pred: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
  scores = []
  for k in range(labels.shape[1]):
    obs = mask[:, k] > 0
    y, p = labels[obs, k] > 0.5, pred[obs, k] > 0.5
    if y.all() or not y.any():
      continue
    scores.append(0.5 * (p[y].mean() + (~p[~y]).mean()))
  return float(np.mean(scores))


def captioning(model, config, batch_size: int, n_max: int) -> dict:
  tok = get_tokenizer(config.data)
  max_len = int(config.data.max_text_len)
  gen = _split_jit(lambda m, x: m.generate(x, max_len), model)
  generated, true, labels, masks = [], [], [], []
  for b in batches(config, "validation", batch_size):
    ids = np.asarray(gen(jnp.asarray(b["image"])))
    # Decoded text stays in memory: only keyword counts leave this function.
    generated += [tok.decode(row) for row in ids]
    true += [tok.decode(row[m > 0]) for row, m in zip(b["text_ids"], b["text_mask"])]
    labels.append(b["labels"])
    masks.append(b["label_mask"])
    if len(generated) >= n_max:
      break
  labels, masks = np.concatenate(labels), np.concatenate(masks)
  pred, with_imp = _mentions(generated)
  ref, _ = _mentions(true)
  perm = np.random.default_rng(0).permutation(len(labels))
  return {"n": len(generated), "with_impression": with_imp,
          "balanced_accuracy": _balanced_accuracy(pred, labels, masks),
          "shuffled_labels": _balanced_accuracy(pred, labels[perm], masks[perm]),
          "true_reports": _balanced_accuracy(ref, labels, masks),
          "mention_rate": float(pred.mean()), "label_rate": float((labels * masks).sum() / masks.sum())}


def probe(encoder, config, batch_size: int, n_train: int) -> dict:
  feats = {}
  for split in ("train", "test"):
    feats[split] = encode_images(encoder, batches(config, split, batch_size, labels="all"))
  tr, te = feats["train"], feats["test"]
  idx = np.arange(min(n_train, len(tr["feats"])))
  head = fit_head(tr["feats"][idx], tr["labels"][idx], tr["label_mask"][idx], config=HeadConfig())
  scores = head.logits(te["feats"])
  names = list(label_names(eval_data(config, "all")))
  out = {}
  for group, group_names in (("diagnostic", DIAGNOSTIC_LABELS), ("prognostic", PROGNOSTIC_LABELS)):
    cols = [names.index(n) for n in group_names]
    out[f"{group}_auroc"] = metrics_lib.multilabel_macro_auroc(scores[:, cols], te["labels"][:, cols],
                                                               te["label_mask"][:, cols])
  return out


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="runs/learning_checks")
  p.add_argument("--steps", type=int, default=0,
                 help="pre-training steps of every method (default: each method's own, in configs/pretrain_synth.py)")
  p.add_argument("--variant", default="", help="configs/pretrain_synth.py variant (default: the CPU size)")
  p.add_argument("--methods", default=",".join(PROBE_METHODS), help="comma-separated pre-training methods")
  p.add_argument("--probe_n_train", type=int, default=2000, help="labelled train examples of the probe")
  p.add_argument("--caption_n", type=int, default=256, help="validation films to caption")
  p.add_argument("--batch_size", type=int, default=128, help="evaluation batch size")
  # Anything else is a config override applied to every pre-training: --config.optim.lr=2e-3.
  args, args.overrides = p.parse_known_args(argv)
  bad = [o for o in args.overrides if not o.startswith("--config.")]
  if bad:
    p.error(f"unrecognised arguments: {' '.join(bad)}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
  for name in ("absl", "jax", "orbax", "radjax"):
    logging.getLogger(name).setLevel(logging.ERROR)
  os.makedirs(args.workdir, exist_ok=True)
  todo = [m.strip() for m in args.methods.split(",") if m.strip()]
  results: dict = {"variant": args.variant or "cpu", "methods": {}}
  t_start = time.perf_counter()

  base_config = config_for("clip", args)
  none_encoder = methods.get_method("none").build(base_config, nnx.Rngs(int(base_config.seed))).image_encoder
  results["methods"]["none"] = {"probe": probe(none_encoder, base_config, args.batch_size, args.probe_n_train),
                                "steps": 0, "pretrain_s": 0.0}
  log.info("none: %s", results["methods"]["none"])

  for name in todo:
    workdir, wall = pretrain(name, args)
    model, config = load_pretrained(workdir)
    r: dict = {"steps": int(config.train.steps), "pretrain_s": wall,
               "probe": probe(model.image_encoder, config, args.batch_size, args.probe_n_train)}
    if name in RETRIEVAL_METHODS:
      r["retrieval"] = retrieval(model, config, args.batch_size)
    if name == "mrm":
      r["masked_tokens"] = {"paired": masked_tokens(model, config, args.batch_size, "paired"),
                            "shuffled": masked_tokens(model, config, args.batch_size, "shuffled")}
      ctl_dir, ctl_wall = pretrain("mrm_text_only", args, method_obj=TextOnlyMRM())
      ctl, _ = load_pretrained(ctl_dir, method=TextOnlyMRM())
      r["masked_tokens"]["text_only"] = masked_tokens(ctl, config, args.batch_size, "zeros")
      r["text_only_pretrain_s"] = ctl_wall
    if name == "caption":
      r["captioning"] = captioning(model, config, args.batch_size, args.caption_n)
    results["methods"][name] = r
    log.info("%s: %s", name, json.dumps(r))
    with open(os.path.join(args.workdir, "learning_checks.json"), "w") as f:
      json.dump(results, f, indent=2)
  results["total_s"] = time.perf_counter() - t_start
  with open(os.path.join(args.workdir, "learning_checks.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(table(results))
  return results


def table(results: dict) -> str:
  ms = results["methods"]
  none = ms["none"]["probe"]
  lines = [f"Learning checks ({results['variant']} config), {results.get('total_s', 0) / 60:.1f} min in all.", "",
           "| method | steps | pretrain s | probe diag. AUROC (none) | probe prog. AUROC (none) | check | value "
           "| baseline |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for name, r in ms.items():
    pr = r["probe"]
    head = (f"| {name} | {r['steps']} | {r['pretrain_s']:.0f} | {pr['diagnostic_auroc']:.3f} ({none['diagnostic_auroc']:.3f}) | "
            f"{pr['prognostic_auroc']:.3f} ({none['prognostic_auroc']:.3f}) |")
    checks = []
    if "retrieval" in r:
      rt = r["retrieval"]
      checks.append((f"image→report R@1 / R@5, N={rt['n']}", f"{rt['recall@1']:.3f} / {rt['recall@5']:.3f}",
                     f"chance {rt['chance@1']:.3f} / {rt['chance@5']:.3f}"))
    if "masked_tokens" in r:
      mt = r["masked_tokens"]
      checks.append(("masked-token acc., all (paired image)", f"{mt['paired']['token_accuracy']:.3f}",
                     f"text-only {mt['text_only']['token_accuracy']:.3f}; shuffled image "
                     f"{mt['shuffled']['token_accuracy']:.3f}"))
      checks.append((f"masked-token acc., finding words (n={mt['paired']['n_finding_masked']})",
                     f"{mt['paired']['finding_token_accuracy']:.3f}",
                     f"text-only {mt['text_only']['finding_token_accuracy']:.3f}; shuffled image "
                     f"{mt['shuffled']['finding_token_accuracy']:.3f}"))
      for word_class, paired in mt["paired"]["by_class"].items():
        checks.append((f"... {word_class} words (n={paired['n']})", f"{paired['accuracy']:.3f}",
                       f"text-only {mt['text_only']['by_class'][word_class]['accuracy']:.3f}; shuffled image "
                       f"{mt['shuffled']['by_class'][word_class]['accuracy']:.3f}"))
    if "captioning" in r:
      c = r["captioning"]
      checks.append((f"caption finding mentions, balanced acc. (n={c['n']})", f"{c['balanced_accuracy']:.3f}",
                     f"shuffled labels {c['shuffled_labels']:.3f}; true reports {c['true_reports']:.3f}"))
    if not checks:
      checks.append(("", "", ""))
    for i, (what, value, baseline) in enumerate(checks):
      prefix = head if i == 0 else "| | | | | |"
      lines.append(f"{prefix} {what} | {value} | {baseline} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
