"""Grain pipeline: batch contract, sharding, resumption, label policy, subsets, TFDS round trip, show/bench."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from radjax import defaults
from radjax.data import pipeline, sampling, sources
from radjax.data.tokenizer import get_tokenizer


def _cfg(n_train: int = 40, size: int = 32):
  cfg = defaults.data_config()
  cfg.image_size = size
  cfg.synth.image_size = size
  cfg.synth.n_pretrain = 200
  cfg.synth.n_train = n_train
  cfg.synth.n_validation = 10
  cfg.synth.n_test = 10
  return cfg


@pytest.fixture(scope="module")
def tok():
  return get_tokenizer(_cfg())


def _indices(it) -> list[int]:
  return [int(i) for b in it for i in b["index"]]


def _equal(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_contract(tok):
  cfg = _cfg()
  cfg.max_text_len = 24
  b = next(pipeline.make_loader(cfg, "train", batch_size=8, seed=0, train=True, tokenizer=tok))
  assert b["image"].shape == (8, 32, 32, 1) and b["image"].dtype == np.float32
  assert b["text_ids"].shape == b["text_mask"].shape == (8, 24)
  assert b["text_ids"].dtype == b["text_mask"].dtype == np.int32
  assert b["labels"].shape == b["label_mask"].shape == (8, 8)
  assert b["labels"].dtype == b["label_mask"].dtype == np.float32
  assert b["index"].shape == (8,) and b["index"].dtype == np.int32
  assert (b["text_ids"][:, 0] == tok.cls_id).all() and (b["label_mask"] == 1).all()
  assert abs(float(b["image"].mean())) < 1.0 and 0.4 < float(b["image"].std()) < 2.0
  # Labels follow the selection; 3 channels on request; image resized to data.image_size.
  cfg.labels = "prognostic"
  cfg.channels = 3
  cfg.image_size = 40
  b = next(pipeline.make_loader(cfg, "train", batch_size=4, seed=0, train=False, tokenizer=tok))
  assert b["labels"].shape == (4, 2) and b["image"].shape == (4, 40, 40, 3)
  cfg.labels = "edema, mortality_12m"
  assert pipeline.label_names(cfg) == ("edema", "mortality_12m")
  cfg.labels = "edema,fracture"
  with pytest.raises(ValueError, match="fracture"):
    pipeline.label_names(cfg)


def test_eval_is_one_ordered_pass_with_remainder(tok):
  cfg = _cfg(n_train=21)
  batches = list(pipeline.make_loader(cfg, "train", batch_size=8, seed=0, train=False, tokenizer=tok))
  assert [len(b["index"]) for b in batches] == [8, 8, 5]
  assert _indices(batches) == list(range(21))


@pytest.mark.parametrize("train", [True, False])
def test_shards_cover_every_example_once(tok, train):
  cfg = _cfg(n_train=30)
  shards = [_indices(pipeline.make_loader(cfg, "train", batch_size=1, seed=3, train=train, tokenizer=tok,
                                          shard_index=k, shard_count=3, num_epochs=1)) for k in range(3)]
  assert sorted(sum(shards, [])) == list(range(30))
  assert all(len(s) == 10 for s in shards)
  if train:  # globally shuffled, and reshuffled in the next epoch
    assert shards[0] != list(range(0, 30, 3))
    two = _indices(pipeline.make_loader(cfg, "train", batch_size=1, seed=3, train=True, tokenizer=tok,
                                        shard_index=0, shard_count=3, num_epochs=2))
    assert two[:10] == shards[0] and sorted(two[10:]) != sorted(shards[0])
    assert sorted(sum((_indices(pipeline.make_loader(
        cfg, "train", batch_size=1, seed=3, train=True, tokenizer=tok, shard_index=k, shard_count=3,
        num_epochs=2))[10:] for k in range(3)), [])) == list(range(30))


def test_resumed_iterator_continues_exactly(tok):
  cfg = _cfg(n_train=20)
  it = pipeline.make_loader(cfg, "train", batch_size=6, seed=1, train=True, tokenizer=tok)
  for _ in range(4):  # past the first epoch boundary
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(4)]
  resumed = pipeline.make_loader(cfg, "train", batch_size=6, seed=1, train=True, tokenizer=tok)
  resumed.set_state(state)
  got = [next(resumed) for _ in range(4)]
  assert all(_equal(a, b) for a, b in zip(want, got))
  # Same seed -> same augmented batches; another seed -> others.
  a = next(pipeline.make_loader(cfg, "train", batch_size=6, seed=1, train=True, tokenizer=tok))
  b = next(pipeline.make_loader(cfg, "train", batch_size=6, seed=2, train=True, tokenizer=tok))
  assert not np.array_equal(a["index"], b["index"])


def test_worker_processes_match_in_process_and_resume(tok):
  cfg = _cfg(n_train=24)
  ref = pipeline.make_loader(cfg, "train", batch_size=4, seed=0, train=True, tokenizer=tok)
  cfg.num_workers = 1
  it = pipeline.make_loader(cfg, "train", batch_size=4, seed=0, train=True, tokenizer=tok)
  first = [next(it) for _ in range(3)]
  assert all(_equal(a, next(ref)) for a in first)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(2)]
  resumed = pipeline.make_loader(cfg, "train", batch_size=4, seed=0, train=True, tokenizer=tok)
  resumed.set_state(state)
  assert all(_equal(a, next(resumed)) for a in want)


def test_uncertainty_policy_and_missing_labels(tok):
  cfg = _cfg()
  names = ("a", "b", "c", "d")
  ex = {"a": 1.0, "b": -1.0, "c": math.nan}
  for policy, y, m in (("ignore", [1, 0, 0, 0], [1, 0, 0, 0]), ("ones", [1, 1, 0, 0], [1, 1, 0, 0]),
                       ("zeros", [1, 0, 0, 0], [1, 1, 0, 0])):
    cfg.uncertain_policy = policy
    got_y, got_m = pipeline.Preprocess(cfg, tok, False, names).labels(ex)
    assert got_y.tolist() == y and got_m.tolist() == m, policy
  cfg.uncertain_policy = "maybe"
  with pytest.raises(ValueError, match="uncertain_policy"):
    pipeline.Preprocess(cfg, tok, False, names)


def test_indices_subset_and_label_fraction_sampling(tok):
  cfg = _cfg(n_train=200)
  y = np.stack([[ex[k] for k in pipeline.label_names(cfg)] for ex in
                (sources.get_source(cfg, "train")[i]["labels"] for i in range(200))])
  small = sampling.label_fraction_indices(y, 12, seed=0)
  big = sampling.label_fraction_indices(y, 40, seed=0)
  assert len(small) == 12 and len(big) == 40 and set(small) <= set(big)
  assert (y[small].sum(0) > 0).all() and ((1 - y[small]).sum(0) > 0).all()
  assert not np.array_equal(small, sampling.label_fraction_indices(y, 12, seed=1))
  assert len(sampling.label_fraction_indices(y, None, seed=0)) == 200
  got = _indices(pipeline.make_loader(cfg, "train", batch_size=5, seed=0, train=False, tokenizer=tok,
                                      indices=small))
  assert got == sorted(small.tolist())
  with pytest.raises(ValueError, match="indices"):
    pipeline.make_loader(cfg, "train", batch_size=5, seed=0, train=False, tokenizer=tok, indices=[500])


def test_tfds_builder_roundtrip(tmp_path, tok, monkeypatch):
  from radjax.data.builders import get_builder_class
  from radjax.data.builders import synth_cxr as synth_builder
  cfg = _cfg(n_train=6)
  cfg.synth.n_pretrain, cfg.synth.n_validation, cfg.synth.n_test = 3, 2, 2
  cls = get_builder_class("synth_cxr")
  builder = cls(data_dir=str(tmp_path), config=synth_builder.config_from_data_config(cfg),
                file_format="array_record")
  builder.download_and_prepare()
  assert {s: int(i.num_examples) for s, i in builder.info.splits.items()} == {
      "pretrain": 3, "train": 6, "validation": 2, "test": 2}
  assert list((tmp_path / "synth_cxr").glob("*/1.1.0/synth_cxr-train.array_record-*"))
  built = cfg.copy_and_resolve_references()
  built.data_dir = str(tmp_path)
  for split in ("train", "test"):
    direct, stored = sources.get_source(cfg, split), sources.get_source(built, split)
    assert len(direct) == len(stored)
    for i in range(len(direct)):
      a, b = direct[i], stored[i]
      assert np.array_equal(a["image"], b["image"]) and a["image"].dtype == b["image"].dtype
      assert a["report"] == b["report"] and a["id"] == b["id"] and a["labels"] == b["labels"]
      assert a["attributes"] == b["attributes"] and set(a["attributes"]) == {"view", "sex", "age"}
  # The loader reads it the same way, attributes only where asked; a config that was not built is
  # a clear error.
  x = next(pipeline.make_loader(cfg, "train", batch_size=3, seed=0, train=False, tokenizer=tok))
  y = next(pipeline.make_loader(built, "train", batch_size=3, seed=0, train=False, tokenizer=tok))
  assert _equal(x, y) and "attributes" not in x
  y = next(pipeline.make_loader(built, "train", batch_size=3, seed=0, train=False, tokenizer=tok,
                                attributes=("sex", "view")))
  train = sources.get_source(cfg, "train")
  assert y["attributes"].tolist() == [[train[i]["attributes"][a] for a in ("sex", "view")] for i in range(3)]
  # "~" as typed in --config.data.data_dir=~/tfds, where the shell leaves it alone.
  monkeypatch.setenv("HOME", str(tmp_path))
  built.data_dir = "~"
  assert _equal(x, next(pipeline.make_loader(built, "train", batch_size=3, seed=0, train=False,
                                             tokenizer=tok)))
  built.synth.seed = 9
  with pytest.raises(ValueError, match="not built"):
    len(sources.get_source(built, "train"))


def test_default_synth_knobs_read_back_from_data_dir(tmp_path):
  # The default knobs name their build "default", like the builder's registered config.
  cfg = defaults.data_config()
  cfg.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match="not built in data.data_dir"):
    len(sources.get_source(cfg, "train"))
  cfg.builder_config = "px512_mine"  # a variant no build made: the same error, naming it
  with pytest.raises(ValueError, match="config 'px512_mine'.* is not built in data.data_dir"):
    len(sources.get_source(cfg, "train"))


def test_unknown_dataset_and_files_only_dataset():
  cfg = _cfg()
  cfg.dataset = "chexpert_plus"
  with pytest.raises(ValueError, match="synth_cxr"):
    sources.get_source(cfg, "train")
  cfg.dataset = "mimic_cxr"
  with pytest.raises(ValueError, match="data_dir"):
    sources.get_source(cfg, "train")


def test_show_and_bench(tmp_path):
  from radjax.data.bench import bench_data
  from radjax.data.show import show
  cfg = _cfg()
  out = show(cfg, str(tmp_path / "grid.png"), n=4)
  assert os.path.getsize(out) > 10_000
  res = bench_data(cfg, batch_size=4, workers_list=(0,), steps=2, warmup=1)
  assert res[0]["workers"] == 0 and res[0]["examples_per_s"] > 0


def test_synth_dataset_names_survive_knobs_added_later():
  """A knob added to SynthCXR after datasets were built leaves their names (and so the built
  data a run finds) unchanged while it is at its default."""
  import dataclasses
  import hashlib
  from radjax.data import synth_cxr
  from radjax.data.builders import synth_cxr as synth_builder
  params = synth_cxr.SynthParams(text_label_association=0.5)
  before = {k: v for k, v in dataclasses.asdict(params).items() if k != "report_image_evidence"}
  digest = hashlib.sha1(json.dumps(before, sort_keys=True).encode()).hexdigest()[:8]
  assert synth_builder.config_from_params(params).name == f"px64_tla0p5_leak0_err0p05_s0_{digest}"
  told = dataclasses.replace(params, report_image_evidence=1.0)
  assert synth_builder.config_from_params(told).name != synth_builder.config_from_params(params).name
  assert synth_builder.config_from_params(told).params() == told
