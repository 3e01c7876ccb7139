"""The Z-Image build: recipe → graph → plan → execute → publish. What `zrecipe build` / `plan` / `train`
call.

Planning imports no MLX (scan, captions, stat cache, keys); the steps import it when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zrecipe.pipeline.graph import PipelineData, build_graph, default_cache_dir
from zrecipe.pipeline.kinds import KINDS
from zrecipe.pipeline.steps import TrainingStopped

__all__ = [
    "KINDS",
    "BuildOutcome",
    "PipelineData",
    "TrainingStopped",
    "build_recipe",
    "default_cache_dir",
    "plan_recipe",
    "train_recipe",
]


@dataclass
class BuildOutcome:
    plan: Any
    report: Any = None
    published: dict[str, list[str]] | None = None
    cache_dir: Path | None = None
    skipped_at_plan: list[str] | None = None


def _cache(recipe, cache: str | Path | None) -> Path:
    from zrecipe.engine.store import prepare_root

    return prepare_root(Path(cache).expanduser() if cache else default_cache_dir(recipe))


def plan_recipe(recipe, cache: str | Path | None = None, until: str | None = None, force=()) -> BuildOutcome:
    """What a build of `recipe` would run and why (takes the store lock briefly, runs nothing)."""
    from zrecipe.engine import Store, build
    from zrecipe.models.z_image.resolve import no_downloads
    from zrecipe.pipeline.checks import warn_long_texts

    cache_dir = _cache(recipe, cache)
    with no_downloads():  # a plan never fetches the model: it says what the build would download
        graph, data = build_graph(recipe, cache_dir, until=until)
    plan, _ = build(graph, Store(cache_dir), data, force=force, dry_run=True, lock_timeout=60,
                    on_plan=lambda p: warn_long_texts(p, data))  # fmt: skip
    return BuildOutcome(plan, cache_dir=cache_dir, skipped_at_plan=data.options["skipped_at_plan"])


def build_recipe(
    recipe,
    cache: str | Path | None = None,
    until: str | None = None,
    force=(),
    jobs: int | None = None,
    progress: bool = True,
    battery_limit: int | None = None,
    low_ram: bool = False,
    resume_checkpoint: str | Path | None = None,
) -> BuildOutcome:
    """Plan and run the stale steps of `recipe`, then publish the results into its output folder.

    Runtime options, none of which can change a stored byte: `progress`, `battery_limit` (stop training
    with a checkpoint at this battery percentage), `low_ram` (release MLX's cache after every training
    step), `resume_checkpoint` (a checkpoint zip of this recipe's training run, copied into the train
    step's work folder to resume from). `force=("train",)` also empties the train step's work folder.
    A training stop raises TrainingStopped (nothing is published).

    Under a distributed launcher (`mlx.launch`) every rank calls this: the ranks share the per-item steps
    and train together (zrecipe.pipeline.distributed); `published` is None on ranks > 0."""
    from zrecipe.engine import Store, build
    from zrecipe.errors import InputDamaged
    from zrecipe.pipeline.checks import warn_long_texts
    from zrecipe.pipeline.publish import prepare_output, publish
    from zrecipe.training.distributed import launched

    cache_dir = _cache(recipe, cache)
    out = prepare_output(recipe)  # created and checked writable before any step runs
    options = {
        "progress": progress,
        "battery_limit": battery_limit,
        "force": tuple(force),
        "low_ram": low_ram,
        "resume_checkpoint": None if resume_checkpoint is None else str(resume_checkpoint),
    }
    if launched():
        from zrecipe.pipeline.distributed import build_distributed
        from zrecipe.training.distributed import world

        plan, report, published = build_distributed(
            recipe, cache_dir, until, force, jobs, options, out / "build-report.json", world()
        )
        return BuildOutcome(plan, report, published, cache_dir, None)
    graph, data = build_graph(recipe, cache_dir, until=until)
    data.options.update(options)
    store = Store(cache_dir)
    for attempt in range(2):
        plan, report = build(graph, store, data, force=force, jobs=jobs, progress=progress,
                             report_path=out / "build-report.json", on_plan=lambda p: warn_long_texts(p, data))  # fmt: skip
        try:
            published = publish(plan, store, recipe, report)
            break
        except InputDamaged:  # a damaged entry met while publishing was discarded: build it again
            if attempt:
                raise
    return BuildOutcome(plan, report, published, cache_dir, data.options["skipped_at_plan"])


def train_recipe(
    recipe,
    cache: str | Path | None = None,
    checkpoint: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    battery_limit: int | None = None,
    low_ram: bool = False,
) -> BuildOutcome:
    """`zrecipe train`: the build graph of `recipe` up to `train` — the same nodes, keys and store as
    `zrecipe build`, published the same way. `checkpoint` resumes that checkpoint (it must belong to this
    recipe's training run); `force` trains from scratch."""
    return build_recipe(
        recipe,
        cache,
        until="train",
        force=("train",) if force else (),
        progress=progress,
        battery_limit=battery_limit,
        low_ram=low_ram,
        resume_checkpoint=checkpoint,
    )
