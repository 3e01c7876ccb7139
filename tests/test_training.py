"""The training loop on the tiny model: learning, bit-exact resume, stopping, checkpoint contents."""

from __future__ import annotations

import json
import zipfile

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from zrecipe.errors import CheckpointError
from zrecipe.models.z_image.tiny import create_tiny_model
from zrecipe.models.z_image.training import FlowMatchingObjective, flow_matching_loss
from zrecipe.models.z_image.transformer import load_transformer
from zrecipe.recipe import LoraTarget, Optimizer
from zrecipe.training.checkpoint import MEMBERS, read_checkpoint
from zrecipe.training.data import Example
from zrecipe.training.loop import RunInfo, TrainSettings, train
from zrecipe.training.stop import BatteryStatus, StopMonitor

ATTN = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
ALL = ATTN + ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return create_tiny_model(tmp_path_factory.mktemp("train") / "tiny")


def make_examples(
    cap_dim: int, n: int = 4, seed: int = 0, dropout: float = 0.0, wide: int = 0
) -> list[Example]:
    """Smooth (learnable) latents: 2×2 blocks of 4×4 pixels; `wide` extra items in a second bucket."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n + wide):
        h, w = (8, 8) if i < n else (8, 16)
        low = rng.standard_normal((16, h // 4, w // 4)).astype(np.float32)
        latents = np.kron(low, np.ones((1, 4, 4), np.float32))
        caption = rng.standard_normal((4 + i, cap_dim)).astype(np.float32)
        items.append(
            Example(latents, caption, (h, w), dataset="a" if i % 2 else "b", caption_dropout=dropout)
        )
    return items


def settings(mode: str, steps: int, **overrides) -> TrainSettings:
    base = {
        "mode": mode, "seed": 3, "batch_size": 2, "max_steps": steps, "sigma_sampling": "uniform", "shift": 6.0,
        "lora_targets": (LoraTarget("layers", 0, None, ALL, rank=8, alpha=8.0),),
        "optimizer": Optimizer(learning_rate=1e-2 if mode == "lora" else 1e-3), "checkpoint_frequency": 1000,
    }  # fmt: skip
    base.update(overrides)
    return TrainSettings(**base)


def quiet_train(model, examples, empty, cfg, out, identity: str = "", callbacks=(), **kwargs):
    """train() with Z-Image's objective, no progress bar and no signal handlers; `kwargs` go to RunInfo,
    except resume_from and force."""
    resume = {k: kwargs.pop(k) for k in ("resume_from", "force") if k in kwargs}
    objective = FlowMatchingObjective.from_settings(cfg, empty)
    run = RunInfo(model_identity=identity, **kwargs)
    return train(model, examples, objective, cfg, out, run=run, callbacks=callbacks, **resume)


def fixed_batch_loss(model, examples) -> float:
    x0 = mx.stack([mx.array(e.latents) for e in examples])
    caps = [mx.array(e.caption) for e in examples]
    sigma = mx.linspace(0.2, 0.8, len(examples))
    noise = mx.random.normal(x0.shape, key=mx.random.key(123))
    return flow_matching_loss(model, x0, caps, sigma, noise).item()


def learning_run(tiny_path, tmp_path, mode: str, steps: int) -> float:
    model = load_transformer(tiny_path, dtype="float32")
    examples = make_examples(model.config.cap_feat_dim)
    before = fixed_batch_loss(model, examples)
    result = quiet_train(model, examples, np.zeros((3, model.config.cap_feat_dim), np.float32),
                         settings(mode, steps, batch_size=4), tmp_path / mode)  # fmt: skip
    assert result.step == steps and result.final_path.is_file()
    return 1.0 - fixed_batch_loss(model, examples) / before


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_lowers_the_loss_fast(tiny_path, tmp_path, mode):
    assert learning_run(tiny_path, tmp_path, mode, 20) >= 0.20


# The learning criterion; ~20 s per mode on 2 cores, so it stays in the default (CI) run.
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_lowers_the_loss_by_30_percent_in_200_steps(tiny_path, tmp_path, mode):
    assert learning_run(tiny_path, tmp_path, mode, 200) >= 0.30


def _tensors(zip_path, member):
    ckpt = read_checkpoint(zip_path)
    return ckpt.adapter if member == "adapter" else ckpt.optimizer


def _assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        assert value.dtype == b[key].dtype and value.shape == b[key].shape, key
        assert np.array(value).tobytes() == np.array(b[key]).tobytes(), key


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_is_bit_exact(tiny_path, tmp_path, mode):
    """N straight steps == N/2, resume, N/2 (gradient accumulation and caption dropout on)."""
    n = 6
    cfg = settings(mode, n, gradient_accumulation_steps=2, checkpoint_frequency=n // 2)
    model = load_transformer(tiny_path, dtype="float32")
    examples = make_examples(model.config.cap_feat_dim, dropout=0.5, wide=2)
    empty = np.zeros((3, model.config.cap_feat_dim), np.float32)
    straight = quiet_train(model, examples, empty, cfg, tmp_path / "straight", "tiny")
    half = tmp_path / "straight" / "checkpoints" / f"{n // 2:07d}_checkpoint.zip"
    assert half.is_file() and straight.checkpoint.name == f"{n:07d}_checkpoint.zip"

    resumed_model = load_transformer(tiny_path, dtype="float32")
    resumed = quiet_train(resumed_model, examples, empty, cfg, tmp_path / "resumed", "tiny", resume_from=half)
    assert resumed.step == n
    for member in ("adapter", "optimizer"):
        _assert_identical(_tensors(straight.checkpoint, member), _tensors(resumed.checkpoint, member))
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
    final_a = mx.load(str(straight.final_path))
    final_b = mx.load(str(resumed.final_path))
    _assert_identical(final_a, final_b)


def test_checkpoint_members_and_metadata(tiny_path, tmp_path):
    model = load_transformer(tiny_path, dtype="float32")
    examples = make_examples(model.config.cap_feat_dim)
    empty = np.zeros((2, model.config.cap_feat_dim), np.float32)
    result = quiet_train(model, examples, empty, settings("lora", 4, checkpoint_frequency=2, keep_last=1),
                         tmp_path, "tiny-id", train_step_key="k123", config={"mode": "lora"})  # fmt: skip
    zips = sorted((tmp_path / "checkpoints").glob("*.zip"))
    assert [z.name for z in zips] == ["0000004_checkpoint.zip"]  # keep_last=1 pruned step 2
    with zipfile.ZipFile(zips[0]) as zf:
        assert sorted(zf.namelist()) == sorted(MEMBERS)
        meta = json.loads(zf.read("checkpoint.json"))
        iterator = json.loads(zf.read("iterator.json"))
        loss = json.loads(zf.read("loss.json"))
        config = json.loads(zf.read("config.json"))
    assert meta["step"] == 4 and meta["model_identity"] == "tiny-id" and meta["train_step_key"] == "k123"
    assert meta["mode"] == "lora" and set(meta["files"]) == set(MEMBERS) - {"checkpoint.json"}
    assert {"zrecipe", "mlx"} <= set(meta["versions"]) and meta["dataset_fingerprint"]
    assert {"epoch", "position", "permutation", "rng"} <= set(iterator)
    assert [h["step"] for h in loss] == [1, 2, 3, 4] and config == {"mode": "lora"}
    assert (tmp_path / "loss.json").is_file() and (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    _, adapter_meta = mx.load(str(result.final_path), return_metadata=True)
    assert adapter_meta["format"] == "zrecipe" and adapter_meta["step"] == "4"
    assert result.trainable_parameters == sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    assert result.peak_memory_bytes > 0


def test_refusals_leave_the_model_untouched(tiny_path, tmp_path):
    model = load_transformer(tiny_path, dtype="float32")
    examples = make_examples(model.config.cap_feat_dim)
    empty = np.zeros((2, model.config.cap_feat_dim), np.float32)
    cfg = settings("lora", 2, checkpoint_frequency=1)
    quiet_train(model, examples, empty, cfg, tmp_path / "run", "tiny")
    good = tmp_path / "run" / "checkpoints" / "0000001_checkpoint.zip"

    damaged = tmp_path / "damaged.zip"
    data = bytearray(good.read_bytes())
    data[len(data) // 3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(good.read_bytes()[: len(data) // 2])
    for bad in (damaged, truncated):
        fresh = load_transformer(tiny_path, dtype="float32")
        before = dict(tree_flatten(fresh.parameters()))
        with pytest.raises(CheckpointError, match="damaged"):
            quiet_train(fresh, examples, empty, cfg, tmp_path / "r", "tiny", resume_from=bad)
        after = dict(tree_flatten(fresh.parameters()))
        assert sorted(before) == sorted(after) and all(mx.array_equal(before[k], after[k]) for k in before)

    fresh = load_transformer(tiny_path, dtype="float32")
    with pytest.raises(CheckpointError, match="made for model"):
        quiet_train(fresh, examples, empty, cfg, tmp_path / "r", "other", resume_from=good)
    changed = make_examples(model.config.cap_feat_dim, seed=9)
    with pytest.raises(CheckpointError, match="--force"):
        quiet_train(fresh, changed, empty, cfg, tmp_path / "r", "tiny", resume_from=good)
    forced = quiet_train(fresh, changed, empty, cfg, tmp_path / "r", "tiny", resume_from=good, force=True)
    assert forced.step == 2


def test_checkpoint_of_the_uncorrected_adamw_is_refused(tiny_path, tmp_path):
    """A zip whose optimizer.safetensors has no update rule (older zrecipe, AdamW without bias correction)."""
    from zrecipe.training.checkpoint import write_checkpoint

    model = load_transformer(tiny_path, dtype="float32")
    examples = make_examples(model.config.cap_feat_dim)
    empty = np.zeros((2, model.config.cap_feat_dim), np.float32)
    cfg = settings("lora", 1)
    run = quiet_train(model, examples, empty, cfg, tmp_path / "run", "tiny")
    new = read_checkpoint(run.checkpoint)
    assert new.optimizer_metadata["rule"] == "adamw-pytorch"
    old = write_checkpoint(tmp_path / "old", new.step, (new.adapter, new.adapter_metadata), new.optimizer,
                           new.iterator, new.loss, new.config, new.meta)  # fmt: skip
    fresh = load_transformer(tiny_path, dtype="float32")
    before = dict(tree_flatten(fresh.parameters()))
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors: .*older zrecipe.*bias"):
        quiet_train(fresh, examples, empty, cfg, tmp_path / "r", "tiny", resume_from=old)
    assert all(mx.array_equal(before[k], v) for k, v in tree_flatten(fresh.parameters()))


def test_battery_stop_checkpoints_and_resumes_exactly(tiny_path, tmp_path):
    model = load_transformer(tiny_path, dtype="float32")
    examples = make_examples(model.config.cap_feat_dim)
    empty = np.zeros((2, model.config.cap_feat_dim), np.float32)
    cfg = settings("lora", 4)
    levels = iter([50, 30, 19, 10])
    monitor = StopMonitor(20, battery_reader=lambda: BatteryStatus(next(levels), discharging=True))
    stopped = quiet_train(model, examples, empty, cfg, tmp_path / "a", callbacks=[monitor])
    assert stopped.step == 3 and stopped.final_path is None and "battery at 19%" in stopped.stopped
    assert stopped.checkpoint.name == "0000003_checkpoint.zip"
    resumed = quiet_train(load_transformer(tiny_path, dtype="float32"), examples, empty, cfg, tmp_path / "b",
                          resume_from=stopped.checkpoint)  # fmt: skip
    straight = quiet_train(load_transformer(tiny_path, dtype="float32"), examples, empty, cfg, tmp_path / "c")
    _assert_identical(mx.load(str(resumed.final_path)), mx.load(str(straight.final_path)))


def test_gradient_checkpointing_gives_the_same_loss(tiny_path, tmp_path):
    losses = []
    for flag in (False, True):
        model = load_transformer(tiny_path, dtype="float32")
        examples = make_examples(model.config.cap_feat_dim)
        result = quiet_train(
            model,
            examples,
            np.zeros((2, model.config.cap_feat_dim), np.float32),
            settings("lora", 2, gradient_checkpointing=flag),
            tmp_path / str(flag),
        )
        losses.append([h["loss"] for h in result.history])
    assert np.allclose(losses[0], losses[1], rtol=1e-5)


def test_batch_iterator_is_deterministic_bucketed_and_resumable():
    from zrecipe.training.data import BatchIterator, dataset_fingerprint

    examples = make_examples(8, n=5, wide=3)
    examples = [
        e if i != 1 else Example(e.latents, e.caption, e.bucket, "b", repeats=3)
        for i, e in enumerate(examples)
    ]
    it = BatchIterator(examples, batch_size=2, seed=5)
    first = [it.next()[0] for _ in range(20)]
    assert first == [BatchIterator(examples, 2, 5).next()[0] for _ in range(1)] + first[1:]
    assert all(len({examples[i].bucket for i in b}) == 1 for b in first)  # bucket-pure batches
    epoch0 = BatchIterator(examples, 2, 5).epoch_batches(0)
    assert sorted(i for b in epoch0 for i in b).count(1) == 3  # repeats
    assert epoch0 != BatchIterator(examples, 2, 5).epoch_batches(1)  # reshuffled per epoch

    it = BatchIterator(examples, batch_size=2, seed=5)
    for _ in range(7):
        it.next()
    state = json.loads(json.dumps(it.state()))
    rest = [it.next()[0] for _ in range(10)]
    again = BatchIterator(examples, batch_size=2, seed=5)
    again.restore(state)
    assert [again.next()[0] for _ in range(10)] == rest
    assert dataset_fingerprint(examples) == dataset_fingerprint(list(examples))
    assert dataset_fingerprint(examples) != dataset_fingerprint(examples[:-1])


def test_stop_monitor_signals_and_battery_readers(tmp_path):
    import signal

    from zrecipe.training.stop import _read_linux_battery, parse_pmset

    with StopMonitor() as monitor:
        assert monitor.reason() is None
        signal.raise_signal(signal.SIGTERM)
        assert monitor.reason() == "received SIGTERM"
    text = "Now drawing from 'Battery Power'\n -InternalBattery-0 (id=1)\t18%; discharging; 0:40 remaining"
    assert parse_pmset(text) == BatteryStatus(18, True)
    assert parse_pmset("Now drawing from 'AC Power'\n -InternalBattery-0\t100%; charged;") == BatteryStatus(
        100, False
    )
    bat = tmp_path / "BAT0"
    bat.mkdir()
    (bat / "type").write_text("Battery\n")
    (bat / "capacity").write_text("42\n")
    (bat / "status").write_text("Discharging\n")
    assert _read_linux_battery(tmp_path) == BatteryStatus(42, True)
    charging = StopMonitor(50, battery_reader=lambda: BatteryStatus(10, discharging=False))
    assert charging.reason() is None  # plugged in: never stop for the battery
