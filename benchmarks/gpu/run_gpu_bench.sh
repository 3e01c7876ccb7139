#!/usr/bin/env bash
# Run the zrecipe (mlx[cuda]) vs PyTorch bf16 LoRA-step comparison on an H100/H200 machine with no network.
#
#   bash benchmarks/gpu/run_gpu_bench.sh [extra gpu_bench.py args, e.g. --steps 20]
#
# Needs, on the GPU machine: Python 3.10+ and a CUDA build of PyTorch (plus diffusers) if the PyTorch side
# is wanted; mlx[cuda] is installed offline from benchmarks/gpu/wheels/ (see README.md for how to fill it).
# Writes the numbers to ${OUT:-.}/gpu_bench.json and prints a summary. Exit status 0 only if zrecipe ran.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${OUT:-$root}"
cd "$root"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi unavailable"

if ! python -c "import mlx.core as mx; assert mx.cuda.is_available()" 2>/dev/null; then
    if compgen -G "$here/wheels/*.whl" >/dev/null; then
        # Offline install: only the wheels that travelled with the script, never an index.
        python -m pip install --no-index --find-links "$here/wheels" "mlx[cuda]" 2>&1 | tail -2
    else
        echo "mlx[cuda] is not installed and $here/wheels has no wheels: see benchmarks/gpu/README.md" >&2
        exit 1
    fi
fi
python -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"
# zrecipe itself runs from the source tree (no install needed); its pure-Python deps are imported lazily.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

extra=()
if ! python -c "import torch, diffusers; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "PyTorch with CUDA or diffusers missing: running the zrecipe side only" >&2
    extra+=(--skip-torch)
fi
python "$here/gpu_bench.py" --json "$out/gpu_bench.json" "${extra[@]}" "$@"
