#!/usr/bin/env bash
# Issue #9's GPU checks in one call of the device tool (an H100/H200 lent for ~15 minutes):
#   run(command="bash scripts/gpu_bench.sh [PART...]", carry=[".whl"], timeout_s=...)
# PARTs, run in the order given (default: all but profile; LIMIT / TEST_LIMIT cap each step / the tests):
#   test     tests/test_gpu.py (cuDNN attention against a float32 reference)
#   b256     ViT-B/16 CLIP bf16 batch 256 with XLA and with cuDNN attention (b256_xla, b256_cudnn)
#   data     the SynthCXR loader at 224 px with 0, 8 and 16 workers: rendering on the fly, then
#            from a dataset built once (radjax data build, ArrayRecord)
#   large    ViT-B/16 at batch 1024 and 2048 with the faster attention at batch 256
#   rn50     RN50 CLIP bf16 batch 256
#   profile  3 ViT-B/16 b256 steps (faster attention) traced: op table in the JSON, trace -> $OUT/trace.tgz
# The CUDA image has jax/flax/optax/orbax but not ml_collections or grain: they travel as
# cp312 wheels in .whl/ (see BUILD_NOTES, "GPU"). Everything is written under $OUT as it goes,
# so a run cut off at its limit still returns what it measured. Most important first. Parts share
# compiled programs through radjax's compilation cache (~/.cache/radjax/xla on the device host), so
# e.g. profile after b256 loads the b256 step instead of compiling it again.
set -u
OUT=${OUT:-/tmp/gpu_bench_out}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -z "${SKIP_INSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
if ! $PY -c "import radjax.train.loop, radjax.models.vit" 2>"$OUT/import.err"; then
  echo "radjax does not import with the image's flax; using the carried flax"; cat "$OUT/import.err"
  python3 -m pip install -q --no-index --no-deps --target /tmp/site_flax .whl/fallback/*.whl
  export PYTHONPATH=$PWD:/tmp/site_flax:/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
  $PY -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

RADJAX=(-c "import sys; from radjax import cli; sys.exit(cli.main(sys.argv[1:]))")
step() {  # name timeout attention config batch [extra...]
  local name=$1 limit=$2 attn=$3 config=$4 batch=$5; shift 5
  RADJAX_GPU_ATTENTION=$attn timeout "$limit" $PY "${RADJAX[@]}" bench step \
    --config "$config" --batch "$batch" --dtype bfloat16 --steps 10 --repeats 3 --warmup 3 \
    --json "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"
  echo "$name: exit $? $($PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{r['examples_per_s']:.0f} ex/s, MFU {100*r['mfu']:.1f}% (vs measured matmul {100*(r['mfu_vs_measured_matmul'] or 0):.1f}%), step {1e3*r['step_time_s']:.1f} ms, data wait {1e3*r['data_wait_s']:.1f} ms, device peak {(r['device_peak_bytes'] or 0)/2**30:.1f} GiB, compile {r['compile_s']:.0f} s\")" "$OUT/$name.json" 2>/dev/null || tail -3 "$OUT/$name.err")"
}


part_test() {
  timeout ${TEST_LIMIT:-90} $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py >"$OUT/test_gpu.txt" 2>&1
  echo "tests/test_gpu.py: exit $?"; grep -E "passed|failed|Error|assert" "$OUT/test_gpu.txt" | tail -12
}
V=${V:-configs/bench/clip_vitb16.py}
faster() {
  $PY -c "
import json
def eps(n):
  try: return json.load(open('$OUT/'+n+'.json'))['examples_per_s']
  except Exception: return 0
print('cudnn' if eps('vit_b256_cudnn') > eps('vit_b256_xla') else 'xla')"
}
part_b256_xla() { step vit_b256_xla ${LIMIT:-150} xla $V 256; }
part_b256_cudnn() { step vit_b256_cudnn ${LIMIT:-150} cudnn $V 256; }
part_b256() { part_b256_xla; part_b256_cudnn; }
part_data() {
  timeout 150 $PY "${RADJAX[@]}" bench data --image_size 224 --batch 256 --workers 0,8,16 \
    --steps 16 2>"$OUT/data.err" | tee "$OUT/data.txt"
  timeout 120 $PY "${RADJAX[@]}" data build --config $V --dataset synth_cxr --data_dir /tmp/tfds224 \
    --num_workers 16 >/dev/null 2>>"$OUT/data.err"
  timeout 150 $PY "${RADJAX[@]}" bench data --config $V --data_dir /tmp/tfds224 --image_size 224 \
    --batch 256 --workers 0,8,16 --steps 16 2>>"$OUT/data.err" | tee -a "$OUT/data.txt"
}
part_large() { local a; a=$(faster); step vit_b1024_$a 150 "$a" $V 1024; step vit_b2048_$a 150 "$a" $V 2048; }
part_profile() {
  rm -rf /tmp/trace
  step vit_b256_profile "${LIMIT:-150}" "$(faster)" $V 256 --profile /tmp/trace \
    --steps 3 --repeats 1
  tar czf "$OUT/trace.tgz" -C /tmp trace && echo "trace: $(du -h "$OUT/trace.tgz" | cut -f1)"
}
part_rn50() { step rn50_b256 120 "$(faster)" ${R:-configs/bench/clip_rn50.py} 256; }

parts=("$@")
(( ${#parts[@]} )) || parts=(test b256 data large rn50)
for p in "${parts[@]}"; do "part_$p"; done
