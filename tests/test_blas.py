"""The fast BLAS comes with `pip install`: the scipy-openblas32 wheel, loaded under plain names before MLX.

Each check that depends on which BLAS a process loaded runs in a fresh interpreter, because MLX binds its
BLAS once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from zrecipe import backend
from zrecipe.elf_unprefix import exported, unprefix, unprefixed_copy

linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="zrecipe only changes the BLAS on Linux"
)


def _python(code: str, **env: str) -> str:
    full = {**os.environ, **env}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@linux
def test_the_wheel_is_installed_with_zrecipe():
    assert backend.wheel_openblas() is not None, "scipy-openblas32 is a Linux dependency of zrecipe"


@linux
def test_doctor_reports_the_fast_blas_from_the_wheel():
    """What CI sees is what a pip-only user gets: no system OpenBLAS is installed there."""
    result = subprocess.run(
        [sys.executable, "-m", "zrecipe.cli.main", "doctor"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("BLAS:"))
    assert "OpenBLAS" in line and "reference" not in line, line


@linux
def test_unprefixed_copy_exports_plain_names(tmp_path):
    source = backend.wheel_openblas()
    data = Path(source).read_bytes()
    assert exported(data, b"scipy_cblas_sgemm") and not exported(data, b"cblas_sgemm")
    copy = unprefixed_copy(source, tmp_path, "scipy_")
    patched = copy.read_bytes()
    assert len(patched) == len(data)
    for name in (b"cblas_sgemm", b"cblas_dgemm", b"sgesdd_", b"openblas_set_num_threads"):
        assert exported(patched, name), name
    assert not exported(patched, b"scipy_cblas_sgemm")
    assert not exported(patched, b"no_such_symbol")
    assert unprefixed_copy(source, tmp_path, "scipy_") == copy  # reused, not rewritten
    assert len(list(tmp_path.iterdir())) == 1


def test_unprefix_refuses_what_is_not_an_elf_library():
    with pytest.raises(ValueError):
        unprefix(bytearray(b"not an ELF file at all" * 10), b"scipy_")


@linux
def test_mlx_matmul_and_lapack_run_on_the_wheel_and_match_numpy():
    code = (
        "import zrecipe, numpy as np, mlx.core as mx\n"
        "from zrecipe import backend\n"
        "print(backend.blas_status())\n"
        "rng = np.random.default_rng(0)\n"
        "a = rng.standard_normal((96, 80)).astype(np.float32); b = rng.standard_normal((80, 64)).astype(np.float32)\n"
        "err = np.abs(np.array(mx.array(a) @ mx.array(b)) - a.astype(np.float64) @ b).max()\n"
        "s = np.array(mx.linalg.svd(mx.array(a), stream=mx.cpu)[1])\n"
        "print(err, np.abs(s - np.linalg.svd(a.astype(np.float64))[1]).max())\n"
    )
    status, errors = _python(code).strip().splitlines()
    assert status.startswith("OpenBLAS") and "wheel" in status, status
    matmul_err, svd_err = map(float, errors.split())
    assert matmul_err < 1e-4 and svd_err < 1e-3


@linux
def test_a_missing_blas_choice_falls_back_with_a_clear_status():
    status = _python(
        "from zrecipe import backend; print(backend.blas_status())", ZRECIPE_BLAS="/no/such/lib.so"
    )
    assert "reference BLAS" in status and "/no/such/lib.so not found" in status


@linux
def test_read_only_home_uses_a_private_temp_folder(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".cache").write_text("a file where the cache folder should be")
    status = _python(
        "from zrecipe import backend; print(backend.blas_status())", HOME=str(home), XDG_CACHE_HOME=""
    )
    assert status.startswith("OpenBLAS") and f"zrecipe-blas-{os.getuid()}" in status, status


def _doctor(**env: str) -> str:
    full = {
        k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "ZRECIPE_OPENBLAS_CORETYPE")
    }
    result = subprocess.run([sys.executable, "-m", "zrecipe.cli.main", "doctor"], capture_output=True,
                            text=True, timeout=120, env={**full, **env})  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


@linux
@pytest.mark.skipif(backend.openblas_coretype() != "SKYLAKEX", reason="needs a CPU with AVX-512")
def test_an_inherited_weaker_coretype_is_kept_named_and_overridable():
    """OPENBLAS_CORETYPE from the environment is respected and doctor says it is below the CPU's kernels;
    ZRECIPE_OPENBLAS_CORETYPE decides for zrecipe over it; without either, the CPU's own kernels run."""
    inherited = _doctor(OPENBLAS_CORETYPE="Haswell")
    assert "kernels: Haswell" in inherited
    assert "note: OPENBLAS_CORETYPE=Haswell (from the environment)" in inherited
    assert "ZRECIPE_OPENBLAS_CORETYPE=SKYLAKEX" in inherited
    overridden = _doctor(OPENBLAS_CORETYPE="Haswell", ZRECIPE_OPENBLAS_CORETYPE="SKYLAKEX")
    assert "kernels: SkylakeX" in overridden and "note:" not in overridden
    detected = _doctor(OPENBLAS_CORETYPE="Haswell", ZRECIPE_OPENBLAS_CORETYPE="")
    assert "kernels: SkylakeX" in detected and "note:" not in detected
    assert "note:" not in _doctor(OPENBLAS_CORETYPE="SkylakeX") and "note:" not in _doctor()


# After a matrix product, how much CPU time the process spends while its main thread sleeps 0.1 s:
# OpenBLAS's idle workers spinning (2^28 cycles, ~0.1 s, by OpenBLAS's default) or asleep.
_IDLE_CPU = """
import time, zrecipe, mlx.core as mx
from zrecipe.backend import blas_status
a = mx.random.normal((1024, 1024)); mx.eval(a)
for _ in range(3): mx.eval(a @ a)
start = time.process_time(); time.sleep(0.1); idle = time.process_time() - start
import os
print(os.environ.get("OPENBLAS_THREAD_TIMEOUT"), round(idle, 3), blas_status(), sep="|")
"""


@linux
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS starts no worker threads on one CPU")
def test_openblas_idle_threads_sleep_instead_of_spinning():
    """zrecipe's own kernels run on threads of their own between BLAS calls; spinning BLAS workers took
    half the CPU from them (a VAE encode 480 → 310 ms on 2 cores when the workers sleep at once)."""
    timeout, idle, status = _python(_IDLE_CPU).strip().split("|")
    assert timeout == backend.OPENBLAS_THREAD_TIMEOUT and "idle threads sleep at once" in status, status
    assert float(idle) < 0.03, f"{idle} s of CPU while idle: OpenBLAS's workers are spinning"
    # An inherited setting is the user's: kept, and named.
    timeout, idle, status = _python(_IDLE_CPU, OPENBLAS_THREAD_TIMEOUT="28").strip().split("|")
    assert timeout == "28" and "OPENBLAS_THREAD_TIMEOUT from the environment" in status, status


# Minor page faults of allocating and freeing a 64 MiB MLX array ten times (above glibc's largest mmap
# threshold, 32 MiB, so glibc's defaults unmap it on every free and the next one faults every page in).
_FAULTS = """
import resource, zrecipe, mlx.core as mx
from zrecipe.backend import heap_status
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
mx.eval(mx.full((16 << 20,), 1.0)); before = faults()
for i in range(10):
    mx.eval(mx.full((16 << 20,), float(i)))
print(faults() - before, heap_status(), sep="|")
"""


@linux
def test_freed_large_arrays_are_reused_without_page_faults():
    """MLX's CPU allocator has no cache: without the heap settings each large array faults its pages in."""
    faults, status = _python(_FAULTS).strip().split("|")
    if "glibc" not in status:
        pytest.skip(f"not glibc: {status}")
    pages = 10 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert int(faults) < pages // 10, f"{faults} faults for {pages} pages allocated ({status})"
    faults, status = _python(_FAULTS, ZRECIPE_HEAP="glibc").strip().split("|")
    assert int(faults) > pages // 2 and "ZRECIPE_HEAP=glibc" in status, (faults, status)
    _, status = _python(_FAULTS, MALLOC_TRIM_THRESHOLD_="131072").strip().split("|")
    assert "MALLOC_TRIM_THRESHOLD_" in status, status


@linux
@pytest.mark.skipif(
    (backend._cpu_flags() or set()) >= backend._AVX512 or not backend._cpu_flags(),
    reason="needs an x86-64 CPU without AVX-512",
)
@pytest.mark.parametrize("variable", ["ZRECIPE_OPENBLAS_CORETYPE", "OPENBLAS_CORETYPE"])
def test_a_coretype_the_cpu_cannot_run_is_dropped_with_a_note(variable):
    """OpenBLAS trusts OPENBLAS_CORETYPE: SkylakeX kernels on a CPU without AVX-512 died with SIGILL at the
    first matmul. zrecipe drops such a choice and doctor says why."""
    result = subprocess.run(
        [sys.executable, "-m", "zrecipe.cli.main", "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, variable: "SkylakeX"},
    )
    assert result.returncode == 0, result.stderr
    note = next(line for line in result.stdout.splitlines() if line.startswith("note:"))
    assert f"{variable}=SkylakeX" in note and "avx512" in note and "ignored" in note, note
    out = _python(
        "import zrecipe, mlx.core as mx; a = mx.ones((256, 256)); print(float((a @ a).sum()))",
        **{variable: "SkylakeX"},
    )
    assert float(out) == 256.0**3
