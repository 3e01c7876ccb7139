"""Shared test setup.

`import zrecipe` first: it selects the fast BLAS for MLX on Linux, which must happen before any test module
imports `mlx.core` (otherwise MLX binds its bundled reference BLAS for the whole session).
"""

import zrecipe  # noqa: F401
