"""Full fine-tuning starts from the pre-trained image encoder (method.init_from)."""

import jax
import numpy as np
import pytest
from flax import nnx

from radjax.config import ConfigError, load_config
from radjax.train import loop
from radjax.train.checkpoint import load_pretrained

TINY = [
    "--config.train.batch_size=8", "--config.train.checkpoint_every=1", "--config.train.progress=False",
    "--config.train.eval_every=0", "--config.data.synth.n_pretrain=32", "--config.data.synth.n_train=32",
    "--config.data.synth.image_size=32", "--config.data.image_size=32", "--config.data.max_text_len=32",
    "--config.data.vocab_size=300", "--config.model.image.width=32", "--config.model.image.depth=1",
    "--config.model.image.num_heads=2", "--config.model.image.mlp_dim=64",
    "--config.model.text.hidden_size=32", "--config.model.text.num_layers=1",
    "--config.model.text.num_heads=2", "--config.model.text.intermediate_size=64",
    "--config.model.embed_dim=32",
]


def _leaves(module):
  return jax.tree.leaves(nnx.state(module, nnx.Param))


def test_init_from_accepts_a_run_saved_before_new_image_keys():
  """A pre-training run saved before model.image gained keys (style, blocks, attn_heads) used
  their defaults; a saved config holds lists where the live one has tuples. Neither is a
  difference, a changed value is."""
  import ml_collections
  from radjax.methods.supervised import _image_model
  config = load_config("configs/pretrain_synth.py:clip", [])
  old = config.model.image.to_dict()
  for key in ("style", "blocks", "attn_heads"):
    del old[key]
  saved = ml_collections.ConfigDict({"model": {"image": old}})
  assert _image_model(saved) == _image_model(config)
  saved.model.image.width = config.model.image.width + 1
  assert _image_model(saved) != _image_model(config)


def test_full_finetuning_starts_from_the_pretrained_encoder(tmp_path):
  pre = load_config("configs/clip_synth.py", TINY + ["--config.train.steps=2"])
  loop.train(pre, str(tmp_path / "clip"))
  pretrained, _ = load_pretrained(str(tmp_path / "clip"))

  # lr = 0: one step changes nothing, so the fine-tuned encoder must equal the pre-trained one.
  ft = load_config("configs/finetune_synth.py", TINY + [
      "--config.train.steps=1", "--config.optim.lr=0", f"--config.method.init_from={tmp_path / 'clip'}"])
  loop.train(ft, str(tmp_path / "ft"))
  finetuned, _ = load_pretrained(str(tmp_path / "ft"))
  for a, b in zip(_leaves(pretrained.image_encoder), _leaves(finetuned.image_encoder)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  scratch = load_config("configs/finetune_synth.py", TINY + ["--config.train.steps=1", "--config.optim.lr=0"])
  loop.train(scratch, str(tmp_path / "scratch"))
  from_scratch, _ = load_pretrained(str(tmp_path / "scratch"))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(_leaves(pretrained.image_encoder), _leaves(from_scratch.image_encoder)))


def test_init_from_with_another_architecture_names_the_difference(tmp_path):
  pre = load_config("configs/clip_synth.py", TINY + ["--config.train.steps=1"])
  loop.train(pre, str(tmp_path / "clip"))
  ft = load_config("configs/finetune_synth.py", TINY + [
      "--config.train.steps=1", "--config.model.image.width=64", f"--config.method.init_from={tmp_path / 'clip'}"])
  with pytest.raises(ValueError, match="model.image"):
    loop.train(ft, str(tmp_path / "ft"))
