"""The schema of a radjax experiment config, with defaults that run on a laptop CPU.

Config files in ``configs/`` start from :func:`pretrain_config` and change what
they need; every field here is overridable from the command line with
``--config.a.b=value`` and no other field can be added by an override.
"""

from __future__ import annotations

import ml_collections


def synth_cxr_config() -> ml_collections.ConfigDict:
  """Knobs of the SynthCXR structural causal model (see radjax/data/synth_cxr.py)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = 64
  c.n_pretrain = 4000
  c.n_train = 2000
  c.n_validation = 500
  c.n_test = 1000
  # How much of the prognostic signal the report conveys: 0 = none, 1 = most.
  c.text_label_association = 0.0
  # Probability that the report states a near-determinant of the outcome ("overly predictive text").
  c.text_leak = 0.0
  # Per-finding rate at which the radiologist misses a present finding or mentions an absent one.
  c.report_error_rate = 0.05
  # Probability that the report remarks on each notable prognostic film feature it otherwise
  # leaves out (aortic calcification, osteopenia, body habitus): 0 = never.
  c.report_image_evidence = 0.0
  # Prevalence overrides, finding name -> probability; empty keeps the built-in values.
  c.prevalence = ml_collections.ConfigDict()
  return c


def data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = "synth_cxr"
  # None reads SynthCXR directly from its random-access source; a path reads ArrayRecord built by `radjax data build`.
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  # TFDS builder config read under data_dir; None: derived from data.synth (synth_cxr) or "default".
  c.builder_config = ml_collections.FieldReference(None, field_type=str)
  c.image_size = 64
  c.channels = 1
  c.max_text_len = 128
  # Local Hugging Face tokenizer directory; None trains a WordPiece tokenizer on the dataset's reports.
  c.tokenizer = ml_collections.FieldReference(None, field_type=str)
  c.vocab_size = 2048
  # Which labels the task uses: "diagnostic", "prognostic", or a comma-separated list of label names.
  c.labels = "diagnostic"
  # CheXpert uncertain label (-1): "ignore" (masked out), "ones", "zeros".
  c.uncertain_policy = "ignore"
  c.augment = True
  c.num_workers = 0
  c.synth = synth_cxr_config()
  return c


def model_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # ViT: variant ti/s/m/b/l/h sets width/depth/mlp_dim/num_heads unless they are > 0.
  # ResNet: name="resnet", variant "18"/"50", width (0: 64), norm "group" (no batch statistics)
  # or "batch";
  # style "torchvision" or "clip" (open_clip's ModifiedResNet, attention pool of attn_heads);
  # blocks per stage when not the variant's.
  c.image = ml_collections.ConfigDict(dict(
      name="vit", variant="ti", patch_size=8, pool="cls", posemb="learned",
      width=0, depth=0, mlp_dim=0, num_heads=0, norm="group", dropout=0.0,
      style="torchvision", blocks=(), attn_heads=0))
  # name "bert" (post-LN, HF layout) or "clip_text" (open_clip's causal text tower).
  c.text = ml_collections.ConfigDict(dict(
      name="bert", hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
      # 0: the tokenizer's vocabulary size.
      vocab_size=0,
      # "" = the model's default pooling (BERT: cls; clip_text: argmax).
      pool="", dropout=0.0,
      # Local Hugging Face BERT directory to initialise from (CXR-BERT, BioClinicalBERT, ...).
      hf_path=ml_collections.FieldReference(None, field_type=str)))
  c.embed_dim = 128
  c.dtype = "float32"
  return c


def optim_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.lr = 1e-3
  c.warmup_steps = 20
  c.weight_decay = 0.05
  c.b1 = 0.9
  c.b2 = 0.999
  c.clip_norm = 1.0
  c.eps = 1e-8
  # Microbatches per step, scanned inside the jitted step (one optimizer update per step).
  # Contrastive losses see only the microbatch's negatives.
  c.grad_accum_steps = 1
  c.ema_decay = 0.0
  return c


def train_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.batch_size = 64
  c.steps = 300
  c.log_every = 10
  c.eval_every = 0
  c.eval_batches = 4
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.best_metric = ""
  # "min", "max", or "auto" (min for metrics named *loss*/*error*, else max).
  c.best_mode = "auto"
  c.progress = True
  # Splits the loop reads: pre-training uses "pretrain", fine-tuning "train".
  c.train_split = "pretrain"
  c.eval_split = "validation"
  c.async_checkpoint = True
  # Resume a workdir whose saved config differs (otherwise the run refuses, listing the keys).
  c.allow_config_change = False
  return c


def mesh_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def distributed_config() -> ml_collections.ConfigDict:
  """jax.distributed settings; all None/-1 means single process or auto-detect (TPU, SLURM)."""
  c = ml_collections.ConfigDict()
  c.coordinator_address = ml_collections.FieldReference(None, field_type=str)
  c.num_processes = -1
  c.process_id = -1
  # "auto": initialise when the config/env (JAX_COORDINATOR_ADDRESS, SLURM, MPI, TPU_WORKER_HOSTNAMES)
  # says several processes; "detect": always let jax auto-detect (Cloud TPU VM pods); "off".
  c.mode = "auto"
  return c


def method_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "clip"
  c.init_temperature = 0.07
  c.siglip_bias = -10.0
  c.mask_ratio = 0.75  # image patches masked (MAE / MRM)
  c.text_mask_ratio = 0.15  # report tokens masked (MRM)
  c.text_mask_every_occurrence = False  # MRM: mask every mention of a selected token (base.mask_tokens)
  c.ssl_weight = 1.0  # weight of the SSL term in clip_ssl
  c.decoder_dim = 128
  c.decoder_layers = 2
  # Full fine-tuning (`supervised`): start the image encoder from this pre-training workdir.
  c.init_from = ml_collections.FieldReference(None, field_type=str)
  # `supervised` on batches with teacher_logits: weight of the teacher term and its temperature.
  c.distill_lambda = 0.5
  c.distill_temperature = 2.0
  return c


def pretrain_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = method_config()
  config.data = data_config()
  config.model = model_config()
  config.optim = optim_config()
  config.train = train_config()
  config.mesh = mesh_config()
  config.distributed = distributed_config()
  return config
