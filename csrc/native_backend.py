"""zrecipe's PEP 517 build backend: setuptools, plus what compiling `zrecipe._native` (csrc/) needs.

The native module links against libmlx, so it must be built against the very mlx version that zrecipe
will import at run time. pip builds in an isolated environment whose packages come from PyPI, so the
build requirements name that version:

- when the environment being installed into already has mlx (pip runs this backend with that
  environment's interpreter; `python -E` sees its packages), `mlx[cpu]==<that version>`;
- otherwise (a fresh environment) `mlx[cpu]>=MIN_MLX`: the newest release, which is also what pip's resolver
  installs for zrecipe's own `mlx[cpu]>=...` dependency in the same command.

A mismatch that slips through (another front end, a later mlx upgrade) is caught at run time:
zrecipe/native.py compares the build record with the running mlx and falls back to the pure-MLX kernels.
No requirement is added where nothing would be compiled (not Linux, no C++ compiler, or
ZRECIPE_NATIVE_BUILD=0), so such installs download nothing extra; setup.py records why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every other hook is setuptools' own)

# mlx.core switched to nanobind 3's ABI (internals v22) in 0.32.3; the module is built with nanobind 3.
MIN_MLX = "0.32.3"
NANOBIND = "nanobind>=3,<4"
MIN_CMAKE = (3, 25)
COMPILERS = ("c++", "g++", "clang++")


def skip_reason() -> str | None:
    """Why `zrecipe._native` will not be compiled here, or None when it will be tried."""
    if os.environ.get("ZRECIPE_NATIVE_BUILD", "").strip().lower() in ("0", "off", "false", "no"):
        return "disabled at install time (ZRECIPE_NATIVE_BUILD=0)"
    if not sys.platform.startswith("linux"):
        return f"not built on {sys.platform}: the kernels are for MLX's Linux CPU backend (Metal and CUDA use MLX's own)"
    if compiler() is None:
        return "no C++ compiler found at install time (install g++ or clang++, then reinstall zrecipe)"
    mlx = target_mlx_version()
    if mlx is not None and _version_tuple(mlx) < _version_tuple(MIN_MLX):
        return f"mlx {mlx} is older than {MIN_MLX}, the first release the native module builds against"
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def compiler() -> str | None:
    """The C++ compiler CMake will pick: $CXX when set, else the first of c++ / g++ / clang++ on PATH."""
    cxx = os.environ.get("CXX", "").split()
    if cxx:
        return shutil.which(cxx[0])
    return next((found for name in COMPILERS if (found := shutil.which(name))), None)


def system_cmake_ok() -> bool:
    """Whether a CMake at least MIN_CMAKE is on PATH (else the `cmake` wheel is a build requirement)."""
    cmake = shutil.which("cmake")
    if cmake is None:
        return False
    try:
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    found = re.search(r"(\d+)\.(\d+)", out)
    return bool(found) and (int(found[1]), int(found[2])) >= MIN_CMAKE


def target_mlx_version() -> str | None:
    """The mlx version installed where zrecipe is being installed, or None (not installed, or unknown)."""
    code = "from importlib.metadata import version; print(version('mlx'))"
    try:
        # -E: ignore PYTHONPATH, through which pip hides the target's packages from the build.
        run = subprocess.run([sys.executable, "-E", "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    version = run.stdout.strip()
    return version if run.returncode == 0 and re.fullmatch(r"\d+(\.\d+)*", version) else None


def native_requirements() -> list[str]:
    """Build requirements of the native module (none when it will not be compiled)."""
    if skip_reason() is not None:
        return []
    mlx = target_mlx_version()
    requirements = [f"mlx[cpu]=={mlx}" if mlx else f"mlx[cpu]>={MIN_MLX}", NANOBIND]
    if not system_cmake_ok():
        requirements.append("cmake>=3.25")
    return requirements


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + native_requirements()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + native_requirements()
