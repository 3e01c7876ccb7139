"""Backend choices made once per process: a fast BLAS for MLX on Linux, and the compute dtype per device.

MLX's Linux CPU wheel links the reference BLAS (measured here: ~5 GFLOP/s fp32 matmul against ~130 with
OpenBLAS). `libmlx.so` leaves `cblas_sgemm` & co. undefined and resolves them at load time, so an OpenBLAS
loaded into the global symbol scope *before* `mlx.core` is imported wins the lookup. This module does that
on Linux only (macOS uses Accelerate/Metal and is never touched), before any MLX import, with:

- `ZRECIPE_BLAS=off` (or `0`, `reference`) to opt out, `ZRECIPE_BLAS=/path/to/libopenblas.so` to choose;
- otherwise the first OpenBLAS found among the system locations (Debian/Ubuntu `libopenblas0-pthread`,
  Fedora, Arch) and the `cmeel-openblas` PyPI package.

An OpenBLAS older than the CPU does not recognise it and falls back to its generic SSE3 ("Prescott")
kernels: measured here, Debian's 0.3.21 on a newer Xeon ran a 2048² sgemm at 11 GFLOP/s instead of ~120.
So, unless `OPENBLAS_CORETYPE` is already set, zrecipe names the kernel family the CPU's flags support
(AVX-512 → SKYLAKEX, AVX2+FMA → HASWELL) before loading it. These kernels only use instructions the CPU
reports, and the parity tests run with them. `ZRECIPE_OPENBLAS_CORETYPE=` (empty) keeps autodetection.

Importing this module is cheap (no MLX, no numpy).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from contextlib import contextmanager

_SYSTEM_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

# What configure_blas() decided, for `zrecipe doctor` / --verbose.
_blas_status: str | None = None
# The OpenBLAS that configure_blas() loaded (its thread count can be changed at run time), else None.
_openblas: ctypes.CDLL | None = None


def _cmeel_candidates() -> list[str]:
    found = []
    for entry in sys.path:
        found += glob.glob(os.path.join(entry, "cmeel.prefix", "lib", "libopenblas.so.0"))
    return found


def openblas_coretype() -> str | None:
    """The OpenBLAS kernel family this x86-64 CPU supports, from /proc/cpuinfo flags (None if unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    have = set(flags)
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= have:
        return "SKYLAKEX"
    if {"avx2", "fma"} <= have:
        return "HASWELL"
    return None


def _choose_coretype() -> str | None:
    """Set OPENBLAS_CORETYPE for this process (see the module docstring); returns what is in force."""
    if "OPENBLAS_CORETYPE" in os.environ:
        return os.environ["OPENBLAS_CORETYPE"] or None
    override = os.environ.get("ZRECIPE_OPENBLAS_CORETYPE")
    coretype = override if override is not None else openblas_coretype()
    if coretype:
        os.environ["OPENBLAS_CORETYPE"] = coretype
    return coretype or None


def configure_blas() -> str:
    """Load a fast BLAS into the global symbol scope before MLX loads (Linux only). Idempotent.

    Returns a one-line description of the BLAS MLX will use.
    """
    global _blas_status, _openblas
    if _blas_status is not None:
        return _blas_status
    choice = os.environ.get("ZRECIPE_BLAS", "").strip()
    if not sys.platform.startswith("linux"):
        _blas_status = "platform BLAS (not Linux: nothing changed)"
    elif choice.lower() in {"off", "0", "reference", "none", "false"}:
        _blas_status = "reference BLAS bundled with mlx (ZRECIPE_BLAS=off)"
    elif "mlx.core" in sys.modules:
        _blas_status = "unchanged: mlx was imported before zrecipe could select a fast BLAS"
    else:
        candidates = [choice] if choice else [*_SYSTEM_CANDIDATES, *_cmeel_candidates()]
        coretype = _choose_coretype() if any(os.path.exists(p) for p in candidates) else None
        _blas_status = "reference BLAS bundled with mlx (no OpenBLAS found; install libopenblas0-pthread)"
        for path in candidates:
            if not os.path.exists(path):
                continue
            try:
                _openblas = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as exc:
                _blas_status = f"reference BLAS bundled with mlx ({path} failed to load: {exc})"
                continue
            _blas_status = f"OpenBLAS {path}" + (f" (kernels: {coretype})" if coretype else "")
            break
        else:
            if choice:
                _blas_status = f"reference BLAS bundled with mlx (ZRECIPE_BLAS={choice} not found)"
    return _blas_status


def blas_status() -> str:
    """Which BLAS MLX uses in this process (configures it first if nobody has)."""
    return configure_blas()


@contextmanager
def blas_threads(n: int | None):
    """Run the OpenBLAS that zrecipe loaded with `n` threads inside the block (no-op for None, or when
    zrecipe loaded no OpenBLAS: macOS, `ZRECIPE_BLAS=off`)."""
    lib = _openblas
    if n is None or lib is None or not hasattr(lib, "openblas_set_num_threads"):
        yield
        return
    before = lib.openblas_get_num_threads() if hasattr(lib, "openblas_get_num_threads") else 0
    lib.openblas_set_num_threads(int(n))
    try:
        yield
    finally:
        if before > 0:
            lib.openblas_set_num_threads(before)


_LANE_STREAMS: list = []  # CPU streams for cpu_lanes(), created once (each MLX CPU stream is a thread)


def lane_streams(lanes: int) -> list:
    """`lanes` MLX CPU streams, the same ones on every call."""
    import mlx.core as mx

    while len(_LANE_STREAMS) < lanes:
        _LANE_STREAMS.append(mx.new_stream(mx.cpu))
    return _LANE_STREAMS[:lanes]


def lane_bounds(rows: int, lanes: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges splitting `rows` over `lanes` (the larger ranges last)."""
    cuts = [rows * i // lanes for i in range(lanes + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def lane_blas_threads(lanes: int) -> int | None:
    """BLAS threads per lane while `lanes` > 1 streams compute at once (None: leave the BLAS alone)."""
    return max(1, (os.cpu_count() or 1) // lanes) if lanes > 1 else None


def cpu_lanes(batch: int) -> int:
    """How many CPU streams an eager (inference) model call over `batch` items should be split across.

    MLX's CPU backend runs elementwise work on one thread per stream, so on a multi-core CPU two streams
    over two halves of a batch, each with half the BLAS threads, run faster than one stream (measured on
    2 cores, bench-small eager forward: 3.1–3.8 s → 2.0 s; denoising step 0.39 → 0.26 s). Used for
    inference only: in the training loop the same split made the step slower (3.6–3.8 s → 4.1–4.3 s).
    1 on a GPU, without an OpenBLAS whose threads zrecipe controls, for a single item, or on one core.
    `ZRECIPE_CPU_LANES=N` (a positive integer) overrides.
    """
    import mlx.core as mx

    if mx.default_device() != mx.cpu or batch < 2:
        return 1
    override = os.environ.get("ZRECIPE_CPU_LANES", "").strip()
    if override:
        if not override.isdigit() or int(override) < 1:
            from zrecipe.errors import UserError

            raise UserError(
                f"ZRECIPE_CPU_LANES={override!r}: use a positive integer (1 turns the split off)."
            )
        return min(int(override), batch)
    if _openblas is None:
        return 1
    return max(1, min(2, batch, os.cpu_count() or 1))


def default_compute_dtype():
    """fp32 on the CPU (bf16 matmul is slow there), bf16 on Metal/CUDA."""
    import mlx.core as mx

    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def resolve_dtype(name: str | None):
    """Map a recipe's compute dtype ("auto", "float32", "bfloat16", None) to an mx.Dtype."""
    import mlx.core as mx

    if name in (None, "auto"):
        return default_compute_dtype()
    return {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[name]
