#!/usr/bin/env bash
# Fill .whl/ (git-ignored via .git/info/exclude) with what device_session.sh installs on an H100/H200
# machine that has Python 3.12, PyTorch and the NVIDIA CUDA 13 libraries but no network:
#   mlx-<v>-cp312-*.whl, diffusers-*.whl, and mlxcuda.tar.xz (the mlx-cuda-13 wheel's files with
#   non-sm_90 GPU code zeroed by prune_fatbin.py: 21.6 MB instead of 90).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"; cd "$root"
v="${MLX_VERSION:-0.32.4}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl; tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 -d "$tmp" "mlx==$v" "mlx-cuda-13==$v" "diffusers==0.42.1"
mv "$tmp"/mlx-"$v"-*.whl "$tmp"/diffusers-*.whl .whl/
mkdir "$tmp/files" && (cd "$tmp/files" && python3 -m zipfile -e "$tmp"/mlx_cuda_13-*.whl .)
python3 benchmarks/gpu/prune_fatbin.py "$tmp/files/mlx/lib/libmlx.so"
tar -C "$tmp/files" -cf - . | xz -6 -T0 > .whl/mlxcuda.tar.xz
rm -rf "$tmp"; ls -la .whl
