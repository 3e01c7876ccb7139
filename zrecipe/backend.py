"""Backend choices made once per process: a fast BLAS for MLX on Linux, and the compute dtype per device.

MLX's Linux CPU wheel links the reference BLAS (measured here: ~3-5 GFLOP/s fp32 matmul against ~180 with
OpenBLAS). `libmlx.so` leaves `cblas_sgemm` & co. undefined and resolves them at load time, so an OpenBLAS
loaded into the global symbol scope *before* `mlx.core` is imported wins the lookup. This module does that
on Linux only (macOS uses Accelerate/Metal and is never touched), before any MLX import, trying in order:

1. `ZRECIPE_BLAS=/path/to/libopenblas.so` when set (`ZRECIPE_BLAS=off`, `0` or `reference` opts out);
2. the `scipy-openblas32` wheel, a dependency of zrecipe on Linux, so that `pip install` alone gives the
   fast path: one library for every x86-64 and arm64 CPU (DYNAMIC_ARCH), no libgfortran needed. It exports
   its symbols as `scipy_cblas_sgemm` & co., so zrecipe loads a copy whose exported names drop the prefix
   (`zrecipe.elf_unprefix`; made once, in `~/.cache/zrecipe/blas/`);
3. a system OpenBLAS (Debian/Ubuntu `libopenblas0-pthread`, Fedora, Arch) or the `cmeel-openblas` wheel.

An old system OpenBLAS does not recognise newer CPUs and falls back to its generic SSE3 ("Prescott")
kernels: measured here, Debian's 0.3.21 on a newer Xeon ran a 2048² sgemm at 11 GFLOP/s instead of ~120.
So, for a system library and unless `OPENBLAS_CORETYPE` is already set, zrecipe names the kernel family the
CPU's flags support (AVX-512 → SKYLAKEX, AVX2+FMA → HASWELL) before loading it.
`ZRECIPE_OPENBLAS_CORETYPE=NAME` chooses the family for any OpenBLAS zrecipe loads, over an inherited
`OPENBLAS_CORETYPE` (empty: OpenBLAS's own detection). An inherited `OPENBLAS_CORETYPE` is otherwise kept,
and `zrecipe doctor` says when it is below what the CPU runs: one machine here carried
`OPENBLAS_CORETYPE=Haswell` on an AVX-512 CPU, which halved the matmul rate (249 against 468 GFLOP/s).

OpenBLAS's idle threads spin for 2^28 cycles (~0.1 s) after each call before they sleep. zrecipe's compiled
kernels (flash attention, conv2d, GroupNorm) run on threads of their own between BLAS calls, and on a
machine with as many threads as cores the spinning took half the CPU from them: measured on a 2-core
Zen 3, a VAE encode went from 480 to 310 ms and its user time from 815 to 380 ms when the threads sleep at
once. So zrecipe sets `OPENBLAS_THREAD_TIMEOUT` (unless it is already set) before loading OpenBLAS.

MLX's CPU allocator takes every array from `malloc`, and glibc hands blocks above its mmap threshold
(128 KiB, rising to at most 32 MiB) back to the kernel when they are freed, so each call faulted every page
of its large arrays in again: ~30,000 minor faults and ~100 ms of system time per VAE encode of the bench
config. `configure_heap` raises the threshold to 256 MiB and keeps up to 1 GiB free at the heap's top
(glibc only; `ZRECIPE_HEAP=glibc`, or glibc's own `MALLOC_*_THRESHOLD_`/`MALLOC_TOP_PAD_`/
`MALLOC_MMAP_MAX_` variables or malloc tunables, keep glibc's behaviour).

Importing this module is cheap (no MLX, no numpy).
"""

from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes

_SYSTEM_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
WHEEL_PREFIX = "scipy_"  # what scipy-openblas32 puts before every exported symbol name

# What configure_blas() decided, for `zrecipe doctor` / --verbose.
_blas_status: str | None = None
# The OpenBLAS that configure_blas() loaded (its thread count can be changed at run time), else None.
_openblas: ctypes.CDLL | None = None


def _cmeel_candidates() -> list[str]:
    # glob and ctypes are imported where used: `import zrecipe` (every command, --help) needs neither.
    import glob

    found = []
    for entry in sys.path:
        found += glob.glob(os.path.join(entry, "cmeel.prefix", "lib", "libopenblas.so.0"))
    return found


def wheel_openblas() -> str | None:
    """The library file of the installed `scipy-openblas32` wheel, or None (found without importing it)."""
    import glob

    for entry in sys.path:
        found = sorted(
            glob.glob(os.path.join(entry or ".", "scipy_openblas32", "lib", "libscipy_openblas*.so"))
        )
        if found:
            return found[0]
    return None


def blas_copy_folder() -> Path:
    """Where the unprefixed copy of the wheel's OpenBLAS lives: $XDG_CACHE_HOME/zrecipe/blas (or
    ~/.cache/zrecipe/blas), else a per-user folder in the temp directory when that is not writable."""
    from zrecipe.cache_home import user_cache_folder

    return user_cache_folder("blas")


def _unprefixed_wheel(path: str) -> str:
    from zrecipe.elf_unprefix import unprefixed_copy

    try:
        return str(unprefixed_copy(path, blas_copy_folder(), WHEEL_PREFIX))
    except OSError:  # a read-only home: the temp folder, private to this user
        import tempfile

        folder = Path(tempfile.gettempdir()) / f"zrecipe-blas-{os.getuid()}"
        return str(unprefixed_copy(path, folder, WHEEL_PREFIX))


_AVX512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"})
_AVX2 = frozenset({"avx2", "fma"})
# What OpenBLAS's x86-64 kernel families need (the ones a user is likely to name). OpenBLAS trusts
# OPENBLAS_CORETYPE: naming one the CPU cannot run kills the process with SIGILL at the first matmul.
_CORETYPE_NEEDS = {
    "SKYLAKEX": _AVX512,
    "COOPERLAKE": _AVX512,
    "SAPPHIRERAPIDS": _AVX512,
    "HASWELL": _AVX2,
    "ZEN": _AVX2,
}


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    """The x86-64 CPU's flags from /proc/cpuinfo (None where there are none to read); read once."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return frozenset(flags) if flags is not None else None


def openblas_coretype() -> str | None:
    """The OpenBLAS kernel family this x86-64 CPU supports, from /proc/cpuinfo flags (None if unknown)."""
    have = _cpu_flags() or frozenset()
    if _AVX512 <= have:
        return "SKYLAKEX"
    if _AVX2 <= have:
        return "HASWELL"
    return None


_coretype_refused: str | None = None  # why an OPENBLAS_CORETYPE was dropped, for coretype_note()


def _drop_unrunnable_coretype(origin: str) -> bool:
    """Remove an OPENBLAS_CORETYPE naming kernels this CPU cannot run (OpenBLAS then detects its own),
    and remember why: a clear note instead of "Illegal instruction"."""
    global _coretype_refused
    name = os.environ.get("OPENBLAS_CORETYPE", "")
    needs = _CORETYPE_NEEDS.get(name.upper())
    have = _cpu_flags()
    if needs is None or have is None or needs <= have:
        return False
    os.environ.pop("OPENBLAS_CORETYPE")
    missing = ", ".join(sorted(needs - have))
    _coretype_refused = (
        f"{origin} asks for OpenBLAS's {name} kernels, which this CPU cannot run (no {missing}); "
        f"ignored, the CPU's own were chosen. Unset it or name one of: {', '.join(_runnable_coretypes(have))}"
    )
    return True


def _runnable_coretypes(have: frozenset[str]) -> list[str]:
    return [name for name, needs in _CORETYPE_NEEDS.items() if needs <= have] or ["(none: leave it unset)"]


# Kernel families zrecipe names, weakest first (for telling whether an inherited choice is below the CPU's).
_CORETYPE_RANK = ("HASWELL", "SKYLAKEX")


def _apply_zrecipe_coretype() -> bool:
    """ZRECIPE_OPENBLAS_CORETYPE, when set, decides for zrecipe's OpenBLAS whatever OPENBLAS_CORETYPE the
    environment carries (empty: OpenBLAS's own detection). Returns whether it was set."""
    override = os.environ.get("ZRECIPE_OPENBLAS_CORETYPE")
    if override is None:
        return False
    if override:
        os.environ["OPENBLAS_CORETYPE"] = override
    else:
        os.environ.pop("OPENBLAS_CORETYPE", None)
    return True


def _choose_coretype() -> None:
    """For a system OpenBLAS: name the kernel family the CPU supports, unless the environment or
    ZRECIPE_OPENBLAS_CORETYPE already chose (see the module docstring)."""
    coretype = openblas_coretype() if _coretype_origin is None else None
    if coretype:
        os.environ["OPENBLAS_CORETYPE"] = coretype


def coretype_note() -> str | None:
    """A hint when OPENBLAS_CORETYPE, inherited from the environment, holds OpenBLAS to weaker kernels than
    this CPU runs (measured on an AMD EPYC with AVX-512: Haswell kernels 249 GFLOP/s, SkylakeX 468), else
    None. zrecipe keeps the environment's choice; ZRECIPE_OPENBLAS_CORETYPE overrides it for zrecipe. Also
    says when a choice named kernels the CPU cannot run and was dropped."""
    if _coretype_refused and _openblas is not None:
        return _coretype_refused
    if _coretype_origin != "environment" or _openblas is None:
        return None
    inherited = os.environ.get("OPENBLAS_CORETYPE", "").upper()
    best = openblas_coretype()
    if (
        best is None
        or inherited not in _CORETYPE_RANK
        or _CORETYPE_RANK.index(inherited) >= _CORETYPE_RANK.index(best)
    ):
        return None
    return (
        f"OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} (from the environment) keeps OpenBLAS on "
        f"kernels older than this CPU's; set ZRECIPE_OPENBLAS_CORETYPE={best} (or unset OPENBLAS_CORETYPE) "
        "for faster matmuls in zrecipe"
    )


def _describe(lib: ctypes.CDLL, origin: str) -> str:
    """`OpenBLAS 0.3.x (origin, kernels: NAME)` from the library's own report."""
    import ctypes

    try:
        lib.openblas_get_config.restype = ctypes.c_char_p
        lib.openblas_get_corename.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode().split()
        core = lib.openblas_get_corename().decode()
    except (AttributeError, UnicodeDecodeError):
        return f"OpenBLAS ({origin})"
    version = config[1] if len(config) > 1 and config[0] == "OpenBLAS" else "?"
    return f"OpenBLAS {version} ({origin}, kernels: {core})"


def _candidates(choice: str) -> list[tuple[str, str]]:
    """(origin, path) pairs to try, best first."""
    if choice:
        return [(f"ZRECIPE_BLAS={choice}", choice)]
    out = []
    wheel = wheel_openblas()
    if wheel:
        out.append(("scipy-openblas32 wheel", wheel))
    out += [("system", p) for p in _SYSTEM_CANDIDATES if os.path.exists(p)]
    out += [("cmeel-openblas wheel", p) for p in _cmeel_candidates()]
    return out


_coretype_origin: str | None = None  # who set OPENBLAS_CORETYPE: "environment", the ZRECIPE_ variable, None

# 2^4 cycles, OpenBLAS's minimum: idle threads sleep at once. Waking them costs a few microseconds per
# BLAS call, nothing next to the spinning they did (see the module docstring).
OPENBLAS_THREAD_TIMEOUT = "4"


def _apply_thread_timeout() -> str:
    """Set OPENBLAS_THREAD_TIMEOUT unless the environment has it; → how long idle threads spin, in words."""
    inherited = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
    if inherited is None:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = inherited = OPENBLAS_THREAD_TIMEOUT
    # Described by its value: a child process inherits the 4 that its zrecipe parent set.
    if inherited.strip().isdigit() and int(inherited) <= int(OPENBLAS_THREAD_TIMEOUT):
        return "idle threads sleep at once"
    return f"idle threads spin 2^{inherited} cycles (OPENBLAS_THREAD_TIMEOUT from the environment)"


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
        return _blas_status
    if choice.lower() in {"off", "0", "reference", "none", "false"}:
        _blas_status = "reference BLAS bundled with mlx (ZRECIPE_BLAS=off)"
        return _blas_status
    if "mlx.core" in sys.modules:
        _blas_status = "unchanged: mlx was imported before zrecipe could select a fast BLAS"
        return _blas_status
    import ctypes

    global _coretype_origin
    if _apply_zrecipe_coretype():
        _coretype_origin = "ZRECIPE_OPENBLAS_CORETYPE"
    elif "OPENBLAS_CORETYPE" in os.environ:
        _coretype_origin = "environment"
    if _coretype_origin:
        what = "ZRECIPE_OPENBLAS_CORETYPE" if _coretype_origin != "environment" else "OPENBLAS_CORETYPE"
        if _drop_unrunnable_coretype(f"{what}={os.environ.get(what)}"):
            _coretype_origin = None  # as if unset: a system OpenBLAS gets the CPU's family named
    spin = _apply_thread_timeout()
    failures = []
    for origin, path in _candidates(choice):
        if not os.path.exists(path):
            failures.append(f"{path} not found")
            continue
        try:
            if "scipy_openblas" in os.path.basename(path):
                path = _unprefixed_wheel(path)
            elif origin != "scipy-openblas32 wheel":
                _choose_coretype()  # an older system OpenBLAS may not know this CPU
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except (OSError, ValueError) as exc:
            failures.append(f"{path} failed to load: {exc}")
            continue
        _openblas = lib
        where = origin if origin.startswith("ZRECIPE") else f"{origin}: {path}"
        _blas_status = f"{_describe(lib, where)}, {spin}"
        return _blas_status
    why = "; ".join(failures) or "no OpenBLAS found"
    _blas_status = (
        f"reference BLAS bundled with mlx, 30-60x slower ({why}); reinstall zrecipe so that its "
        "scipy-openblas32 dependency is present, or install libopenblas0-pthread"
    )
    return _blas_status


HEAP_MMAP_THRESHOLD = 256 << 20  # blocks below this come from the heap and are reused
HEAP_TRIM_THRESHOLD = 1 << 30  # free memory the heap keeps at its top before returning it
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)

# The environment's say over the same thresholds (then zrecipe leaves the heap alone).
_GLIBC_HEAP_VARIABLES = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)

_heap_status: str | None = None


def configure_heap() -> str:
    """Make glibc's malloc reuse freed large blocks instead of unmapping them (see the module docstring).
    Idempotent; → one line saying what the heap does."""
    global _heap_status
    if _heap_status is not None:
        return _heap_status
    if not sys.platform.startswith("linux"):
        _heap_status = "the platform's allocator (not Linux: nothing changed)"
        return _heap_status
    if os.environ.get("ZRECIPE_HEAP", "").strip().lower() == "glibc":
        _heap_status = "glibc's defaults (ZRECIPE_HEAP=glibc)"
        return _heap_status
    own = [name for name in _GLIBC_HEAP_VARIABLES if name in os.environ]
    if own or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        _heap_status = f"as the environment sets it ({', '.join(own) or 'GLIBC_TUNABLES'})"
        return _heap_status
    import ctypes

    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        _heap_status = "the C library's defaults (not glibc: nothing changed)"
        return _heap_status
    ok = libc.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD) and libc.mallopt(
        _M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD
    )
    _heap_status = (
        f"glibc, blocks below {HEAP_MMAP_THRESHOLD >> 20} MiB reused, up to {HEAP_TRIM_THRESHOLD >> 30} GiB "
        "kept free"
        if ok
        else "glibc's defaults (mallopt refused the thresholds)"
    )
    return _heap_status


def heap_status() -> str:
    """What the heap does in this process (configures it first if nobody has)."""
    return configure_heap()


class _BlasBeforeMlx:
    """A meta-path finder that selects the BLAS at the first import of `mlx` (or a submodule), then
    removes itself: it finds nothing, so the import itself goes on as usual."""

    @classmethod
    def find_spec(cls, name: str, path: object = None, target: object = None) -> None:
        if name == "mlx" or name.startswith("mlx."):
            if cls in sys.meta_path:
                sys.meta_path.remove(cls)
            configure_blas()
            configure_heap()
        return None


def configure_blas_before_mlx() -> None:
    """`configure_blas()` and `configure_heap()` at the moment MLX is first imported (at once when it
    already is), so that a process which never uses MLX (`zrecipe plan`, `--help`) does not load OpenBLAS: ~20 ms and its
    threads. What MLX binds is the same as when the BLAS is loaded at `import zrecipe`."""
    if "mlx" in sys.modules or "mlx.core" in sys.modules:
        configure_blas()
        configure_heap()
    elif _BlasBeforeMlx not in sys.meta_path:
        sys.meta_path.insert(0, _BlasBeforeMlx)


def blas_status() -> str:
    """Which BLAS MLX uses in this process (configures it first if nobody has)."""
    return configure_blas()


@contextmanager
def blas_threads(n: int | None):
    """Run the OpenBLAS that zrecipe loaded, and the compiled flash attention (whose tiles are BLAS calls),
    with `n` threads inside the block (no-op for None, or when zrecipe loaded no OpenBLAS: macOS,
    `ZRECIPE_BLAS=off`)."""
    lib = _openblas
    if n is None or lib is None or not hasattr(lib, "openblas_set_num_threads"):
        yield
        return
    from zrecipe import native

    before = lib.openblas_get_num_threads() if hasattr(lib, "openblas_get_num_threads") else 0
    attention_before = native.compute_threads()
    lib.openblas_set_num_threads(int(n))
    native.set_compute_threads(int(n))
    try:
        yield
    finally:
        if before > 0:
            lib.openblas_set_num_threads(before)
        if attention_before:
            native.set_compute_threads(attention_before)


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
