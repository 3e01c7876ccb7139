"""The CPU-lane helpers sampling uses: the lane count, its override, and the BLAS thread switch."""

import mlx.core as mx
import pytest

from zrecipe import backend
from zrecipe.errors import UserError


def test_cpu_lanes_override_and_single_item(monkeypatch):
    monkeypatch.setenv("ZRECIPE_CPU_LANES", "2")
    assert backend.cpu_lanes(4) == (2 if mx.default_device() == mx.cpu else 1)
    assert backend.cpu_lanes(1) == 1  # one item cannot be split
    monkeypatch.setenv("ZRECIPE_CPU_LANES", "1")
    assert backend.cpu_lanes(4) == 1


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_cpu_lanes_rejects_a_bad_override_naming_the_variable(monkeypatch, value):
    if mx.default_device() != mx.cpu:
        pytest.skip("the override is read on the CPU backend only")
    monkeypatch.setenv("ZRECIPE_CPU_LANES", value)
    with pytest.raises(UserError, match="ZRECIPE_CPU_LANES"):
        backend.cpu_lanes(4)


def test_lane_bounds_cover_every_row_once():
    assert backend.lane_bounds(5, 2) == [(0, 2), (2, 5)]
    assert backend.lane_bounds(4, 2) == [(0, 2), (2, 4)]


def test_blas_threads_sets_and_restores_the_openblas_thread_count():
    lib = backend._openblas
    if lib is None:
        pytest.skip("zrecipe loaded no OpenBLAS in this process (install libopenblas0-pthread)")
    before = lib.openblas_get_num_threads()
    with backend.blas_threads(1):
        assert lib.openblas_get_num_threads() == 1
    assert lib.openblas_get_num_threads() == before
    with backend.blas_threads(None):  # None leaves the BLAS alone
        assert lib.openblas_get_num_threads() == before
