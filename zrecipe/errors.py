"""The small exception hierarchy every layer uses.

User-input problems (recipe, dataset, model folder, checkpoint) are `UserError`s: the CLI prints their
message as one paragraph and exits with code 2. Anything else is a bug or an environment failure.
"""

from __future__ import annotations


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


class ModelError(UserError):
    """A model folder / weight file that cannot be used (missing, mis-shaped or unexpected keys...)."""


class CheckpointError(UserError):
    """A checkpoint zip or adapter that is damaged or belongs to another model / dataset."""


class StepFailed(ZRecipeError):
    """A build step ran and failed (as opposed to the tool itself breaking)."""


class StoreCorruption(ZRecipeError):
    """A store entry failed verification. Callers treat it as a miss; it is never used."""


class LockTimeout(UserError):
    """Another build holds the store lock."""
