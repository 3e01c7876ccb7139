"""Two MLX ranks over loopback (`mlx.launch -n 2 --backend ring`): data-parallel training equals one
process with the same global batch, and a sharded build writes exactly the store entries of a 1-rank one.

This file is also the ranks' program: `python tests/test_distributed.py train|collectives MODEL OUT STEPS`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # the e2e helpers (make_project), also when run as the ranks' script
LAUNCH = shutil.which("mlx.launch")
needs_launch = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")
CHECKPOINT_EVERY = 2


def make_examples(cap_dim: int):
    """9 items in two buckets with caption dropout: with a global batch of 4 the epoch has batches of 4, 1
    (rank 0 gets nothing: the weight-0 stand-in) and 3 (split 1 + 2), so uneven splits are covered."""
    from zrecipe.training.data import Example

    rng = np.random.default_rng(11)
    items = []
    for i in range(9):
        h, w = (8, 8) if i < 5 else (8, 16)
        low = rng.standard_normal((16, h // 4, w // 4)).astype(np.float32)
        caption = rng.standard_normal((3 + i % 4, cap_dim)).astype(np.float32)
        items.append(
            Example(np.kron(low, np.ones((1, 4, 4), np.float32)), caption, (h, w), caption_dropout=0.3)
        )
    return items


def train_run(model_path: str, out: str, steps: int, resume: str | None = None, callbacks=()):
    """The run both sides compare: LoRA, global batch 4, accumulation 2, dropout, fp32."""
    from zrecipe.models.z_image.training import FlowMatchingObjective
    from zrecipe.models.z_image.transformer import load_transformer
    from zrecipe.recipe import LoraTarget, Optimizer
    from zrecipe.training.loop import RunInfo, TrainSettings, train

    model = load_transformer(model_path, dtype="float32")
    cap_dim = model.config.cap_feat_dim
    targets = (
        LoraTarget("layers", 0, None, ("attention.to_q", "attention.to_v", "feed_forward.w1"), 4, 4.0),
    )
    settings = TrainSettings(
        mode="lora", seed=5, batch_size=4, gradient_accumulation_steps=2, max_steps=steps,
        sigma_sampling="uniform", shift=3.0, lora_targets=targets, optimizer=Optimizer(learning_rate=1e-3),
        checkpoint_frequency=CHECKPOINT_EVERY,
    )  # fmt: skip
    objective = FlowMatchingObjective.from_settings(settings, np.zeros((2, cap_dim), np.float32))
    return train(model, make_examples(cap_dim), objective, settings, out, run=RunInfo(model_identity="tiny"),
                 resume_from=resume, callbacks=callbacks)  # fmt: skip


def launch(*args: str, n: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [LAUNCH, "-n", str(n), "--backend", "ring", "--", sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent.parent)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from zrecipe.models.z_image.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("dist") / "tiny")


def max_rel_error(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    worst = 0.0
    for key in a:
        x, y = np.array(a[key], dtype=np.float64), np.array(b[key], dtype=np.float64)
        assert x.shape == y.shape, key
        scale = max(np.abs(y).max(), 1e-30)
        worst = max(worst, float(np.abs(x - y).max() / scale))
    return worst


@needs_launch
def test_two_ranks_train_the_same_adapter_as_one(tiny_model, tmp_path):
    import mlx.core as mx

    steps = 4
    one = train_run(str(tiny_model), str(tmp_path / "one"), steps)
    proc = launch(str(HERE), "train", str(tiny_model), str(tmp_path / "two"), str(steps))
    assert proc.returncode == 0, proc.stderr
    two = tmp_path / "two"
    a, b = mx.load(str(two / "adapter.safetensors")), mx.load(str(one.final_path))
    # Per tensor: max |a - b| / max |b|; lora_B starts at zero, so element-wise ratios mean nothing there.
    assert max_rel_error(a, b) <= 1e-5
    assert any(float(mx.abs(v).max()) > 0 for k, v in b.items() if "lora_B" in k)  # it did train
    losses_two = [h["loss"] for h in json.loads((two / "loss.json").read_text())]
    assert np.allclose(losses_two, [h["loss"] for h in one.history], rtol=1e-5, atol=0)
    # Rank 0 alone wrote the files, once each.
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [
        "0000002_checkpoint.zip",
        "0000004_checkpoint.zip",
    ]
    from zrecipe.training.checkpoint import read_checkpoint

    assert read_checkpoint(two / "checkpoints" / "0000004_checkpoint.zip").meta["world_size"] == 2

    # A 2-rank checkpoint resumes on 1 rank (every state is global): same run up to float rounding.
    half = two / "checkpoints" / f"{CHECKPOINT_EVERY:07d}_checkpoint.zip"
    resumed = train_run(str(tiny_model), str(tmp_path / "resumed"), steps, resume=str(half))
    assert max_rel_error(mx.load(str(resumed.final_path)), b) <= 1e-5


def store_entries(recipe: Path) -> dict[str, dict[str, tuple]]:
    """{kind: {item: (key, manifest {file: (size, xxh128)})}} of a built recipe's plan."""
    from zrecipe.engine import Store
    from zrecipe.pipeline import plan_recipe
    from zrecipe.recipe import load_recipe

    outcome = plan_recipe(load_recipe(recipe))
    store = Store(outcome.cache_dir)
    assert outcome.plan.stale_count == 0
    return {
        k: {p.node.item: (p.key, store.manifest(p.key)) for p in outcome.plan.nodes[k]}
        for k in outcome.plan.order
    }


@needs_launch
def test_two_rank_build_writes_the_entries_of_a_one_rank_build(tiny_model, tmp_path):
    import mlx.core as mx
    from test_e2e_build import make_project, zrecipe

    one = make_project(tmp_path / "one", tiny_model, images=12)
    two = make_project(tmp_path / "two", tiny_model, images=12)
    assert zrecipe("build", one, "-q") == 0
    proc = subprocess.run([sys.executable, "-m", "zrecipe.cli.main", "build", str(two), "-n", "2"],
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "@@zrecipe-rank-status" not in proc.stdout  # the markers are consumed by the parent
    assert proc.stdout.count("outputs in") == 1  # rank 0 alone reports
    # Rank 0's progress shows every rank's share of the sharded kinds and every rank's training speed.
    assert "encode-image: 12 items on 2 ranks: rank 0 " in proc.stderr and "rank 1 " in proc.stderr
    assert "items/s: r0 " in proc.stderr and " r1 " in proc.stderr

    a, b = store_entries(one), store_entries(two)
    for kind in ("resize", "encode-image", "encode-text"):
        assert a[kind] == b[kind], kind  # same items, keys and file hashes
    assert a["train"]["train"][0] == b["train"]["train"][0]  # the same train key: reused across world sizes
    # A global batch of 2 leaves 1 item per rank: the float rounding of a batch of 1 vs 2, amplified by
    # AdamW's sign-like first steps, reaches ~1e-5 here; the 1e-5 contract is checked with batch 4 above.
    ours, theirs = (mx.load(str(p.parent / "out" / "adapter.safetensors")) for p in (two, one))
    assert max_rel_error(ours, theirs) <= 1e-4
    report = json.loads((two.parent / "out" / "build-report.json").read_text())
    assert {k: v["ran"] for k, v in report["kinds"].items()} == {
        "resize": 12, "encode-image": 12, "encode-text": len(a["encode-text"]), "train": 1, "sample": 1,
        "contact-sheet": 1, "export": 1,
    }  # fmt: skip
    assert (two.parent / "out" / "samples" / "contact_sheet.png").is_file()
    assert not (two.parent / "cache" / ".dist").exists()  # the ranks' flags are cleaned up


@needs_launch
def test_a_failing_distributed_build_exits_with_the_error_code(tmp_path):
    from test_e2e_build import write_recipe

    recipe = tmp_path / "recipe.yaml"
    write_recipe(recipe, "tiny")
    (tmp_path / "data").mkdir()
    proc = subprocess.run([sys.executable, "-m", "zrecipe.cli.main", "build", str(recipe), "-n", "2", "--until", "nope"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("--until 'nope': unknown step") == 1  # printed by rank 0 only


@needs_launch
def test_collectives_agree_and_fail_together(tiny_model, tmp_path):
    proc = launch(str(HERE), "collectives", str(tiny_model), str(tmp_path / "odd"), "1")
    assert proc.returncode == 0  # mlx.launch itself always exits 0; the ranks report in their output
    assert proc.stdout.count("collectives ok") == 2, proc.stdout + proc.stderr
    # A global batch of 3 cannot split over 2 ranks: both ranks stop with the same clear error.
    odd = "exit 2: training_loop.batch_size: the global batch of 3 does not split evenly over 2 ranks"
    assert proc.stdout.count(odd) == 2, proc.stdout
    # A stop request on rank 1 alone (signal, battery) stops both ranks after the same step, checkpointed.
    assert proc.stdout.count("stopped together at step 2") == 2, proc.stdout
    assert (tmp_path / "stop" / "checkpoints" / "0000002_checkpoint.zip").is_file()


def test_exit_code_of_a_launch():
    from zrecipe.pipeline.launch import combine_codes

    assert combine_codes({0: 0, 1: 0}, 2) == 0
    assert combine_codes({0: 0, 1: 2}, 2) == 2
    assert combine_codes({0: 1, 1: 2}, 2) == 1
    assert combine_codes({0: 0}, 2) == 1  # a rank never reported
    assert combine_codes({}, None) == 1


def collectives_check() -> None:
    """Run on each of 2 ranks: gather, agreement, failure agreement and the bucketed gradient sum."""
    import mlx.core as mx

    from zrecipe.training import distributed as dist

    w = dist.world()
    assert w.size == 2
    assert dist.gather_bytes(b"x" * (w.rank + 1), w) == [b"x", b"xx"]
    dist.agree("a constant", "same", w)
    try:
        dist.agree("the rank", f"value {w.rank}", w)
        raise AssertionError("agree() accepted different values")
    except dist.DistributedError as exc:
        assert "ranks disagree about the rank (rank 1 differ" in str(exc) and "value 1" in str(exc)
    try:
        with dist.phase("a step", w):
            if w.rank == 1:
                raise ValueError("broken on rank 1")
        raise AssertionError("phase() did not raise")
    except (dist.DistributedError, ValueError) as exc:
        assert "broken on rank 1" in str(exc) and getattr(exc, "all_ranks", False)
    grads = {"a": mx.full((3, 2), w.rank + 1.0), "b": [mx.arange(5.0) * (w.rank + 1), mx.ones((1,)) * w.rank]}
    for bucket in (1, 0):  # one bucket per array; everything in one bucket
        total = dist.sum_gradients(grads, w, bucket_bytes=bucket if bucket else 1 << 30)
        assert mx.array_equal(total["a"], mx.full((3, 2), 3.0)).item()
        assert mx.array_equal(total["b"][0], mx.arange(5.0) * 3).item()
        assert mx.array_equal(total["b"][1], mx.ones((1,))).item()
    assert dist.local_slice(4, w) == (2 * w.rank, 2 * w.rank + 2) and dist.local_slice(1, w) == (0, w.rank)
    print("collectives ok", flush=True)


def _main(argv: list[str]) -> int:
    mode, model_path, out, steps, *rest = argv
    if mode == "train":
        train_run(model_path, out, int(steps), rest[0] if rest else None)
        return 0
    collectives_check()
    # Then a global batch of 3 on 2 ranks must fail on both ranks with the same clear error.
    import dataclasses

    from zrecipe.errors import UserError
    from zrecipe.training import loop

    original = loop.train

    def odd(model, examples, objective, settings, *args, **kwargs):
        return original(
            model, examples, objective, dataclasses.replace(settings, batch_size=3), *args, **kwargs
        )

    loop.train = odd
    try:
        train_run(model_path, out, int(steps))
    except UserError as exc:
        print(f"exit {exc.exit_code}: {exc}", flush=True)  # no exit 2: a failing rank makes mlx.launch kill
    loop.train = original  # the other, which could then not print its own message
    stop_check(model_path, str(Path(out).parent / "stop"))
    return 0


def stop_check(model_path: str, out: str) -> None:
    from zrecipe.training import distributed as dist
    from zrecipe.training.stop import StopMonitor

    class StopOnRank1(StopMonitor):
        calls = 0

        def reason(self):
            self.calls += 1
            return "signal SIGTERM" if dist.world().rank == 1 and self.calls == 2 else None

    result = train_run(model_path, out, 10, callbacks=[StopOnRank1()])
    if result.stopped and result.step == 2:
        print("stopped together at step 2", flush=True)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
