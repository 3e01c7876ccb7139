"""`zrecipe build`, `zrecipe plan` and `zrecipe explain`: thin wrappers over zrecipe.pipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from zrecipe.cli.download import OfflineOpt

RecipeArg = typer.Argument(..., help="Recipe file (YAML or JSON).", show_default=False)
CacheOpt = typer.Option(None, "--cache", help="Store folder (default: `cache:` in the recipe, $ZRECIPE_CACHE, "
                        "or cache/ next to the recipe).")  # fmt: skip
UntilOpt = typer.Option(
    None, "--until", help="Stop after this step (and what it needs), e.g. --until resize."
)
ForceOpt = typer.Option([], "--force", help="Rebuild every node of this step kind (repeatable).")


def _load(recipe: Path):
    from zrecipe.recipe import load_recipe

    return load_recipe(recipe)


def _print_skipped(skipped: list[str] | None) -> None:
    for line in skipped or []:
        typer.secho(f"skipped (on_error: skip): {line}", err=True, fg=typer.colors.YELLOW)


def plan_cmd(
    recipe: Path = RecipeArg,
    cache: Path | None = CacheOpt,
    until: str | None = UntilOpt,
    force: list[str] = ForceOpt,
    check: bool = typer.Option(False, "--check", help="Exit 1 when anything is stale."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="List every stale item and its reason."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    offline: bool = OfflineOpt,
) -> None:
    """Show what a build would run and why (counts per step, reasons); runs nothing."""
    from zrecipe.pipeline import plan_recipe

    outcome = plan_recipe(_load(recipe), cache, until, force)
    plan = outcome.plan
    if as_json:
        typer.echo(json.dumps(plan.to_json(verbose=verbose), indent=2, ensure_ascii=False))
    else:
        _print_skipped(outcome.skipped_at_plan)
        typer.echo(plan.summary(verbose=verbose))
    if check and plan.stale_count:
        raise typer.Exit(1)


def build_cmd(
    recipe: Path = RecipeArg,
    cache: Path | None = CacheOpt,
    until: str | None = UntilOpt,
    force: list[str] = ForceOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan only (same as `zrecipe plan`)."),
    jobs: int | None = typer.Option(None, "--jobs", "-j", help="Worker processes for per-item steps."),
    as_json: bool = typer.Option(False, "--json", help="Print the build report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    battery: int | None = typer.Option(
        None,
        "--battery-percentage-stop-limit",
        "-B",
        help="Stop training (with a checkpoint) at this battery %.",
    ),
    ranks: int | None = typer.Option(
        None, "--ranks", "-n", help="Build on N MLX ranks (re-runs under mlx.launch; with --hosts: per host)."
    ),
    hosts: str | None = typer.Option(
        None, "--hosts", help="Comma-separated host IPs, one rank each (ssh, same paths, shared --cache)."
    ),
    hostfile: Path | None = typer.Option(None, "--hostfile", help="An mlx.launch hostfile (JSON)."),
    backend: str | None = typer.Option(
        None,
        "--backend",
        help="mlx.launch backend: ring, mpi, nccl, jaccl (default: the hostfile's, else nccl "
        "with CUDA, else ring).",
    ),
    offline: bool = OfflineOpt,
) -> None:
    """Build a recipe: run only the stale steps (resize, encode, train, sample, export)."""
    from zrecipe.pipeline.launch import rank_status, relaunch
    from zrecipe.training.distributed import launched

    if (ranks or hosts or hostfile) and not launched():
        args = _rank_args(recipe, cache, until, force, dry_run, jobs, as_json, quiet, battery)
        raise typer.Exit(relaunch(args, ranks, hosts, hostfile, backend))
    with rank_status():
        _build(recipe, cache, until, force, dry_run, jobs, as_json, quiet, battery)


def _rank_args(recipe, cache, until, force, dry_run, jobs, as_json, quiet, battery) -> list[str]:
    """The build's own options, for the command every rank runs (paths made absolute)."""
    args = [str(recipe.resolve())]
    args += ["--cache", str(cache.resolve())] if cache else []
    args += ["--until", until] if until else []
    for kind in force:
        args += ["--force", kind]
    args += ["--dry-run"] if dry_run else []
    args += ["--jobs", str(jobs)] if jobs else []
    args += ["--json"] if as_json else []
    args += ["--quiet"] if quiet else []
    args += ["-B", str(battery)] if battery is not None else []
    return args


def _build(recipe, cache, until, force, dry_run, jobs, as_json, quiet, battery) -> None:
    from zrecipe.cli.train import EXIT_STOPPED, stopped_line
    from zrecipe.pipeline import TrainingStopped, build_recipe, plan_recipe
    from zrecipe.training.distributed import launched, world

    loaded = _load(recipe)
    if dry_run:
        if launched() and not world().main:
            return  # one plan printout is enough
        outcome = plan_recipe(loaded, cache, until, force)
        typer.echo(outcome.plan.summary())
        return
    # Under mlx.launch stderr is a pipe: rank 0 still prints progress lines (line by line, not redrawn).
    progress = not quiet and (sys.stderr.isatty() or launched())
    try:
        outcome = build_recipe(loaded, cache, until, force, jobs, progress=progress, battery_limit=battery)
    except TrainingStopped as stop:
        if not launched() or world().main:  # one line for the whole job
            typer.echo(stopped_line(stop, f"zrecipe build {recipe}"), err=True)
        raise typer.Exit(EXIT_STOPPED) from None
    except Exception as exc:
        if launched() and not world().main and getattr(exc, "all_ranks", False):
            raise typer.Exit(getattr(exc, "exit_code", 1)) from None  # rank 0 prints the same error
        raise
    if launched() and not world().main:
        return  # rank 0 reports for the whole job
    if as_json:
        typer.echo(outcome.report.to_json())
        return
    _print_skipped(outcome.skipped_at_plan)
    typer.echo(outcome.report.summary())
    pub = outcome.published or {}
    out = Path(loaded.save.output_path)
    typer.echo(f"outputs in {out}")
    if pub.get("final"):
        typer.echo(f"  final:       {', '.join(Path(p).name for p in pub['final'])}")
    if pub.get("tensorboard"):
        typer.echo(f"  tensorboard: {out / 'tensorboard'} (tensorboard --logdir {out / 'tensorboard'})")
    if pub.get("checkpoints"):
        typer.echo(f"  checkpoints: {out / 'checkpoints'} ({len(pub['checkpoints'])})")
    if pub.get("samples"):
        typer.echo(f"  samples:     {out / 'samples'} ({len(pub['samples'])} files)")
    export_dir = Path(loaded.export.output_path)
    for top in sorted(
        {export_dir / Path(p).relative_to(export_dir).parts[0] for p in pub.get("exports", [])}
    ):
        typer.echo(f"  export:      {top}")
    if pub.get("captions"):
        typer.echo(f"  captions:    {pub['captions'][0]}")
    typer.echo(f"  report:      {out / 'build-report.json'}")


def explain_cmd(
    recipe: Path = RecipeArg,
    step: str | None = typer.Argument(None, help="Only this step kind (e.g. train)."),
    cache: Path | None = CacheOpt,
) -> None:
    """Why each step is stale or up to date, with the recipe values that changed."""
    from zrecipe.pipeline import KINDS, plan_recipe
    from zrecipe.pipeline.captions import CAPTION_PRODUCERS

    known = (*KINDS, *(p.kind.name for p in CAPTION_PRODUCERS.values()))
    if step is not None and step not in known:
        from zrecipe.errors import UserError

        raise UserError(f"unknown step {step!r}; choose one of {', '.join(known)}.")
    outcome = plan_recipe(_load(recipe), cache)
    plan = outcome.plan
    for kind in plan.order:
        if step is not None and kind != step:
            continue
        nodes = plan.nodes[kind]
        stale = [p for p in nodes if p.stale]
        if not stale:
            typer.echo(f"{kind}: up to date ({len(nodes)} item{'s' if len(nodes) != 1 else ''})")
            continue
        typer.echo(f"{kind}: {len(stale)} of {len(nodes)} stale")
        reasons: dict[str, list[str]] = {}
        for p in stale:
            reasons.setdefault(p.reason or "stale", []).append(p.node.item)
        for reason, items in reasons.items():
            shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
            typer.echo(f"  {reason}: {shown}")


def register(app: typer.Typer) -> None:
    app.command("build")(build_cmd)
    app.command("plan")(plan_cmd)
    app.command("explain")(explain_cmd)
