"""Materialise a build's results in the recipe's output folder (`save.output_path`), by content.

The store is the source of truth; the output folder is a view of the latest build's keys, refreshed after
every build. A file already there is kept only if its content hash (through the stat cache: a stat per
file on a no-op build) equals the store's; anything else — another run's adapter of the same size, a
damaged copy — is replaced, copied from the store with its bytes checked against the manifest as they are
read. Files an earlier build of the same recipe published that the current keys no longer have (a
checkpoint step that no longer exists) are removed, so the folder never mixes two runs. The build
report's `outputs` says, per file, which step and key it came from. Layout:

    <output_path>/adapter.safetensors | transformer.safetensors, loss.json, loss.png
    <output_path>/adapter_ema.safetensors | transformer_ema.safetensors (training_loop.ema)
    <output_path>/tensorboard/events.out.tfevents.* (training_loop.tensorboard)
    <output_path>/checkpoints/<step:07d>_checkpoint.zip
    <output_path>/samples/<prompt>-<seed>_<n>.png, samples/contact_sheet.png
    <export.output_path>/<name>.safetensors (or a model folder for full fine-tunes)
    <output_path>/build-report.json, .zrecipe-outputs.json (what was published, for the next build)
    <output_path>/captions.jsonl (datasets with generated captions: every image's caption and its origin)
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from zrecipe.engine.files import copy_verified, probe_writable
from zrecipe.engine.statcache import STAT_CACHE_NAME, StatCache
from zrecipe.engine.store import MANIFEST, write_atomic
from zrecipe.errors import InputDamaged, ZRecipeWarning, os_problem

STATE_FILE = ".zrecipe-outputs.json"
# The train entry's files published as they are (zrecipe.pipeline.train_work.FINAL_FILES, plus loss.json).
FINAL_FILES = (
    "adapter.safetensors",
    "transformer.safetensors",
    "adapter_ema.safetensors",
    "transformer_ema.safetensors",
    "loss.json",
    "loss.png",
)


@dataclass(frozen=True)
class Output:
    """One file to publish: where it goes, which node and key it comes from, and its content hash.
    `rel` names it in the store entry (None: `source` is a file in the step's work folder)."""

    dest: Path
    kind: str
    item: str
    key: str
    rel: str | None
    source: Path
    digest: str


def prepare_output(recipe) -> Path:
    """Create `save.output_path` and the export folder and check that they are writable, before any step
    runs (not after hours of training); returns the output folder."""
    out = Path(recipe.save.output_path)
    folders = [("save.output_path", out)]
    if recipe.export.formats:
        folders.append(("export.output_path", Path(recipe.export.output_path)))
    for key, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe_writable(folder)
        except OSError as exc:
            raise os_problem(exc, f"{recipe.source}: {key}", f"choose another `{key}` in the recipe") from exc
    return out


def publish(plan, store, recipe, report=None) -> dict[str, list[str]]:
    """Make the output folders hold exactly the files of `plan`'s current keys; returns what is where
    ({"final", "checkpoints", "samples", "exports"}: paths). With `report` (the BuildReport), its `outputs`
    say where each file came from and it is written to `<output_path>/build-report.json`.

    A store entry whose bytes fail their manifest check while being copied is discarded: after the other
    files are published, InputDamaged is raised (its `keys` list them) so the caller rebuilds them.
    """
    out = Path(recipe.save.output_path)
    try:
        return _publish(plan, store, recipe, report, out)
    except OSError as exc:
        raise os_problem(exc, "publishing the outputs to", "free some space or fix the output folder, then run "
                         "the build again (the store keeps every result)") from exc  # fmt: skip


def _publish(plan, store, recipe, report, out: Path) -> dict[str, list[str]]:
    published: dict[str, list[str]] = {
        "checkpoints": [],
        "final": [],
        "samples": [],
        "exports": [],
        "tensorboard": [],
    }
    damaged: list[str] = []
    outputs: dict[str, dict[str, str]] = {}
    with StatCache(store.root / STAT_CACHE_NAME) as sc:
        wanted = _outputs(plan, store, recipe, out, sc, damaged)
        present = sc.lookup([o.dest for o in wanted])
        for o in wanted:
            action = "unchanged"
            if present.get(os.fspath(o.dest)) != o.digest:
                action = "replaced" if o.dest.exists() else "copied"
                if not _copy(o, store, damaged):
                    continue
                sc.remember(o.dest, o.digest)
            published[_category(o)].append(str(o.dest))
            outputs[str(o.dest)] = {
                "kind": o.kind,
                "item": o.item,
                "key": o.key,
                "hash": o.digest,
                "action": action,
            }
        _remove_stale(out, plan, recipe, outputs, sc)
    from zrecipe.pipeline.caption_view import publish_captions

    published.update(publish_captions(plan, store, recipe))  # captions.jsonl, with generated captions
    if report is not None:
        report.outputs = outputs
        report.write(out / "build-report.json")
    if damaged:
        err = InputDamaged(
            f"{len(set(damaged))} store entr{'y' if len(set(damaged)) == 1 else 'ies'} failed the hash check "
            "while being published and were discarded: " + ", ".join(sorted(set(damaged))),
            damaged[0],
        )
        err.keys = sorted(set(damaged))  # type: ignore[attr-defined]
        raise err
    return published


def _category(o: Output) -> str:
    if o.kind == "train":
        return (
            "final" if o.rel is not None else ("checkpoints" if o.source.suffix == ".zip" else "tensorboard")
        )
    return {"export": "exports"}.get(o.kind, "samples")


def _outputs(plan, store, recipe, out: Path, sc, damaged: list[str]) -> list[Output]:
    """Every file the current keys put in the output folders, with its store hash."""
    wanted: list[Output] = []

    def entry_files(p, pairs) -> None:
        files = store.manifest(p.key)
        if files is None:  # the entry vanished or its manifest is unreadable: discard, rebuild
            store.discard(p.key)
            damaged.append(p.key)
            return
        for rel, dest in pairs:
            if rel in files:
                wanted.append(
                    Output(dest, p.node.kind, p.node.item, p.key, rel, store.path(p.key) / rel, files[rel][1])
                )

    for (kind, item), p in sorted(plan.by_id().items()):
        if not store.has(p.key):
            continue  # not built (failed or skipped): nothing of it is published
        try:
            if kind == "train":
                entry_files(p, [(name, out / name) for name in FINAL_FILES])
                # From the work folder: the checkpoint zips, and TensorBoard's event files (their wall-clock
                # times keep them out of the keyed entry).
                work = store.root / "work" / p.key
                files = [
                    (z, out / "checkpoints" / z.name)
                    for z in sorted((work / "checkpoints").glob("*_checkpoint.zip"))
                ]
                files += [
                    (f, out / f.relative_to(work))
                    for f in sorted((work / "tensorboard").glob("*"))
                    if f.is_file()
                ]
                hashes = sc.lookup([source for source, _ in files])
                for source, dest in files:
                    if os.fspath(source) in hashes:
                        wanted.append(
                            Output(dest, kind, item, p.key, None, source, hashes[os.fspath(source)])
                        )
            elif kind == "sample":
                labels = json.loads(store.read_file(p.key, "labels.json"))
                names = [(f"{i:02d}.png", out / "samples" / f"{item}_{label.replace(' ', '')}.png")
                         for i, label in enumerate(labels)]  # fmt: skip
                entry_files(p, names)
            elif kind == "contact-sheet":
                entry_files(p, [("contact_sheet.png", out / "samples" / "contact_sheet.png")])
            elif kind == "export":
                files = store.manifest(p.key) or {}
                root = Path(recipe.export.output_path)
                entry_files(p, [(rel, root / rel) for rel in sorted(files) if rel != MANIFEST])
        except InputDamaged as exc:
            damaged.append(exc.key)
    return wanted


def _copy(o: Output, store, damaged: list[str]) -> bool:
    """Copy one output into place (verified); False when its source turned out damaged."""
    o.dest.parent.mkdir(parents=True, exist_ok=True)
    if o.rel is not None:
        try:
            store.copy_out(o.key, o.rel, o.dest)
        except InputDamaged:
            damaged.append(o.key)
            return False
        return True
    # A file from the train step's work folder, copied with the bytes that were hashed; a checkpoint zip must
    # also be a sound zip (member CRCs).
    sound = True
    if o.source.suffix == ".zip":
        try:
            with zipfile.ZipFile(o.source) as zf:
                sound = zf.testzip() is None
        except (zipfile.BadZipFile, OSError, EOFError):
            sound = False
    if not sound or not copy_verified(o.source, o.dest, o.digest):
        warnings.warn(
            f"{o.source}: damaged or changed while publishing, not published", ZRecipeWarning, stacklevel=3
        )
        return False
    return True


def _remove_stale(out: Path, plan, recipe, outputs: dict[str, dict[str, str]], sc) -> None:
    """Delete files this recipe published before that the current keys do not have (of the kinds this
    build planned; a file changed since it was published is left alone), then record what is published."""
    state_path = out / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        graphs = state["graphs"] if isinstance(state.get("graphs"), dict) else {}
    except (OSError, ValueError, AttributeError, KeyError):
        graphs = {}
    graph_id = plan.graph.graph_id
    before = graphs.get(graph_id, {}) if isinstance(graphs.get(graph_id), dict) else {}
    planned = set(plan.order)
    gone = [
        p
        for p, info in before.items()
        if p not in outputs and isinstance(info, dict) and info.get("kind") in planned
    ]
    current = sc.lookup(gone)
    for path in gone:
        if current.get(path) == before[path].get("hash"):
            Path(path).unlink(missing_ok=True)
    kept = {p: info for p, info in before.items() if p not in outputs and p not in gone}
    graphs[graph_id] = {
        **kept,
        **{p: {k: v for k, v in info.items() if k != "action"} for p, info in outputs.items()},
    }
    write_atomic(state_path, json.dumps({"graphs": graphs}, indent=1, sort_keys=True).encode(), fsync=False)
