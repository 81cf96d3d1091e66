"""The study on SynthCXR: pre-training x fine-tuning x task x n_train x seed (the main job).

radjax study --config configs/study_synthetic.py --workdir runs/study          # ~20 min, 2 CPU cores
radjax study --config configs/study_synthetic.py:quick --workdir runs/quick    # ~2.5 min, a first look
"""

import ml_collections

from radjax import defaults


def study_config() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.pretrain = ("none", "ssl", "clip", "mrm", "clip_ssl")
  # linear, self_distill and distill fit heads on frozen features (seconds a cell); "full" fine-tunes
  # the whole encoder per cell (a training run each: for accelerators, or few cells on a CPU).
  # self_distill is distill with an image-only teacher: the control that shows how much of
  # distillation's gain is the report's.
  s.finetune = ("linear", "self_distill", "distill")
  # A label group ("diagnostic", "prognostic") or a single label name.
  s.tasks = ("diagnostic", "mortality_12m")
  s.n_train = (50, 200, 1000, -1)  # -1 = every labelled training example
  s.seeds = (0, 1, 2)  # fine-tuning seeds: the labelled subset and the heads' fits
  # Pre-training seeds: each pre-training method trains once per seed (config.seed + k), and every
  # cell runs on each. Several make the intervals cover pre-training too: on SynthCXR one run of
  # clip moved mortality AUROC by up to 0.048 (BUILD_NOTES.md, "Pre-training variance"). Each seed
  # costs a pre-training run per method (~3.5 min each on 2 CPU cores).
  s.pretrain_seeds = (0,)
  s.distill_lambda = 0.5
  s.distill_temperature = 2.0
  # The teacher's soft targets on the training examples come from this many cross-fitted folds.
  s.teacher_folds = 3
  # Heads (linear, the teacher, the distilled student): L2-penalised logistic regression solved by
  # L-BFGS. head_l2: () = scikit-learn's default penalty (C = 1); one value = that penalty (on the
  # mean loss); several = cross-validated with head_cv_folds folds (slower: a fit per value and fold).
  s.head_l2 = ()
  # The teacher's penalty, cross-validated over this grid on the cell's labelled examples (same
  # form as head_l2). Its soft targets are only as good as its fit, and at C = 1 a teacher on
  # ~2800 image + report columns overfits them (BUILD_NOTES.md, "The teacher's penalty").
  s.teacher_l2 = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
  s.head_cv_folds = 3
  s.head_steps = 100
  # "full" fine-tuning: steps (batch train.batch_size) and peak learning rate.
  s.full_steps = 200
  s.full_lr = 1e-3
  s.feature_batch_size = 256
  s.n_boot = 200
  # "knob=v1,v2;knob2=w1,w2" over data.synth knobs: one study per combination (see
  # configs/study_text_association.py); empty = a single study.
  s.sweep = ""
  return s


def get_config(arg=None):
  config = defaults.pretrain_config()
  config.study = study_config()
  # configs/pretrain_synth.py's CPU ViT (16 px patches on 64 px films): small enough to
  # pre-train five ways in minutes on two CPU cores, and it learns within those minutes.
  config.model.image.update(dict(patch_size=16, width=128, depth=4, mlp_dim=512, num_heads=4))
  config.train.steps = 400
  config.train.batch_size = 64
  config.train.checkpoint_every = 100
  if arg == "quick":
    config.data.synth.n_pretrain = 1024
    config.data.synth.n_train = 1000
    config.data.synth.n_test = 500
    config.train.steps = 25
    config.train.checkpoint_every = 25
    config.study.n_train = (50, -1)
    config.study.head_steps = 50
    config.study.seeds = (0,)
    config.study.n_boot = 100
  elif arg:
    raise ValueError(f"configs/study_synthetic.py: unknown argument {arg!r} (use nothing or 'quick')")
  return config
