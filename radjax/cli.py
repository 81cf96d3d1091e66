"""The ``radjax`` command.

Every subcommand that takes ``--config FILE.py[:ARG]`` also takes any number of
``--config.key=value`` overrides; an unknown key fails before any work starts.
Heavy modules are imported inside each subcommand so ``radjax --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from radjax import compile_cache, host_malloc, paths, xla_flags
from radjax.config import ConfigError, load_config, parse_overrides


def _config_from(args, extra: list[str]):
  return load_config(args.config, parse_overrides(extra))


def cmd_train(args, extra):
  config = _config_from(args, extra)
  # jax.distributed must initialise before anything touches a device: loop.train does it first.
  from radjax.train import loop
  try:
    result = loop.train(config, args.workdir)
  except (loop.NonFiniteError, loop.ConfigMismatchError) as e:
    print(f"radjax train: {e}", file=sys.stderr)
    return 1
  if result.get("preempted"):
    print(f"radjax train: preempted at step {result['step']}; checkpoint saved, rerun to resume",
          file=sys.stderr)
  scalars = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
  print(json.dumps(scalars, sort_keys=True))
  return 0


def cmd_study(args, extra):
  config = _config_from(args, extra)
  from radjax.eval import study
  study.run_study(config, args.workdir, workers=args.workers)


def cmd_advise(args, extra):
  config = _config_from(args, extra)
  from radjax.eval import advise
  advise.main(config, task=args.task)


def _open_classifier(args, overrides=()):
  from radjax.eval import classifier
  return classifier.open_classifier(args.workdir, model_file=args.model, checkpoint=args.checkpoint,
                                    overrides=overrides, operating_point=args.operating_point)


def cmd_evaluate(args, extra):
  from radjax.eval import evaluation, exported
  try:
    by = tuple(a for a in (args.by or "").split(",") if a)
    result = evaluation.evaluate(_open_classifier(args, parse_overrides(extra)), args.split, n_boot=args.n_boot,
                                 by=by, min_group=args.min_group)
  except (FileNotFoundError, exported.UnreadableExport) as e:
    print(f"radjax evaluate: {e}", file=sys.stderr)
    return 2
  print(evaluation.format_evaluation(result))
  folder = result["workdir"] or os.path.dirname(result["model_file"])
  out = args.out or os.path.join(folder, f"evaluation_{result['dataset']}_{args.split}.json")
  evaluation.write_evaluation(result, out)
  print(f"wrote {out}")


def cmd_predict(args, extra):
  from radjax.data import dicom
  from radjax.eval import classifier, exported
  if extra:
    raise ConfigError(f"predict reads the classifier's own config; overrides {extra} do not apply")
  try:  # everything that can fail on the inputs, before the output is opened
    deployed = _open_classifier(args)
    read_image = deployed.image_reader()
    files = classifier.image_files(args.images, read_image.suffixes)
    if any(dicom.reads_as_dicom(f) for f in files):
      dicom.require_pydicom()
  except (FileNotFoundError, ImportError, exported.UnreadableExport) as e:
    print(f"radjax predict: {e}", file=sys.stderr)
    return 2
  print(f"radjax predict: {len(files)} file(s), {deployed.workdir or deployed.model_file} "
        f"({deployed.description})", file=sys.stderr)
  out = open(args.out, "w", newline="") if args.out else sys.stdout
  try:
    scored, failed = classifier.write_predictions(deployed, files, out, read_image=read_image,
                                                   batch_size=args.batch)
  finally:
    if args.out:
      out.close()
  print(f"radjax predict: scored {scored} image(s)" + (f" into {args.out}" if args.out else "")
        + (f"; {failed} file(s) could not be read (their rows name the error)" if failed else ""),
        file=sys.stderr)
  return 1 if failed else 0


def cmd_export(args, extra):
  from radjax.eval import classifier, evaluation
  if extra:
    raise ConfigError(f"export writes the run as it was trained; overrides {extra} do not apply")
  try:
    meta = classifier.export_classifier(args.workdir, args.out, args.checkpoint, args.operating_point)
  except FileNotFoundError as e:
    print(f"radjax export: {e}", file=sys.stderr)
    return 2
  print(f"radjax export: wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB; "
        f"{', '.join(meta['labels'])}; {meta['source']['checkpoint']}; runs on {', '.join(meta['platforms'])})")
  if meta["operating_point"]:
    print(evaluation.format_operating_point(meta["operating_point"]))
  return 0


def cmd_data_build(args, extra):
  from radjax.data import build
  builder_kwargs = build.key_values(args.builder_arg, "--builder_arg")
  builder_fields = build.key_values(args.builder_config, "--builder_config")
  if args.config:
    if "=" in args.config and not args.config.split(":")[0].endswith(".py"):
      raise ConfigError(f"--config {args.config}: --config takes a config file (configs/FILE.py); "
                        "builder config fields go in --builder_config KEY=VALUE")
    data_cfg = _config_from(args, extra).data
    if args.dataset != data_cfg.dataset:
      raise ConfigError(f"--dataset {args.dataset} differs from the config's data.dataset {data_cfg.dataset}")
    if args.dataset != "synth_cxr":
      raise ConfigError(f"--config sets SynthCXR's knobs (data.synth); {args.dataset} takes its build "
                        "settings from --builder_config KEY=VALUE")
    if builder_fields:
      raise ConfigError("give SynthCXR's knobs either in --config or in --builder_config, not both")
    from radjax.data.builders.synth_cxr import config_from_data_config
    builder_kwargs["config"] = config_from_data_config(data_cfg)
  elif extra:
    raise ConfigError(f"overrides {extra} need --config")
  if builder_fields:
    builder_kwargs["config"] = builder_fields
  try:
    build.build_dataset(args.dataset, args.data_dir, manual_dir=args.manual_dir, strict=args.strict,
                        builder_kwargs=builder_kwargs, num_workers=args.num_workers,
                        progress=not args.no_progress)
  except (ValueError, FileNotFoundError) as e:  # a strict build's DataQualityError included
    print(f"radjax data build: {e}", file=sys.stderr)
    return 2


def _data_config(args, extra):
  from radjax import defaults
  if args.config:
    data_cfg = _config_from(args, extra).data
  else:
    if extra:
      raise ConfigError(f"overrides {extra} need --config")
    data_cfg = defaults.data_config()
  data_cfg.unlock()
  data_cfg.dataset = args.dataset
  if args.data_dir:
    data_cfg.data_dir = args.data_dir
  data_cfg.lock()
  return data_cfg


def cmd_data_show(args, extra):
  from radjax.data import show
  path = show.show(_data_config(args, extra), args.out, n=args.n, split=args.split, seed=args.seed)
  print(f"wrote {path}")


def cmd_bench(args, extra):
  from radjax import bench
  return bench.main(args, extra)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="radjax",
      description="Train medical image classifiers that use radiology reports at training time only.",
      epilog="Any --config.KEY=VALUE argument overrides a field of the --config file.")
  sub = parser.add_subparsers(dest="command", required=True)

  def with_config(p, required=True, help="configs/FILE.py[:ARG]"):
    p.add_argument("--config", required=required, help=help)
    return p

  p = with_config(sub.add_parser("train", help="pre-train or fine-tune one model from a config"))
  p.add_argument("--workdir", required=True, help="checkpoints, metrics and the config go here")
  p.set_defaults(func=cmd_train)

  p = with_config(sub.add_parser("study", help="run the study grid (the main job)"))
  p.add_argument("--workdir", required=True)
  p.add_argument("--workers", type=int, default=1, help="cells run in this many parallel processes")
  p.set_defaults(func=cmd_study)

  p = with_config(sub.add_parser("advise", help="should this task use reports, and how?"))
  p.add_argument("--task", default=None, help="label name; default: every label of the config's task")
  p.set_defaults(func=cmd_advise)

  def with_run(p, exported=True):
    which = p.add_mutually_exclusive_group(required=True) if exported else p
    which.add_argument("--workdir", required=not exported, help="a fine-tuning run (method supervised)")
    if exported:
      which.add_argument("--model", help="a classifier file `radjax export` wrote")
    p.add_argument("--checkpoint", choices=["auto", "best", "latest"], default="auto",
                   help="auto: the best checkpoint when the run kept one, else the latest")
    p.add_argument("--operating_point", default=None, metavar="RULE",
                   help="decision thresholds per label, chosen on the run's validation split: "
                        "sensitivity=P (the most specific threshold finding at least P of the positives), "
                        "specificity=P, youden, or threshold=T" + (
                            "; an exported file decides at the thresholds it was exported with"
                            if exported else ""))
    return p

  p = with_run(sub.add_parser("evaluate", help="AUROC of a fine-tuned classifier on a split, with intervals"))
  p.add_argument("--split", default="test")
  p.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
  p.add_argument("--by", default=None, metavar="ATTRIBUTES",
                 help="also score each group of these attributes apart, e.g. view,sex (SynthCXR: view, "
                      "sex, age; MIMIC-CXR: view, and sex, age in a demographics=true build; image_table: "
                      "the columns its build names as attributes)")
  p.add_argument("--min_group", type=int, default=20,
                 help="with --by: groups of fewer examples are counted, not scored or named")
  p.add_argument("--out", default=None, help="JSON path (default: WORKDIR/evaluation_DATASET_SPLIT.json)")
  p.set_defaults(func=cmd_evaluate)

  p = with_run(sub.add_parser("predict", help="label probabilities for image files: the deployed model"))
  p.add_argument("images", nargs="+", help="image files (PNG, JPEG, TIFF, DICOM, ...) or folders of them")
  p.add_argument("--out", default=None, help="CSV path (default: standard output)")
  p.add_argument("--batch", type=int, default=32)
  p.set_defaults(func=cmd_predict)

  p = with_run(sub.add_parser("export", help="the classifier as one file: weights and a portable "
                                             "program (jax.export) for CPU and CUDA"), exported=False)
  p.add_argument("--out", required=True, help="the file to write, e.g. runs/ft/classifier.radjax")
  p.set_defaults(func=cmd_export)

  data = sub.add_parser("data", help="build or look at datasets").add_subparsers(dest="data_command", required=True)
  p = with_config(data.add_parser("build", help="materialise a dataset as ArrayRecord (TFDS)"), required=False,
                  help="configs/FILE.py[:ARG]: build the SynthCXR its data.synth describes")
  p.add_argument("--dataset", required=True)
  p.add_argument("--data_dir", required=True)
  p.add_argument("--manual_dir", default=None, help="your local copy of a credentialed dataset")
  p.add_argument("--strict", action="store_true", help="fail on the first unreadable or malformed input")
  p.add_argument("--num_workers", type=int, default=0, help="threads decoding and resizing inputs")
  p.add_argument("--builder_config", action="append", default=[], metavar="KEY=VALUE",
                 help="a field of the dataset's build settings, e.g. views=PA or image_size=512 "
                      "(repeatable; builds a named variant beside the default)")
  p.add_argument("--builder_arg", action="append", default=[], metavar="KEY=VALUE",
                 help="where the builder finds other inputs, e.g. mimic_iv_dir=~/physionet/mimiciv/3.1, "
                      "reports=~/physionet/mimic-cxr-reports.zip or volume_dir=... (repeatable)")
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  p.set_defaults(func=cmd_data_build)
  p = with_config(data.add_parser("show", help="render a grid of images with impressions and labels"), required=False)
  p.add_argument("--dataset", default="synth_cxr")
  p.add_argument("--data_dir", default=None)
  p.add_argument("--out", required=True)
  p.add_argument("--n", type=int, default=16)
  p.add_argument("--split", default="train")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(func=cmd_data_show)

  bench = sub.add_parser("bench", help="throughput, MFU and memory").add_subparsers(dest="bench_command", required=True)
  p = with_config(bench.add_parser("step", help="time the train step of a method"))
  p.add_argument("--method", default=None, help="override config.method.name")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="trace the timed steps into DIR and print where the time goes, op by op")
  p.add_argument("--json", action="store_true")
  p.set_defaults(func=cmd_bench)
  p = with_config(bench.add_parser("data", help="loader examples/s per worker count"), required=False)
  p.add_argument("--dataset", default="synth_cxr")
  p.add_argument("--data_dir", default=None)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--json", action="store_true")
  p.set_defaults(func=cmd_bench)
  p = with_config(bench.add_parser("compare", help="radjax vs a PyTorch peer on the same step"))
  p.add_argument("--peer", default="open_clip")
  p.add_argument("--method", default=None)
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json", action="store_true")
  p.set_defaults(func=cmd_bench)
  return parser


def main(argv: list[str] | None = None) -> int:
  if argv is None:  # the process's own command line: safe to re-execute it
    host_malloc.reexec_with_malloc_defaults()
  xla_flags.apply_default_xla_flags()  # before any command imports jax
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  unknown = [a for a in extra if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognised arguments: {' '.join(unknown)}")
  compile_cache.enable()  # after parsing: --help and a mistyped command create no cache folder
  try:
    return args.func(args, extra) or 0
  except ConfigError as e:
    print(f"radjax: config error: {e}", file=sys.stderr)
    return 2
  except paths.RemotePathError as e:
    print(f"radjax: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
