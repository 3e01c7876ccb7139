"""The Z-Image build: recipe → graph → plan → execute → publish. What `zrecipe build` / `plan` call.

Planning imports no MLX (scan, captions, stat cache, keys); the steps import it when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zrecipe.pipeline.graph import KINDS, PipelineData, build_graph, default_cache_dir

__all__ = ["KINDS", "BuildOutcome", "PipelineData", "build_recipe", "default_cache_dir", "plan_recipe"]


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
    from zrecipe.pipeline.checks import warn_long_texts

    cache_dir = _cache(recipe, cache)
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
) -> BuildOutcome:
    """Plan and run the stale steps of `recipe`, then publish the results into its output folder.

    Under a distributed launcher (`mlx.launch`) every rank calls this: the ranks share the per-item steps
    and train together (zrecipe.pipeline.distributed); `published` is None on ranks > 0."""
    from zrecipe.engine import Store, build
    from zrecipe.errors import InputDamaged
    from zrecipe.pipeline.checks import warn_long_texts
    from zrecipe.pipeline.publish import prepare_output, publish
    from zrecipe.training.distributed import launched

    cache_dir = _cache(recipe, cache)
    if launched():
        from zrecipe.pipeline.distributed import build_distributed
        from zrecipe.training.distributed import world

        out = Path(recipe.save.output_path)
        out.mkdir(parents=True, exist_ok=True)
        plan, report, published = build_distributed(
            recipe, cache_dir, until, force, jobs, progress, battery_limit, out / "build-report.json", world()
        )
        return BuildOutcome(plan, report, published, cache_dir, None)
    graph, data = build_graph(recipe, cache_dir, until=until)
    data.options.update(progress=progress, battery_limit=battery_limit)
    out = prepare_output(recipe)
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
