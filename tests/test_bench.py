"""radjax bench: step figures on a tiny CLIP, compare without open_clip, FSDP memory scaling and the
compiled step's collectives on 8 fake CPU devices (subprocess)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from radjax import cli

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TINY = os.path.join(REPO, "configs", "bench", "clip_vitb16.py") + ":tiny"


def test_bench_step_json(capsys):
  code = cli.main(["bench", "step", "--config", TINY, "--steps", "2", "--warmup", "1",
                   "--repeats", "2", "--json"])
  assert code == 0
  out = capsys.readouterr().out.strip().splitlines()
  r = json.loads(out[-1])
  assert r["method"] == "clip" and r["batch"] == 4 and r["dtype"] == "float32"
  assert r["examples_per_s"] > 0 and len(r["examples_per_s_all"]) == 2
  assert r["step_time_s"] > 0 and 0 <= r["data_wait_s"] <= r["step_time_s"]
  fwd = r["flops_per_example_forward"]
  assert fwd["image"] > 0 and fwd["text"] > 0 and fwd["projection"] > 0
  assert r["flops_per_example"] == 3 * sum(fwd.values())
  # XLA's own count of the whole step agrees with the analytic model FLOPs to ~25% (the analytic
  # count ignores norms, softmax, the loss and the optimizer).
  assert 0.75 < r["xla_flops_per_example"] / r["flops_per_example"] < 1.5
  assert 0 < r["mfu"] < 1.5
  assert r["peak_flops_per_s"] > 0 and "measured" in r["peak_source"]
  assert r["host_peak_rss_bytes"] > 2 ** 20
  assert 0 <= r["host_minor_faults_per_step"] < r["host_peak_rss_bytes"] / 4096  # at most all of it, afresh
  assert 0 < r["host_cores_busy"] <= 1.1 * r["host_cores"]  # CPU time / wall, rusage's granularity aside
  assert r["num_params"] > 0 and r["param_bytes_per_device"] == 4 * r["num_params"]
  # AdamW: two moments per parameter (+ scalars).
  assert r["opt_bytes_per_device"] >= 2 * r["param_bytes_per_device"]
  assert r["collectives"] == {}  # one device

  from radjax.bench import step
  text = step.format_result(r)
  assert "examples/s" in text and "MFU" in text and "data wait" in text and "page faults" in text
  assert "cores busy" in text
  assert r["compilation_cache"] == os.environ["JAX_COMPILATION_CACHE_DIR"]  # the test session's
  assert f"compiled programs kept in {r['compilation_cache']}" in text
  assert set(r["host_cpu"]) == {"vendor", "model", "family", "model_number", "matmul_isa",
                               "native_bf16", "bf16_dots_faster"}
  from radjax.models import layers
  assert r["cpu_matmuls"] == layers.cpu_matmul_path() and f"; matmuls {r['cpu_matmuls']}" in text


def test_describe_cpu():
  from radjax.hostcpu import describe_cpu, format_cpu
  xeon = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 207\n"
          "model name\t: Intel(R) Xeon(R) Platinum 8581C CPU @ 2.10GHz\n"
          "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
          "processor\t: 1\nmodel name\t: another\nflags\t\t: fpu\n")
  cpu = describe_cpu(xeon)
  assert cpu == {"vendor": "GenuineIntel", "model": "Intel(R) Xeon(R) Platinum 8581C CPU @ 2.10GHz", "family": 6,
                 "model_number": 207, "native_bf16": True, "bf16_dots_faster": True,
                 "matmul_isa": ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]}
  assert format_cpu(cpu) == ("Intel(R) Xeon(R) Platinum 8581C CPU @ 2.10GHz (family 6 model 207; "
                             "avx2 fma avx512f avx512_bf16 amx_tile amx_bf16; bf16 instructions)")
  # The same Xeon with its AMX tiles hidden (a hypervisor's choice): its AVX512-BF16 dots ran at
  # 0.6x XLA's float32 rate, so bf16 operands are upcast there; on AMD they run at 2x.
  no_amx = xeon.replace(" amx_bf16 amx_tile", "")
  assert describe_cpu(no_amx)["native_bf16"] and not describe_cpu(no_amx)["bf16_dots_faster"]
  assert format_cpu(describe_cpu(no_amx)).endswith(
      "avx512_bf16; bf16 instructions, slower than float32 dots)")
  zen4 = no_amx.replace("GenuineIntel", "AuthenticAMD")
  assert describe_cpu(zen4)["bf16_dots_faster"]
  assert format_cpu(describe_cpu(zen4)).endswith("avx512_bf16; bf16 instructions)")
  zen3 = "cpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: avx avx2 fma\n"
  assert not describe_cpu(zen3)["native_bf16"] and not describe_cpu(zen3)["bf16_dots_faster"]
  assert describe_cpu(zen3)["vendor"] is None
  assert format_cpu(describe_cpu(zen3)) == "AMD EPYC (family 25 model 1; avx2 fma; no bf16 instructions)"
  arm = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16\nCPU part\t: 0xd4f\n"
  cpu = describe_cpu(arm)
  assert cpu["native_bf16"] and cpu["bf16_dots_faster"] and cpu["matmul_isa"] == ["asimd", "sve", "i8mm", "bf16"]
  assert cpu["family"] is None and "no bf16" not in format_cpu(cpu)


def test_bench_step_profile_names_the_ops(tmp_path, capsys):
  """--profile: a trace in DIR and an op table whose rows are the step's HLO ops (dots and
  convolutions of the forward and backward pass, with their shapes)."""
  code = cli.main(["bench", "step", "--config", TINY, "--steps", "1", "--warmup", "1",
                   "--repeats", "1", "--profile", str(tmp_path), "--json"])
  assert code == 0
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  ops = r["ops"]
  assert ops and r["profile_dir"] == str(tmp_path)
  assert abs(sum(o["share"] for o in ops) - 1) < 1e-6
  dots = {o["pass"] for o in ops if o["primitive"] == "dot_general"}
  assert dots == {"fwd", "bwd"}
  assert all(o["shape"].startswith(("f32[", "s32[", "pred[", "u32[", "(", "bf16[")) for o in ops
             if o["shape"] != "?")
  from radjax.bench import step
  assert "ms/step" in step.format_result(r)


def test_op_table_times_and_overlap():
  """op_table on a hand-made trace: per-step times, grouping of one op kind, and the share of an
  op's time that another thread ran beside it."""
  from radjax.bench import profile
  hlo = textwrap.dedent("""\
      %ynn_fusion.1 = f32[8,4]{1,0} fusion(%a, %b), kind=kCustom, metadata={op_name="jit(step)/jvp()/dot_general"}
      %ynn_fusion.2 = f32[4,4]{1,0} fusion(%c, %d), kind=kCustom, metadata={op_name="jit(step)/transpose(jvp())/dot_general"}
      %copy.3 = f32[4,8]{1,0} copy(%e)
  """)
  ev = lambda op, tid, ts, dur: {"ph": "X", "name": op, "tid": tid, "ts": ts, "dur": dur,
                                  "args": {"hlo_op": op}}
  events = [ev("ynn_fusion.1", 1, 0, 100), ev("ynn_fusion.2", 2, 50, 100),
            ev("copy.3", 1, 200, 40), ev("ynn_fusion.1", 1, 300, 60),
            {"ph": "X", "name": "ThunkExecutor::Execute", "tid": 3, "ts": 0, "dur": 400}]
  rows = {(r["kind"], r["pass"]): r for r in profile.op_table(events, hlo, steps=2)}
  fwd, bwd, copy = rows[("ynn_fusion", "fwd")], rows[("ynn_fusion", "bwd")], rows[("copy", "?")]
  assert (fwd["shape"], fwd["count_per_step"], fwd["ms_per_step"]) == ("f32[8,4]{1,0}", 1, 0.08)
  assert (bwd["shape"], bwd["primitive"], bwd["ms_per_step"]) == ("f32[4,4]{1,0}", "dot_general", 0.05)
  # ynn_fusion.2 [50, 150) overlaps the first ynn_fusion.1 [0, 100) for 50 of its 100 us; the
  # fwd row's 160 us overlap it for the same 50.
  assert bwd["overlap"] == 0.5 and fwd["overlap"] == 50 / 160 and copy["overlap"] == 0
  assert abs(fwd["share"] - 160 / 300) < 1e-12


def test_default_xla_flags_reach_every_radjax_command():
  """radjax's CPU XLA flags are appended before jax starts, never over the user's own value of a
  flag, not with RADJAX_XLA_DEFAULTS=0 or off CPU; cli.main applies them before any command runs
  (a fresh process each)."""
  from radjax import xla_flags
  (flag, value), = xla_flags.CPU_DEFAULTS.items()
  ours = f"--{flag}={value}"

  def run(code: str, **env) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "RADJAX_XLA_DEFAULTS", "JAX_PLATFORMS")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True).stdout.splitlines()

  apply = ("import os; from radjax import xla_flags; print(xla_flags.apply_default_xla_flags()); "
           "print(os.environ.get('XLA_FLAGS', ''))")
  assert run(apply) == [f"['{ours}']", ours]
  many = "--xla_force_host_platform_device_count=8"
  assert run(apply, XLA_FLAGS=many) == [f"['{ours}']", f"{many} {ours}"]
  assert run(apply, XLA_FLAGS=f"--{flag}=true") == ["[]", f"--{flag}=true"]
  assert run(apply, RADJAX_XLA_DEFAULTS="0") == ["[]", ""]
  assert run(apply, JAX_PLATFORMS="cuda") == ["[]", ""]
  via_cli = ("import os; from radjax import cli\ntry:\n  cli.main(['--help'])\nexcept SystemExit:\n  pass\n"
             "print(os.environ.get('XLA_FLAGS', ''))")
  assert run(via_cli)[-1] == ours


def test_rn50_config_mirrors_open_clip_rn50():
  # configs/bench/clip_rn50.py builds (abstractly) open_clip RN50's model: its parameter count and
  # its convolution FLOPs are those torch counts for open_clip's (BUILD_NOTES.md, "RN50").
  import jax
  from radjax import methods
  from radjax.bench import step
  from radjax.config import load_config
  from radjax.train import state as state_lib
  cfg = load_config(os.path.join(REPO, "configs", "bench", "clip_rn50.py"))
  method = methods.get_method("clip")
  _, params, _ = state_lib.abstract_model(method, cfg)
  n = sum(x.size for x in jax.tree.leaves(params))
  # open_clip RN50: 102,007,137 parameters, less attnpool.c_proj's bias (radjax's projection
  # has none).
  assert n == 102_007_137 - 1024, n
  fwd = step.encoder_flops(cfg, method, 49408)
  # torch's FlopCounterMode on open_clip RN50's visual tower: aten.convolution 10,734,452,736.
  # The attention pool: k and v of 50 tokens, q of the mean token, one query's attention.
  attention_pool = 2 * 2 * 50 * 2048 ** 2 + 2 * 2048 ** 2 + 4 * 50 * 2048
  assert fwd["image"] == 10_734_452_736 + attention_pool
  # The text tower as open_clip computes it (every token through every layer) ...
  from radjax.models import flops as F, text_encoder_config
  text = text_encoder_config(cfg.model, vocab_size=49408, max_len=77)
  assert 5.8e9 < F.clip_text_flops(text, 77) < 6.1e9
  # ... and as radjax's CLIP computes it (pooled_only): the last block's queries, attention and
  # MLP for the EOT row only, 76 rows fewer.
  w, rows = 512, 76
  last_block_rows = rows * (2 * 2 * w * w + 4 * 77 * w + 4 * w * 4 * w)
  assert fwd["text"] == F.clip_text_flops(text, 77) - last_block_rows
  assert fwd["projection"] == 2 * 1024 * (2048 + 512)


def test_bench_data_json(capsys):
  code = cli.main(["bench", "data", "--image_size", "32", "--batch", "4", "--workers", "0",
                   "--steps", "1", "--json"])
  assert code == 0
  rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["data"]
  assert len(rows) == 1 and rows[0]["workers"] == 0 and rows[0]["examples_per_s"] > 0


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None,
                    reason="open_clip is installed here")
def test_compare_without_open_clip(capsys, monkeypatch):
  monkeypatch.delenv("RADJAX_BENCH_PEER_PYTHON", raising=False)
  with pytest.raises(SystemExit) as e:
    cli.main(["bench", "compare", "--peer", "open_clip", "--config",
              os.path.join(REPO, "configs", "bench", "clip_vitb16.py"), "--batch", "16"])
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert "open_clip_torch is not installed" in err and "pip install" in err


@pytest.mark.parametrize("native_bf16", [False, True])
def test_compare_warns_of_bf16_without_bf16_instructions(capsys, monkeypatch, native_bf16):
  """On a CPU without bf16 instructions torch's autocast step crawls: the user is told before it
  starts. Where the CPU has them, nothing is said."""
  from radjax import hostcpu
  monkeypatch.setattr("radjax.bench.compare.peer_python", lambda: None)  # stop before any run
  cpu = dict(hostcpu.host_cpu(), native_bf16=native_bf16, bf16_dots_faster=native_bf16)
  monkeypatch.setattr(hostcpu, "host_cpu", lambda: cpu)
  with pytest.raises(SystemExit) as e:
    cli.main(["bench", "compare", "--peer", "open_clip", "--config",
              os.path.join(REPO, "configs", "bench", "clip_vitb16.py"), "--dtype", "bfloat16"])
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert ("warning" in err and "no bf16 instructions" in err
          and "--dtype float32" in err) == (not native_bf16)


def test_compare_ratios():
  from radjax.bench.compare import ratios
  # The machine halves its speed after two repeats: the ratio of medians mixes the two regimes,
  # the paired ratios do not.
  r = ratios([4.0, 4.2, 2.0, 2.1, 2.2], [5.0, 5.0, 2.0, 2.0, 2.0])
  assert r["paired_ratios"] == pytest.approx([0.8, 0.84, 1.0, 1.05, 1.1])
  assert r["paired_ratio_median"] == pytest.approx(1.0)
  assert r["radjax_median"] == 2.2 and r["peer_median"] == 2.0 and r["ratio"] == pytest.approx(1.1)
  with pytest.raises(ValueError, match="one run of each side"):
    ratios([1.0, 2.0], [1.0])


def test_open_clip_model_names():
  from radjax.bench.compare import open_clip_model_name
  from radjax.config import load_config
  assert open_clip_model_name(load_config(os.path.join(REPO, "configs/bench/clip_vitb16.py"))) == "ViT-B-16"
  assert open_clip_model_name(load_config(os.path.join(REPO, "configs/bench/clip_rn50.py"))) == "RN50"


_SCALING = textwrap.dedent("""
    import json
    from radjax.bench import step
    from radjax.config import load_config
    out = {}
    for fsdp in (1, 2, 8):
      cfg = load_config(%(cfg)r, [
          ("mesh.fsdp", str(fsdp)), ("mesh.data", "-1"), ("train.batch_size", "8"),
          ("model.image.width", "128"), ("model.image.mlp_dim", "512"),
          ("model.text.hidden_size", "128"), ("model.text.intermediate_size", "512"),
          ("model.embed_dim", "128")])
      r = step.run(cfg, steps=1, warmup=0, repeats=1, measure_peak=False, keep_hlo=True)
      keep = ("param_bytes_per_device", "opt_bytes_per_device", "state_bytes_per_device",
              "collectives", "mesh", "num_params", "param_shapes")
      out[fsdp] = {k: r[k] for k in keep}
      out[fsdp]["collective_shapes"] = step.collective_shapes(r["hlo"])
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def scaling():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, "-c", _SCALING % {"cfg": TINY}], env=env,
                        capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return {int(k): v for k, v in json.loads(line[len("RESULT "):]).items()}


def test_fsdp_state_bytes_fall_as_one_over_fsdp(scaling):
  base = scaling[1]
  assert base["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert base["param_bytes_per_device"] == 4 * base["num_params"]
  for k in (2, 8):
    r = scaling[k]
    assert r["mesh"] == {"data": 8 // k, "fsdp": k, "tensor": 1}
    for key in ("param_bytes_per_device", "opt_bytes_per_device"):
      ratio = r[key] / base[key]
      # Only small tensors (norms, biases, < 64 KiB) stay replicated.
      assert 1 / k <= ratio < 1 / k + 0.04, (k, key, ratio)


def _param_sized(result, op):
  """Collectives `op` of the compiled step with a whole parameter's shape among their results."""
  params = {tuple(s) for s in result["param_shapes"] if len(s) >= 2}
  return [shapes for o, shapes in result["collective_shapes"]
          if o == op and any(tuple(s) in params for s in shapes)]


def test_compiled_step_collectives(scaling):
  # Pure data parallelism: gradients are all-reduced (XLA combines them into tuple all-reduces)
  # and no parameter is ever gathered (the only all-gathers are of the contrastive loss's
  # per-example embeddings).
  dp = scaling[1]
  assert _param_sized(dp, "all-reduce"), dp["collective_shapes"]
  assert not _param_sized(dp, "all-gather"), dp["collective_shapes"]
  for k in (2, 8):
    r = scaling[k]
    # FSDP: sharded parameters are all-gathered whole for the forward/backward ...
    assert len(_param_sized(r, "all-gather")) >= 5, (k, r["collectives"])
    # ... and gradients are reduced back onto the shards: a reduce-scatter, which XLA:CPU
    # decomposes into an all-reduce of the whole gradient followed by a dynamic slice.
    assert r["collectives"].get("reduce-scatter", 0) > 0 or _param_sized(r, "all-reduce"), (
        k, r["collectives"])
