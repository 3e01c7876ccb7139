"""Build step for zrecipe's one compiled part, the optional module `zrecipe._native` (csrc/).

Everything else about the package is in pyproject.toml. `pip install .` and `pip install -e .` run this
through csrc/native_backend.py, which also names the module's build requirements. The module is compiled
with CMake when the platform and toolchain allow it; when they do not, or compiling fails, the install
goes on without it and `zrecipe/_native_build.json` records why (`zrecipe doctor` prints it; the pure-MLX
kernels are used instead). Build output, warnings included, is shown by `pip install -v`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "csrc"))
from native_backend import skip_reason  # noqa: E402  (csrc/ is not a package)

BUILD_RECORD = "_native_build.json"  # next to the module; read by zrecipe/native.py before loading it


class NativeBuildError(Exception):
    """The native module was not built; the message says why (it ends up in the build record)."""


class BuildNative(build_ext):
    """Compile zrecipe._native with CMake, or record why not; never fails the install."""

    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            record = self._compile(target)
            record.update(built=True, seconds=round(time.monotonic() - started, 1))
            print(f"zrecipe: native kernels built in {record['seconds']} s", file=sys.stderr)
        except NativeBuildError as error:
            target.unlink(missing_ok=True)
            record = {"built": False, "reason": str(error)}
            print(
                f"WARNING: zrecipe: native CPU kernels not built: {error}. zrecipe works without them "
                "(pure-MLX kernels, slower on the CPU); `zrecipe doctor` shows this.",
                file=sys.stderr,
            )
        (target.parent / BUILD_RECORD).write_text(json.dumps(record, indent=1) + "\n")

    def _compile(self, target: Path) -> dict:
        reason = skip_reason()
        if reason:
            raise NativeBuildError(reason)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise NativeBuildError("CMake not found (with --no-build-isolation, install cmake first)")
        for module in ("mlx.core", "nanobind"):
            if importlib.util.find_spec(module) is None:
                raise NativeBuildError(f"{module} is not installed in the build environment")
        build_dir = Path(self.build_temp).resolve() / "native"
        out_dir = build_dir / "out"
        shutil.rmtree(out_dir, ignore_errors=True)
        # A new configure every time: pip's build environment (where CMake found mlx and nanobind) is a new
        # temporary folder per install, and a cached path could name an older one. Objects still rebuild
        # only when their flags or include paths changed.
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(min(os.cpu_count() or 1, 4))
        steps = (
            [cmake, "-S", str(ROOT / "csrc"), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
             f"-DPython_EXECUTABLE={sys.executable}", f"-DZRECIPE_NATIVE_OUTPUT_DIR={out_dir}"],
            [cmake, "--build", str(build_dir), "-j", jobs],
        )  # fmt: skip
        for command in steps:
            run = subprocess.run(command, capture_output=True, text=True)
            sys.stderr.write(run.stdout + run.stderr)
            if run.returncode != 0:
                tail = " | ".join((run.stderr or run.stdout).strip().splitlines()[-3:])
                raise NativeBuildError(f"`cmake {command[1]}` failed: {tail}")
        built = sorted(out_dir.glob("_native*.so"))
        if not built:
            raise NativeBuildError(f"CMake produced no _native*.so in {out_dir}")
        shutil.copyfile(built[0], target)
        return json.loads((build_dir / BUILD_RECORD).read_text())

    def copy_extensions_to_source(self) -> None:
        """Editable installs: the module (or its absence) and its build record, into the source tree."""
        super().copy_extensions_to_source()
        for ext in self.extensions:
            filename = self.get_ext_filename(self.get_ext_fullname(ext.name))
            regular, inplace = Path(self.build_lib) / filename, ROOT / filename
            if not regular.exists():  # not built this time: drop a module left by an earlier build
                inplace.unlink(missing_ok=True)
            self.copy_file(str(regular.with_name(BUILD_RECORD)), str(inplace.with_name(BUILD_RECORD)))


setup(
    ext_modules=[Extension("zrecipe._native", sources=[], optional=True)],
    cmdclass={"build_ext": BuildNative},
)
