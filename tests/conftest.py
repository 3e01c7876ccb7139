"""Shared test setup.

`import zrecipe` first: it selects the fast BLAS for MLX on Linux, which must happen before any test module
imports `mlx.core` (otherwise MLX binds its bundled reference BLAS for the whole session).

Models zrecipe makes itself (the tiny model, assembled component folders) go to one session-wide folder
instead of ~/.cache/zrecipe, the Hugging Face cache is an empty session folder (no token), and no test
reaches the real Hub: HF_ENDPOINT points at a closed loopback port unless a test starts its own hub server.
"""

import os
import socket

import pytest

import zrecipe  # noqa: F401


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_model_caches(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        if "ZRECIPE_MODEL_CACHE" not in os.environ:
            mp.setenv("ZRECIPE_MODEL_CACHE", str(tmp_path_factory.mktemp("model-cache")))
        mp.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
        for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
            mp.delenv(name, raising=False)
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        yield


@pytest.fixture(autouse=True)
def _offline_switch_does_not_leak():
    """`--offline` sets HF_HUB_OFFLINE for the process; a test that runs it in-process must not leave it."""
    before = os.environ.get("HF_HUB_OFFLINE")
    yield
    if before is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = before


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random-weight Z-Image folder in the real layout, made once per test session."""
    from zrecipe.models.z_image.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("model") / "tiny")
