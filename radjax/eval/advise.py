"""``radjax advise``: how well does the report represent a label, and what should training do about it?

Three probes on the dataset's training split, scored on its validation split:
text-only (TF-IDF of the report), image-only (a coarse pixel grid, or a pre-trained
encoder's features), and both together (the distillation teacher's inputs). The
paper's findings turn their AUROCs into a recommendation:

* the report barely represents the label (text AUROC near chance, the image
  carries more): image–report alignment alone can hurt; pre-train with alignment +
  self-supervision (or self-supervision), and a report-seeing teacher has nothing
  to add;
* the report represents it well but does not give it away: alignment helps, and
  distillation from a report-seeing teacher can help more, if the student can learn
  what the teacher knows beyond the label;
* the report nearly determines it (text AUROC >= ``overly_predictive``): alignment
  helps, but distillation's gain vanishes (the teacher's soft targets are the labels).

What the student can learn is measured by ``text_image_r``: the correlation, within each
class, of the text-only and image-only probes' scores. A teacher helps a student through
how its soft targets rank examples *within* a class (which positives are clear-cut,
which negatives are at risk); that helps only where the film shows the same ranking.
Phrases that describe an image-visible risk give r well above zero; a report that states
the outcome moves the score by class membership and leaves r near zero, as does a report
unrelated to the label. On the SynthCXR sweep the study measured a report's own share of
distillation's gain only where r was about 0.4 (BUILD_NOTES.md, "radjax advise").
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from radjax.eval.metrics import auroc

WEAK_TEXT = 0.65
OVERLY_PREDICTIVE = 0.97
LEARNABLE = 0.3
MIN_GAIN = 0.02


@dataclasses.dataclass
class Advice:
  label: str
  text_auroc: float
  image_auroc: float
  both_auroc: float
  text_image_r: float
  pretrain: str
  distill: bool
  reason: str


def within_class_correlation(a, b, labels, mask=None) -> float:
  """Pearson correlation of ``a`` and ``b`` within each class, averaged weighted by class size.

  Args:
    a, b: float [N] scores of the same examples.
    labels: 0/1 [N].
    mask: 1 = observed, 0 = ignore; [N] or None (all observed).
  Returns:
    The weighted mean of the per-class correlations; a class with fewer than 3 examples or
    a constant score contributes 0 (its ranking says nothing), with its weight.
  """
  a, b, labels = (np.asarray(v, np.float64).ravel() for v in (a, b, labels))
  keep = np.ones_like(a, bool) if mask is None else np.asarray(mask).ravel() > 0
  total, weight = 0.0, 0
  for c in (0.0, 1.0):
    x, z = a[keep & (labels == c)], b[keep & (labels == c)]
    weight += len(x)
    if len(x) >= 3 and x.std() > 0 and z.std() > 0:
      total += len(x) * float(np.mean((x - x.mean()) * (z - z.mean())) / (x.std() * z.std()))
  return total / weight if weight else 0.0


def recommend(label: str, text_auroc: float, image_auroc: float, both_auroc: float,
              text_image_r: float, *, weak_text: float = WEAK_TEXT,
              overly_predictive: float = OVERLY_PREDICTIVE, learnable: float = LEARNABLE) -> Advice:
  """The decision rule (pure; see module docstring)."""
  numbers = (label, text_auroc, image_auroc, both_auroc, text_image_r)
  if text_auroc < weak_text and text_auroc <= image_auroc + MIN_GAIN:
    return Advice(*numbers, "clip_ssl", False,
                  f"the report barely represents {label} (text-only AUROC {text_auroc:.3f} vs image-only "
                  f"{image_auroc:.3f}): alignment alone risks discarding the image signal, so add "
                  "self-supervision; a report-seeing teacher adds little")
  if text_auroc >= overly_predictive:
    return Advice(*numbers, "clip", False,
                  f"the report nearly determines {label} (text-only AUROC {text_auroc:.3f}): alignment "
                  "uses it well, but a teacher that sees it only repeats the labels, so distillation "
                  "is not expected to help")
  gain = both_auroc - image_auroc
  if gain <= MIN_GAIN:
    verdict = "a teacher adds little over the image"
  elif text_image_r < learnable:
    verdict = (f"but within each class the report's score barely follows the image's (r = "
               f"{text_image_r:.2f} < {learnable}): what the teacher knows beyond the label is not "
               "on the film, so a student cannot learn it and distillation is not expected to help")
  else:
    verdict = (f"and within each class the report's score follows the image's (r = {text_image_r:.2f}): "
               "distill from a report-seeing teacher")
  return Advice(*numbers, "clip" if text_auroc >= 0.8 else "clip_ssl",
                gain > MIN_GAIN and text_image_r >= learnable,
                f"the report represents {label} (text-only AUROC {text_auroc:.3f}); "
                f"image + report reaches {both_auroc:.3f} vs image alone {image_auroc:.3f} "
                f"({gain:+.3f}), {verdict}")


def _pixel_features(source, size: int = 16) -> np.ndarray:
  """Each image average-pooled to a size x size grid, plus its mean and std: [N, size^2 + 2]."""
  from PIL import Image
  feats = []
  for i in range(len(source)):
    img = np.asarray(source[i]["image"], np.float32)
    if img.ndim == 3:
      img = img.mean(-1)
    small = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), np.float32)
    feats.append(np.concatenate([small.ravel() / 255.0, [img.mean() / 255.0, img.std() / 255.0]]))
  return np.stack(feats)


def _labels(source, names) -> tuple[np.ndarray, np.ndarray]:
  y = np.asarray([[source[i]["labels"][n] for n in names] for i in range(len(source))], np.float64)
  mask = np.isfinite(y) & (y != -1)
  return np.where(mask, y, 0.0), mask.astype(np.float32)


def advise(data_cfg, labels: list[str], *, train_split: str = "train", eval_split: str = "validation",
           max_examples: int = 2000) -> list[Advice]:
  from radjax.data.sources import get_source
  from radjax.eval.features import report_features, split_reports
  from radjax.eval.probe import linear_probe

  class Head:  # the first max_examples of a split, for a bounded cost on large datasets
    def __init__(self, source):
      self.source, self.n = source, min(len(source), max_examples)

    def __len__(self):
      return self.n

    def __getitem__(self, i):
      return self.source[i]

    def report(self, i):
      return self.source.report(i) if hasattr(self.source, "report") else self.source[i]["report"]

  train, held = Head(get_source(data_cfg, train_split)), Head(get_source(data_cfg, eval_split))
  text_tr, others = report_features(split_reports(train), {"eval": split_reports(held)})
  text_ev = others["eval"]
  img_tr, img_ev = _pixel_features(train), _pixel_features(held)
  y_tr, m_tr = _labels(train, labels)
  y_ev, m_ev = _labels(held, labels)
  out = []
  for k, name in enumerate(labels):
    counts = {split: (int(np.sum(m[:, k] * y[:, k])), int(np.sum(m[:, k] * (1 - y[:, k]))))
              for split, y, m in ((train_split, y_tr, m_tr), (eval_split, y_ev, m_ev))}
    lacking = [f"the {split} split has {pos} positive and {neg} negative examples"
               for split, (pos, neg) in counts.items() if min(pos, neg) == 0]
    if lacking:  # the probes or their AUROCs would be undefined: no number to decide on
      out.append(Advice(name, math.nan, math.nan, math.nan, math.nan, "undecided", False,
                        f"no advice: {'; '.join(lacking)} (the probes need both)"))
      continue

    def probe(xtr, xev):
      scores = linear_probe(xtr, y_tr[:, k:k + 1], m_tr[:, k:k + 1], xev, task_kind="binary")
      return np.asarray(scores).reshape(len(xev), -1)[:, -1]
    text, image = probe(text_tr, text_ev), probe(img_tr, img_ev)
    both = probe(np.hstack([img_tr, text_tr]), np.hstack([img_ev, text_ev]))
    score = lambda p: auroc(p, y_ev[:, k], m_ev[:, k])
    out.append(recommend(name, score(text), score(image), score(both),
                         within_class_correlation(text, image, y_ev[:, k], m_ev[:, k])))
  return out


def main(config, task: str | None = None) -> list[Advice]:
  from radjax.data.pipeline import label_names
  names = [task] if task else list(label_names(config.data))
  advice = advise(config.data, names)
  print(f"{'label':<20} {'text':>6} {'image':>6} {'both':>6} {'r':>6}  pre-train   distill")
  for a in advice:
    print(f"{a.label:<20} {a.text_auroc:6.3f} {a.image_auroc:6.3f} {a.both_auroc:6.3f} "
          f"{a.text_image_r:+6.2f}  "
          f"{a.pretrain:<10}  {'yes' if a.distill else 'no'}")
  for a in advice:
    if a.pretrain == "undecided":
      print(f"\n{a.label}: {a.reason}.")
    else:
      print(f"\n{a.label}: pre-train with {a.pretrain}; distillation: {'yes' if a.distill else 'no'}. "
            f"Why: {a.reason}.")
  # Strict JSON for machines: an undefined AUROC is null, not NaN.
  rows = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in dataclasses.asdict(a).items()}
          for a in advice]
  print("\n" + json.dumps(rows, allow_nan=False))
  return advice
