#!/usr/bin/env bash
# One device-machine session (H100/H200 with Python 3.12, PyTorch and CUDA 13 libraries; no network).
#
#   bash benchmarks/gpu/device_session.sh [bench] [build] [parity]     (default: all three, in that order)
#
# Installs the carried mlx[cuda] (make .whl/ first with benchmarks/gpu/pack_wheels.sh; carry .whl), then
#   bench:  the LoRA-step benchmark, zrecipe (mlx[cuda]) vs diffusers (PyTorch), bf16 (gpu_bench.py);
#   build:  the embedded default recipe end to end on the GPU, keeping its build report;
#   parity: the fp32 parity tests against diffusers/transformers with MLX on the GPU (MLX_ENABLE_TF32=0).
# Each part has its own time limit (BENCH_S 200, BUILD_S 200, PARITY_S 420 seconds by default) and the
# next runs whatever happens; all three can exceed one 10-minute device call, so run `bench build` and
# `parity` as two calls. Logs and JSON go to $OUT.
set -u
out="${OUT:-/tmp/zrecipe-gpu}"; mkdir -p "$out"
parts="${*:-bench build parity}"
exec > >(tee "$out/device_log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python3 -m pip install -q --no-index --no-deps --no-compile .whl/mlx-*.whl .whl/diffusers-*.whl || exit 1
python3 -c "import tarfile, sys; tarfile.open('.whl/mlxcuda.tar.xz').extractall(sys.argv[1])" "$site" || exit 1
python3 - <<'PY' || exit 1
import mlx.core as mx, time
print("mlx", mx.__version__, mx.default_device(), "cuda:", mx.cuda.is_available())
a = mx.random.normal((4096, 4096)).astype(mx.bfloat16); mx.eval(a @ a)
t = time.perf_counter(); [mx.eval(a @ a) for _ in range(20)]; dt = (time.perf_counter() - t) / 20
print(f"mlx bf16 4096^3 matmul: {2 * 4096**3 / dt / 1e12:.0f} TFLOP/s")
PY
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for part in $parts; do
  echo "== $part $(date +%T)"
  case $part in
    bench) timeout "${BENCH_S:-200}" python3 benchmarks/gpu/gpu_bench.py --json "$out/gpu_bench.json" ;;
    build)
      work=$(mktemp -d); cp -r recipes "$work/"
      ( cd "$work" && time timeout "${BUILD_S:-200}" python3 -m zrecipe.cli.main build recipes/tiny.yaml 2>&1 | tail -8 )
      cp "$work"/recipes/output/tiny/build-report.json "$out/" 2>/dev/null ;;
    parity)
      MLX_ENABLE_TF32=0 timeout "${PARITY_S:-420}" python3 -m pytest -p no:cacheprovider -rf --durations=5 \
        tests/test_transformer_parity.py tests/test_vae_parity.py tests/test_text_encoder_parity.py \
        tests/test_generate_parity.py > "$out/parity_log.txt" 2>&1
      echo "pytest rc=$?"; grep -E "passed|failed|FAILED|^E " "$out/parity_log.txt" | head -30 ;;
  esac
done
echo "== done $(date +%T)"
