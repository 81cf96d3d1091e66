"""Config loading, overrides and the CLI's handling of typos."""

import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from radjax import models, paths
from radjax.config import ConfigError, load_config, parse_overrides

CONFIG = "configs/clip_synth.py"


def test_overrides_are_typed_and_nested():
  config = load_config(CONFIG, ["--config.train.batch_size=8", "--config.optim.lr=1",
                                "--config.data.augment=false", "--config.method.name", "siglip"])
  assert config.train.batch_size == 8
  assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
  assert config.data.augment is False
  assert config.method.name == "siglip"


def test_tuple_overrides_take_plain_names_and_numbers():
  config = load_config("configs/study_synthetic.py", [
      "--config.study.pretrain=none, clip", "--config.study.tasks=mortality_12m",
      "--config.study.finetune=('linear','distill')", "--config.study.pretrain_seeds=0,1",
      "--config.study.n_train=-1"])
  assert config.study.pretrain == ("none", "clip") and config.study.tasks == ("mortality_12m",)
  assert config.study.finetune == ("linear", "distill") and config.study.pretrain_seeds == (0, 1)
  assert config.study.n_train == (-1,)
  with pytest.raises(ConfigError, match="study.pretrain_seeds"):
    load_config("configs/study_synthetic.py", ["--config.study.pretrain_seeds=a,b"])


def test_config_arg_selects_variant():
  config = load_config(CONFIG + ":vitb16")
  assert config.model.image.variant == "b" and config.data.image_size == 224


def test_loaded_config_is_locked():
  config = load_config(CONFIG)
  with pytest.raises(AttributeError):
    config.train.batch_szie = 3


@pytest.mark.parametrize("key,suggestion", [("batch_szie", "batch_size"), ("train.stpes", "train.steps"),
                                            ("optim.lrr", "optim.lr")])
def test_unknown_key_names_key_and_suggests(key, suggestion):
  with pytest.raises(ConfigError) as err:
    load_config(CONFIG, [f"--config.{key}=8"])
  assert key in str(err.value) and suggestion in str(err.value)


def test_wrong_type_names_key():
  with pytest.raises(ConfigError, match="train.batch_size"):
    load_config(CONFIG, ["--config.train.batch_size=many"])


def test_parse_overrides_rejects_other_flags():
  with pytest.raises(ConfigError, match="--workdir"):
    parse_overrides(["--workdir", "x"])


def test_missing_config_file():
  with pytest.raises(ConfigError, match="no_such.py"):
    load_config("configs/no_such.py")


def test_cli_typo_fails_before_work(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "radjax.cli", "train", "--config", CONFIG, "--workdir", str(tmp_path),
       "--config.batch_szie=8"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert "batch_szie" in result.stderr and "batch_size" in result.stderr
  assert not any(tmp_path.iterdir()), "nothing may be written before the config is valid"


@pytest.mark.parametrize("command, override, message", [
    (["train", "--config", os.path.abspath(CONFIG)], "--config.data.labels=cardiomegally",
     "data.labels: unknown label(s) ['cardiomegally']"),
    (["study", "--config", os.path.abspath("configs/study_synthetic.py:quick")],
     "--config.study.tasks=diagnostc", "study.tasks: unknown task 'diagnostc'")])
def test_cli_invalid_config_value_is_one_clear_line(tmp_path, command, override, message):
  # A key that exists with a value only the code can check (a label name, a task) is still the
  # user's config: exit 2 with the key and the valid choices, no traceback, nothing written.
  workdir = tmp_path / "run"
  result = subprocess.run([sys.executable, "-m", "radjax.cli", *command, "--workdir", str(workdir),
                           override], capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  assert f"radjax: config error: {message}" in result.stderr and "known: " in result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


@pytest.mark.parametrize("command, flag", [
    (["train", "--config", os.path.abspath(CONFIG), "--workdir"], "--workdir"),
    (["study", "--config", os.path.abspath("configs/study_synthetic.py:quick"), "--workdir"], "--workdir"),
    (["data", "build", "--dataset", "synth_cxr", "--data_dir"], "--data_dir")])
def test_cli_refuses_a_url_where_it_writes_local_files(tmp_path, command, flag):
  # os.path.abspath("gs://bucket/run") is a local folder "gs:/bucket/run": the run would land on
  # the VM's disk, one copy per host, and die with it.
  result = subprocess.run([sys.executable, "-m", "radjax.cli", *command, "gs://bucket/run"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
  assert result.returncode == 2, result.stderr
  assert f"{flag} 'gs://bucket/run' is a URL" in result.stderr and "gcsfuse" in result.stderr
  assert "Traceback" not in result.stderr
  assert not any(tmp_path.iterdir()), "nothing may be written for a refused path"


def test_local_dir_expands_home_and_refuses_urls(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  assert paths.local_dir("~/runs/a") == str(tmp_path / "runs" / "a")
  assert paths.local_dir("runs/a") == os.path.join(os.getcwd(), "runs", "a")
  with pytest.raises(paths.RemotePathError, match="data.x 's3://b/c' is a URL"):
    paths.local_dir("s3://b/c", "data.x")


@pytest.mark.parametrize("spec", [
    "configs/clip_synth.py", "configs/clip_synth.py:vitb16", "configs/study_synthetic.py",
    "configs/study_synthetic.py:quick", "configs/study_text_association.py",
    "configs/study_mimic.py:vitb16", "configs/study_mimic.py:resnet50", "configs/study_inspect.py",
    "configs/pretrain_synth.py:ssl,resnet18", "configs/pretrain_synth.py:mrm,resnet50",
    "configs/finetune_synth.py", "configs/bench/clip_vitb16.py", "configs/bench/clip_rn50.py"])
def test_every_shipped_config_loads(spec):
  config = load_config(spec)
  assert config.method.name and config.data.dataset
  # Its image encoder builds (abstractly: shapes only).
  encoder = nnx.eval_shape(lambda: models.build_image_encoder(
      config.model, nnx.Rngs(0), image_size=config.data.image_size, channels=config.data.channels))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(encoder, nnx.Param))) > 1e5


def test_study_config_rejects_unknown_argument():
  with pytest.raises(ValueError, match="quikc"):
    load_config("configs/study_synthetic.py:quikc")
