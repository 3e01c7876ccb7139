"""The loop's seams without Z-Image: another model family's objective, and the callback protocol."""

from __future__ import annotations

import signal

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

from zrecipe.recipe import Optimizer
from zrecipe.training.callbacks import TrainingCallback
from zrecipe.training.data import Example
from zrecipe.training.loop import TrainSettings, train
from zrecipe.training.stop import StopMonitor


class Regression:
    """A second 'model family': y = W x + noise-free targets, its own batch preparation and loss."""

    def batch(self, examples, indices, step, micro, share):
        rows = indices if share is None else indices[share.start : share.stop]
        x = mx.stack([mx.array(examples[i].latents) for i in rows])
        y = mx.stack([mx.array(examples[i].caption) for i in rows])
        return x, y

    def loss(self, model, batch, key, share):
        x, y = batch
        return mx.mean(mx.square(model(x) - y))

    def checkpoint_blocks(self, model):
        return [model]


def regression_examples(n: int = 8) -> list[Example]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 5)).astype(np.float32)
    xs = rng.standard_normal((n, 5)).astype(np.float32)
    return [Example(x, w @ x, (1, 1)) for x in xs]


def model() -> nn.Module:
    mx.random.seed(1)
    linear = nn.Linear(5, 3, bias=False)
    mx.eval(linear.parameters())
    return linear


def regression_settings(steps: int, **overrides) -> TrainSettings:
    base = dict(mode="full", seed=2, batch_size=2, max_steps=steps, optimizer=Optimizer(learning_rate=2e-1),
                checkpoint_frequency=3, max_grad_norm=None)  # fmt: skip
    return TrainSettings(**{**base, **overrides})


def test_a_second_model_family_trains_and_resumes_through_the_same_loop(tmp_path):
    examples = regression_examples()
    trained, everything = model(), Regression().batch(examples, list(range(len(examples))), 0, 0, None)
    before = Regression().loss(trained, everything, None, None).item()
    straight = train(trained, examples, Regression(), regression_settings(6), tmp_path / "a", callbacks=[])
    assert straight.final_path.name == "transformer.safetensors"
    assert Regression().loss(trained, everything, None, None).item() < 0.5 * before
    losses = [h["loss"] for h in straight.history]
    half = tmp_path / "a" / "checkpoints" / "0000003_checkpoint.zip"
    resumed = train(model(), examples, Regression(), regression_settings(6), tmp_path / "b", resume_from=half,
                    callbacks=[])  # fmt: skip
    a, b = mx.load(str(straight.final_path)), mx.load(str(resumed.final_path))
    assert np.array(a["weight"]).tobytes() == np.array(b["weight"]).tobytes()
    # gradient checkpointing recomputes the family's blocks and changes nothing but memory
    checkpointed = train(model(), examples, Regression(), regression_settings(6, gradient_checkpointing=True),
                         tmp_path / "c", callbacks=[])  # fmt: skip
    assert np.allclose([h["loss"] for h in checkpointed.history], losses, rtol=1e-6)


class Recorder(TrainingCallback):
    def __init__(self, fail_at: int | None = None, stop_at: int | None = None):
        self.events: list = []
        self.fail_at, self.stop_at = fail_at, stop_at

    def on_train_begin(self, state):
        self.events.append(("begin", state.step, state.total_steps))

    def stop_reason(self, state):
        return "enough" if self.stop_at is not None and state.step == self.stop_at else None

    def on_step(self, state, report):
        assert state.step == report.step and state.history[-1] == report.record()
        self.events.append(("step", report.step, report.loss))
        if report.step == self.fail_at:
            raise RuntimeError("callback failed")

    def on_train_end(self, state):
        self.events.append(("end", state.step))


def test_callbacks_see_every_step_stop_the_run_and_always_end(tmp_path):
    examples = regression_examples()
    recorder = Recorder()
    result = train(
        model(), examples, Regression(), regression_settings(4), tmp_path / "a", callbacks=[recorder]
    )
    assert recorder.events == [("begin", 0, 4), *[("step", h["step"], h["loss"]) for h in result.history],
                               ("end", 4)]  # fmt: skip

    stopper = Recorder(stop_at=2)
    stopped = train(
        model(), examples, Regression(), regression_settings(4), tmp_path / "b", callbacks=[stopper]
    )
    assert stopped.stopped == "enough" and stopped.step == 2 and stopped.final_path is None
    assert stopped.checkpoint.name == "0000002_checkpoint.zip"

    before = signal.getsignal(signal.SIGINT)
    failing, monitor = Recorder(fail_at=2), StopMonitor()
    with pytest.raises(RuntimeError, match="callback failed"):
        train(
            model(),
            examples,
            Regression(),
            regression_settings(4),
            tmp_path / "c",
            callbacks=[monitor, failing],
        )
    assert failing.events[-1] == ("end", 2) and signal.getsignal(signal.SIGINT) is before  # handlers restored
