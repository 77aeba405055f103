#!/usr/bin/env bash
# The GPU measurements of DESIGN.md §5 in three stages, each well inside a 10-minute command.
# Results go to $OUT (default ./gpu_out): JSON lines from bench.py and the test log.
#
#   scripts/gpu_check.sh tests   # parity suites with JAX on the GPU (float32, highest precision) + bf16 check
#   scripts/gpu_check.sh bench   # bench.py --config 2b, every case, transformers on the same GPU; cold compiles
#   scripts/gpu_check.sh warm    # the same program again in a new process: warm (persistent-cache) compiles
#   scripts/gpu_check.sh fused   # cuDNN fused attention (--attention cudnn): bf16 check, then image
#                                # and 4k cases with each kernel, in one process each
#   scripts/gpu_check.sh paged   # the engine's paged attention: Pallas kernel tests on the GPU, then
#                                # bench_engine.py with --attention xla and pallas
#
# Uses the current python3 (which must have jax with CUDA, torch, transformers and this repo's deps).
set -uo pipefail
stage=${1:?usage: gpu_check.sh tests|bench|warm|fused|paged}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export QVL_JAX_CACHE=${QVL_JAX_CACHE:-/tmp/qvl_jax_gpu_cache}
case "$stage" in
  tests)
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import jax, jaxlib, torch, transformers; print(jax.devices(), jax.__version__, torch.__version__, transformers.__version__)"
    } 2>&1 | tee "$OUT/env.txt"
    python3 -m pytest -q -x -p no:cacheprovider tests/test_text_parity.py tests/test_multimodal_parity.py \
      tests/test_generate.py tests/test_bf16.py tests/test_attention.py 2>&1 | tee "$OUT/tests.log"
    ;;
  fused)
    QVL_JAX_TEST_ATTENTION=cudnn python3 -m pytest -q -x -p no:cacheprovider tests/test_bf16.py 2>&1 | tee "$OUT/fused_tests.log"
    for impl in cudnn xla; do
      python3 scripts/bench.py --config 2b --cases image,long --no-hf --repeats 2 --new-tokens 32 \
        --attention $impl 2>&1 | tee "$OUT/bench_2b_attention_$impl.jsonl"
    done
    ;;
  paged)
    QVL_JAX_TEST_ATTENTION=pallas python3 -m pytest -q -x -p no:cacheprovider tests/test_engine.py 2>&1 | tee "$OUT/paged_tests.log"
    for impl in xla pallas; do
      python3 scripts/bench_engine.py --config 2b --slots 64 --no-static --no-transformers --attention $impl \
        2>&1 | tee "$OUT/bench_engine_paged_$impl.jsonl"
    done
    ;;
  bench)
    rm -rf "$QVL_JAX_CACHE"
    python3 scripts/bench.py --config 2b 2>&1 | tee "$OUT/bench_2b.jsonl"
    ;;
  warm)
    python3 scripts/bench.py --config 2b --cases decode1,image --no-hf --repeats 2 2>&1 | tee "$OUT/bench_2b_warm.jsonl"
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
