"""The small exception hierarchy every layer uses.

User-input problems (recipe, dataset, model folder, checkpoint) and a broken environment (a full disk, an
unwritable or impossible path) are `UserError`s: the CLI prints their message as one paragraph and exits
with code 2. Anything else is a bug. `os_problem` turns an OSError met on a user's path into the
`EnvironmentProblem` that says which path, what is wrong and what to do.
"""

from __future__ import annotations

import errno
import os


class ZRecipeError(Exception):
    """Base class of every error zrecipe raises on purpose."""

    exit_code = 1


class UserError(ZRecipeError):
    """Bad input from the user: the message names the file / key / item and what to do. Exit code 2."""

    exit_code = 2


class RecipeError(UserError):
    """A recipe that does not validate. `problems` holds every problem found (reported at once)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class DatasetError(UserError):
    """Bad dataset items (corrupt image, missing caption, ...). `items` lists every bad item."""

    def __init__(self, message: str, items: list[str] | None = None):
        super().__init__(message)
        self.items = list(items or [])


class InputChanged(DatasetError):
    """A source file's bytes, as a step read them, differ from the content hash the plan was made with."""


class ModelError(UserError):
    """A model folder / weight file that cannot be used (missing, mis-shaped or unexpected keys...)."""


class CheckpointError(UserError):
    """A checkpoint zip or adapter that is damaged or belongs to another model / dataset."""


class EnvironmentProblem(UserError):
    """The machine refuses an operation on a user's path: disk full, read-only, permission denied, a file
    where a folder is needed, a name the file system cannot hold."""


class StepFailed(ZRecipeError):
    """A build step ran and failed (as opposed to the tool itself breaking)."""


class StoreCorruption(ZRecipeError):
    """A store entry failed verification. Callers treat it as a miss; it is never used."""


class InputDamaged(StoreCorruption):
    """A store entry a step was about to read failed its manifest check; it was discarded (rebuilt by the
    next plan). `key` names the entry."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


class LockTimeout(UserError):
    """Another build holds the store lock."""


class ZRecipeWarning(UserWarning):
    """Something the user should know that does not stop the build (the CLI prints it as `warning: ...`)."""


# errno → (what is wrong, what to do). The fix names the generic remedy; callers add the recipe key or
# option that chose the path when they know it.
_REASONS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space (`zrecipe gc` removes old store entries) "
                   "or choose a folder on a bigger disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose a folder on another disk"),
    errno.EROFS: ("the file system is read-only", "choose a writable folder"),
    errno.EACCES: ("permission denied", "fix its permissions or choose another path"),
    errno.EPERM: ("operation not permitted", "fix its permissions or choose another path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "fix the path"),
    errno.EISDIR: ("is a folder where a file is needed", "remove or rename that folder, or fix the path"),
    errno.EEXIST: ("already exists", "remove or rename it, or choose another path"),
    errno.ENOENT: ("does not exist", "fix the path"),
    errno.ENAMETOOLONG: ("the name is too long for the file system", "choose a shorter path"),
    errno.ELOOP: ("too many levels of symbolic links (a link loop?)", "fix or remove the link"),
    errno.EIO: ("input/output error (a failing disk or a lost network mount?)", "check the disk, then run again"),
    errno.EMFILE: ("too many open files", "raise the limit (`ulimit -n`) and run again"),
    errno.ENFILE: ("too many open files in the system", "close other programs and run again"),
    errno.EFBIG: ("file too large for the file system", "choose a folder on another file system"),
    errno.ENXIO: ("no such device", "fix the path"),
    errno.ENODEV: ("no such device", "fix the path"),
    errno.EXDEV: ("cannot move files across file systems", "keep these folders on one file system"),
    errno.ETXTBSY: ("the file is busy", "close the program using it and run again"),
    errno.EBUSY: ("the file or folder is busy", "close the program using it and run again"),
    errno.ENOMEM: ("not enough memory", "close other programs or lower the batch size"),
}  # fmt: skip
ENVIRONMENT_ERRNOS = frozenset(_REASONS) - {errno.ENOENT, errno.EEXIST}


def is_environment_error(exc: BaseException) -> bool:
    """True for an OSError the user's machine or paths caused (full disk, permissions, a named path the
    file system refuses), as opposed to a bug in zrecipe."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in ENVIRONMENT_ERRNOS or exc.filename is not None


# Below this much free space on the store's disk, a step that failed writing is taken to have met a full
# disk even when its library reported it without an errno (MLX raises RuntimeError("[write] ...")).
LOW_SPACE_BYTES = 16 * 2**20


def disk_full(exc: BaseException, folder: str | os.PathLike[str]) -> EnvironmentProblem | None:
    """The EnvironmentProblem for a failure that is really a full disk at `folder` (little space left, or
    a library's "unable to write"), else None."""
    import re
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    says_write = bool(re.search(r"unable to write|no space left", str(exc), re.IGNORECASE))
    if free >= LOW_SPACE_BYTES and not says_write:
        return None
    problem = EnvironmentProblem(
        f"{folder}: the disk is full or nearly ({free / 2**20:.1f} MiB free) and writing failed ({exc}); free some "
        "space (`zrecipe gc` removes old store entries) or move the store to a bigger disk, then run again."
    )
    problem.__cause__ = exc
    return problem


def os_problem(exc: OSError, what: str | None = None, fix: str | None = None) -> EnvironmentProblem:
    """The EnvironmentProblem for `exc`: `<what> <path>: <what is wrong>; <what to do>`.

    `what` says what the path is ("the store", "save.output_path"); `fix` replaces the generic advice.
    """
    path = exc.filename
    reason, generic = _REASONS.get(
        exc.errno or -1, (exc.strerror or str(exc), "check the path and run again")
    )
    if exc.errno == errno.EEXIST and path is not None and os.path.exists(path) and not os.path.isdir(path):
        reason, generic = (
            "is a file where a folder is needed",
            "remove or rename that file, or choose another path",
        )
    where = " ".join(str(p) for p in (what, path) if p)
    if exc.filename2 is not None:
        where += f" → {exc.filename2}"
    message = f"{where}: {reason}; {fix or generic}." if where else f"{reason}; {fix or generic}."
    problem = EnvironmentProblem(message)
    problem.__cause__ = exc
    return problem
