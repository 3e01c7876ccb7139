"""The EMA of the trained weights: against a hand-computed average and torch's AveragedModel, through
checkpoints (bit-exact resume, six zip members), as LoRA files, and refused where it does not fit."""

from __future__ import annotations

import json
import zipfile

import mlx.core as mx
import numpy as np
import pytest
from test_training_loop import Regression, model, regression_examples, regression_settings

from zrecipe.errors import CheckpointError
from zrecipe.recipe import Ema, LoraTarget
from zrecipe.training.callbacks import TrainingCallback
from zrecipe.training.checkpoint import MEMBERS, read_checkpoint
from zrecipe.training.ema import ema_weights
from zrecipe.training.loop import train


class Weights(TrainingCallback):
    """The trained weight after every step (a callback before the EMA's sees the same weights)."""

    def __init__(self):
        self.seen: list[np.ndarray] = []

    def on_train_begin(self, state):
        self.seen.append(np.array(state.model.weight, dtype=np.float64))

    def on_step(self, state, report):
        self.seen.append(np.array(state.model.weight, dtype=np.float64))


def hand_ema(weights: list[np.ndarray], decay: float, start: int, every: int) -> np.ndarray:
    shadow = weights[0]
    for step, w in enumerate(weights[1:], start=1):
        if step <= start:
            shadow = w
        elif (step - start) % every == 0:
            shadow = decay * shadow + (1 - decay) * w
    return shadow


@pytest.mark.parametrize(("start", "every"), [(0, 1), (2, 2), (3, 3)])
def test_ema_is_the_hand_computed_average_and_torch_averaged_model(tmp_path, start, every):
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

    spec = Ema(decay=0.8, start_step=start, every=every)
    recorder = Weights()
    result = train(model(), regression_examples(), Regression(), regression_settings(8, ema=spec), tmp_path,
                   callbacks=[recorder])  # fmt: skip
    ema = mx.load(str(tmp_path / "transformer_ema.safetensors"))["weight"]
    trained = mx.load(str(result.final_path))["weight"]
    assert not np.allclose(np.array(ema), np.array(trained))  # the average lags the trained weights
    np.testing.assert_allclose(
        np.array(ema), hand_ema(recorder.seen, 0.8, start, every), rtol=1e-6, atol=1e-7
    )

    # torch: the average starts (a copy) at start_step, then every `every` steps.
    holder = torch.nn.Linear(5, 3, bias=False)
    averaged = AveragedModel(holder, avg_fn=get_ema_avg_fn(0.8))
    for step, w in enumerate(recorder.seen):
        if step >= start and (step - start) % every == 0:
            holder.weight.data = torch.tensor(w, dtype=torch.float32)
            averaged.update_parameters(holder)
    reference = averaged.module.weight.detach().numpy()
    np.testing.assert_allclose(np.array(ema), reference, rtol=1e-6, atol=1e-7)


def test_ema_resumes_bit_exactly_and_keeps_six_members(tmp_path):
    settings = regression_settings(6, ema=Ema(decay=0.7, start_step=1, every=2))
    straight = train(model(), regression_examples(), Regression(), settings, tmp_path / "a", callbacks=[])
    half = tmp_path / "a" / "checkpoints" / "0000003_checkpoint.zip"
    with zipfile.ZipFile(half) as zf:
        assert sorted(zf.namelist()) == sorted(MEMBERS)
    resumed = train(model(), regression_examples(), Regression(), settings, tmp_path / "b", resume_from=half,
                    callbacks=[])  # fmt: skip
    for a, b in ((straight.checkpoint, resumed.checkpoint),):
        ca, cb = read_checkpoint(a), read_checkpoint(b)
        assert sorted(ca.optimizer) == sorted(cb.optimizer) and "ema/weight" in ca.optimizer
        for key, value in ca.optimizer.items():
            assert np.array(value).tobytes() == np.array(cb.optimizer[key]).tobytes(), key
        assert json.loads(ca.optimizer_metadata["ema"]) == {"decay": 0.7, "start_step": 1, "every": 2}
    a = (tmp_path / "a" / "transformer_ema.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "transformer_ema.safetensors").read_bytes()
    assert straight.history == [
        {**h, "time": s["time"]} for h, s in zip(resumed.history, straight.history, strict=True)
    ]


def test_a_checkpoint_and_a_recipe_that_disagree_on_ema_are_refused(tmp_path):
    with_ema = regression_settings(4, ema=Ema())
    train(model(), regression_examples(), Regression(), with_ema, tmp_path / "a", callbacks=[])
    zip_a = tmp_path / "a" / "checkpoints" / "0000003_checkpoint.zip"
    with pytest.raises(CheckpointError, match="keeps EMA of the weights but this recipe asks for none"):
        train(model(), regression_examples(), Regression(), regression_settings(4), tmp_path / "b",
              resume_from=zip_a, callbacks=[])  # fmt: skip
    train(model(), regression_examples(), Regression(), regression_settings(4), tmp_path / "c", callbacks=[])
    zip_c = tmp_path / "c" / "checkpoints" / "0000003_checkpoint.zip"
    with pytest.raises(CheckpointError, match="keeps no EMA of the weights but this recipe asks for one"):
        train(model(), regression_examples(), Regression(), with_ema, tmp_path / "d", resume_from=zip_c,
              callbacks=[])  # fmt: skip


def test_lora_ema_is_a_lora_file_in_checkpoints_and_beside_the_adapter(tmp_path):
    """On the tiny Z-Image: the EMA of the LoRA tensors, resumed bit-exactly, readable as a LoRA."""
    from test_training import make_examples, quiet_train, settings

    from zrecipe.export.lora_formats import read_lora
    from zrecipe.models.z_image.tiny import create_tiny_model
    from zrecipe.models.z_image.transformer import load_transformer

    tiny = create_tiny_model(tmp_path / "tiny")
    targets = (LoraTarget("layers", 0, None, ("attention.to_q", "attention.to_v"), rank=4, alpha=4.0),)
    cfg = settings("lora", 4, lora_targets=targets, checkpoint_frequency=2, ema=Ema(decay=0.5))
    transformer = load_transformer(tiny, dtype="float32")
    examples = make_examples(transformer.config.cap_feat_dim)
    empty = np.zeros((2, transformer.config.cap_feat_dim), np.float32)
    straight = quiet_train(transformer, examples, empty, cfg, tmp_path / "a", "tiny")
    ema_file = tmp_path / "a" / "adapter_ema.safetensors"
    tensors, metadata = mx.load(str(ema_file), return_metadata=True)
    adapter = mx.load(str(straight.final_path))
    assert sorted(tensors) == sorted(adapter) and metadata["ema"] and metadata["format"] == "zrecipe"
    assert any(not np.array_equal(np.array(tensors[k]), np.array(adapter[k])) for k in tensors)
    # the last checkpoint's EMA weights are the final EMA file's tensors
    from_zip, meta = ema_weights(read_checkpoint(straight.checkpoint))
    assert all(np.array(from_zip[k]).tobytes() == np.array(tensors[k]).tobytes() for k in tensors)
    assert meta["ema"] == metadata["ema"]
    read = read_lora(ema_file)
    assert sorted(read.deltas) == sorted(read_lora(straight.final_path).deltas) and not read.unmatched

    half = tmp_path / "a" / "checkpoints" / "0000002_checkpoint.zip"
    resumed = quiet_train(load_transformer(tiny, dtype="float32"), examples, empty, cfg, tmp_path / "b", "tiny",
                          resume_from=half)  # fmt: skip
    assert resumed.step == 4
    assert ema_file.read_bytes() == (tmp_path / "b" / "adapter_ema.safetensors").read_bytes()
