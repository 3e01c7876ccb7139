"""TensorBoard event files: real files written with tensorboardX, read back with TensorBoard's own event
reader; the gradient norm they log against a hand computation; resume; a clear error without the package."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from test_training_loop import Regression, model, regression_examples, regression_settings

from zrecipe.errors import UserError
from zrecipe.training.data import BatchIterator
from zrecipe.training.loop import train

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    reader = event_accumulator.EventAccumulator(str(folder))
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def test_loss_learning_rate_and_grad_norm_are_logged_every_step(tmp_path):
    settings = regression_settings(5, tensorboard=True)  # no clipping: the norm is measured for the log
    result = train(model(), regression_examples(), Regression(), settings, tmp_path, callbacks=[])
    logged = scalars(tmp_path / "tensorboard")
    assert sorted(logged) == ["train/grad_norm", "train/learning_rate", "train/loss"]
    history = result.history
    assert [s for s, _ in logged["train/loss"]] == [h["step"] for h in history] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([v for _, v in logged["train/loss"]], [h["loss"] for h in history], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in logged["train/learning_rate"]], [0.2] * 5, rtol=1e-6)
    norms = [v for _, v in logged["train/grad_norm"]]
    np.testing.assert_allclose(norms, [h["grad_norm"] for h in history], rtol=1e-6)

    # step 1's norm by hand: loss = mean((W x − y)²) over the first batch, W the initial weights
    examples, weights = regression_examples(), np.array(model().weight, dtype=np.float64)
    indices, _ = BatchIterator(examples, settings.batch_size, settings.seed).next()
    x = np.stack([examples[i].latents for i in indices]).astype(np.float64)
    y = np.stack([examples[i].caption for i in indices]).astype(np.float64)
    grad = 2 * (x @ weights.T - y).T @ x / y.size
    assert norms[0] == pytest.approx(np.linalg.norm(grad), rel=1e-5)

    # with clipping on, the norm clipping measures is the one logged (the same numbers)
    clipped = train(model(), regression_examples(), Regression(),
                    regression_settings(5, tensorboard=True, max_grad_norm=1e9), tmp_path / "clip", callbacks=[])  # fmt: skip
    np.testing.assert_allclose([h["grad_norm"] for h in clipped.history], norms, rtol=1e-6)


def test_a_resumed_run_continues_the_log_without_duplicates(tmp_path):
    settings = regression_settings(6, tensorboard=True)
    train(model(), regression_examples(), Regression(), settings, tmp_path, callbacks=[])
    # the run is interrupted after step 6 but resumes from its step-3 checkpoint into the same folder:
    # TensorBoard must show steps 4-6 once, from the second run
    half = tmp_path / "checkpoints" / "0000003_checkpoint.zip"
    resumed = train(model(), regression_examples(), Regression(), settings, tmp_path, resume_from=half,
                    callbacks=[])  # fmt: skip
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    logged = scalars(tmp_path / "tensorboard")
    assert [s for s, _ in logged["train/loss"]] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in logged["train/loss"]], [h["loss"] for h in resumed.history],
                               rtol=1e-6)  # fmt: skip


def test_tensorboard_without_tensorboardx_is_a_clear_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX now raises ImportError
    with pytest.raises(
        UserError, match=r"training_loop.tensorboard: true needs the tensorboardX package"
    ) as info:
        train(model(), regression_examples(), Regression(), regression_settings(2, tensorboard=True), tmp_path,
              callbacks=[])  # fmt: skip
    assert info.value.exit_code == 2 and "pip install 'zrecipe[tensorboard]'" in str(info.value)
    assert not (tmp_path / "checkpoints").exists()  # refused before training
