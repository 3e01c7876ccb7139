"""Shared test setup.

`import zrecipe` first: it selects the fast BLAS for MLX on Linux, which must happen before any test module
imports `mlx.core` (otherwise MLX binds its bundled reference BLAS for the whole session).
"""

import pytest

import zrecipe  # noqa: F401


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random-weight Z-Image folder in the real layout, made once per test session."""
    from zrecipe.models.z_image.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("model") / "tiny")
