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
  distillation from a report-seeing teacher can help more;
* the report nearly determines it (text AUROC >= ``overly_predictive``): alignment
  helps, but distillation's gain vanishes (the teacher's soft targets are the labels).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from radjax.eval.metrics import auroc

WEAK_TEXT = 0.65
OVERLY_PREDICTIVE = 0.97


@dataclasses.dataclass
class Advice:
  label: str
  text_auroc: float
  image_auroc: float
  both_auroc: float
  pretrain: str
  distill: bool
  reason: str


def recommend(label: str, text_auroc: float, image_auroc: float, both_auroc: float, *,
              weak_text: float = WEAK_TEXT, overly_predictive: float = OVERLY_PREDICTIVE) -> Advice:
  """The decision rule (pure; see module docstring)."""
  if text_auroc < weak_text and text_auroc <= image_auroc + 0.02:
    return Advice(label, text_auroc, image_auroc, both_auroc, "clip_ssl", False,
                  f"the report barely represents {label} (text-only AUROC {text_auroc:.3f} vs image-only "
                  f"{image_auroc:.3f}): alignment alone risks discarding the image signal, so add "
                  "self-supervision; a report-seeing teacher adds little")
  if text_auroc >= overly_predictive:
    return Advice(label, text_auroc, image_auroc, both_auroc, "clip", False,
                  f"the report nearly determines {label} (text-only AUROC {text_auroc:.3f}): alignment "
                  "uses it well, but a teacher that sees it only repeats the labels, so distillation "
                  "is not expected to help")
  gain = both_auroc - image_auroc
  return Advice(label, text_auroc, image_auroc, both_auroc, "clip" if text_auroc >= 0.8 else "clip_ssl",
                gain > 0.02,
                f"the report represents {label} (text-only AUROC {text_auroc:.3f}) without giving it away; "
                f"image + report reaches {both_auroc:.3f} vs image alone {image_auroc:.3f} "
                f"({gain:+.3f}), so " + ("distill from a report-seeing teacher" if gain > 0.02 else
                                        "a teacher adds little over the image"))


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
    def probe(xtr, xev):
      scores = linear_probe(xtr, y_tr[:, k:k + 1], m_tr[:, k:k + 1], xev, task_kind="binary")
      return auroc(np.asarray(scores).reshape(len(xev), -1)[:, -1], y_ev[:, k], m_ev[:, k])
    out.append(recommend(name, probe(text_tr, text_ev), probe(img_tr, img_ev),
                         probe(np.hstack([img_tr, text_tr]), np.hstack([img_ev, text_ev]))))
  return out


def main(config, task: str | None = None) -> list[Advice]:
  from radjax.data.pipeline import label_names
  names = [task] if task else list(label_names(config.data))
  advice = advise(config.data, names)
  print(f"{'label':<20} {'text':>6} {'image':>6} {'both':>6}  pre-train   distill")
  for a in advice:
    print(f"{a.label:<20} {a.text_auroc:6.3f} {a.image_auroc:6.3f} {a.both_auroc:6.3f}  "
          f"{a.pretrain:<10}  {'yes' if a.distill else 'no'}")
  for a in advice:
    print(f"\n{a.label}: pre-train with {a.pretrain}; distillation: {'yes' if a.distill else 'no'}. "
          f"Why: {a.reason}.")
  print("\n" + json.dumps([dataclasses.asdict(a) for a in advice]))
  return advice
