"""Hostile: store integrity. Same-size damage in the store, in the output folder and in checkpoints is
found by content (never by size or mtime), discarded and rebuilt, and every build ends with the bytes a
clean build makes; a reverted recipe publishes exactly its own run's files."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from helpers_build import Env
from helpers_hostile import (
    assert_store_consistent,
    clean_adapter,
    entry_of,
    flip_bytes,
    make_project,
    run_cli,
    write_recipe,
    zrecipe,
)

from zrecipe.engine import Record, StepKind, Store, StoreLock, build, execute, plan
from zrecipe.errors import StepFailed

OUTPUT_FILES = ("adapter.safetensors", "loss.json", "loss.png", "exports/recipe_mflux.safetensors")


def _outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in OUTPUT_FILES}


def test_reverted_recipe_publishes_its_own_run(tmp_path, tiny_model):
    recipe = make_project(tmp_path, tiny_model, formats=("mflux",))
    out = tmp_path / "out"
    assert zrecipe("build", recipe, "--quiet") == 0
    first = _outputs(out)
    write_recipe(recipe, tiny_model, formats=("mflux",), lr="5.0e-4")
    assert zrecipe("build", recipe, "--quiet") == 0
    second = _outputs(out)
    assert second["adapter.safetensors"] != first["adapter.safetensors"]
    write_recipe(recipe, tiny_model, formats=("mflux",))  # back to the first learning rate
    assert zrecipe("build", recipe, "--quiet") == 0
    report = json.loads((out / "build-report.json").read_text())
    assert report["kinds"]["train"]["cached"] == 1
    assert _outputs(out) == first  # not a mix of the two runs
    # The report says which run each file came from: every final file is the current train key's.
    train_key = entry_of(recipe.parent / "cache", "train").name
    finals = {Path(p).name: info for p, info in report["outputs"].items() if info["kind"] == "train"}
    assert {"adapter.safetensors", "loss.json", "loss.png"} <= set(finals)
    assert {info["key"] for info in finals.values()} == {train_key}


def test_stale_checkpoints_of_another_run_are_removed(tmp_path, tiny_model):
    recipe = make_project(tmp_path, tiny_model, steps=4, every=1)
    assert zrecipe("build", recipe, "--quiet") == 0
    ckpts = tmp_path / "out" / "checkpoints"
    assert len(list(ckpts.glob("*.zip"))) == 4
    write_recipe(recipe, tiny_model, steps=4, every=2)  # another run: checkpoints at 2 and 4 only
    assert zrecipe("build", recipe, "--quiet") == 0
    assert sorted(p.name for p in ckpts.glob("*.zip")) == ["0000002_checkpoint.zip", "0000004_checkpoint.zip"]
    user_file = tmp_path / "out" / "notes.txt"
    user_file.write_text("mine")  # never published by zrecipe: left alone
    assert zrecipe("build", recipe, "--quiet") == 0
    assert user_file.read_text() == "mine"


def test_same_size_damaged_output_is_restored(tmp_path, tiny_model):
    recipe = make_project(tmp_path, tiny_model, formats=("mflux",))
    assert zrecipe("build", recipe, "--quiet") == 0
    out = tmp_path / "out"
    good = _outputs(out)
    for name in OUTPUT_FILES:
        flip_bytes(out / name)  # same size, same mtime
    assert zrecipe("build", recipe, "--quiet") == 0
    assert _outputs(out) == good
    report = json.loads((out / "build-report.json").read_text())
    assert {
        info["action"] for p, info in report["outputs"].items() if Path(p).name == "adapter.safetensors"
    } == {"replaced"}


def test_same_size_corruption_of_latents_is_rebuilt_not_trained_on(tmp_path, tiny_model):
    recipe = make_project(tmp_path, tiny_model)
    assert zrecipe("build", recipe, "--quiet") == 0
    cache = tmp_path / "cache"
    latents = next(p for p in cache.glob("objects/*/*/latents.safetensors"))
    flip_bytes(latents, offset=latents.stat().st_size - 16)  # tensor data, not the header
    write_recipe(recipe, tiny_model, lr="5.0e-4")
    assert zrecipe("build", recipe, "--quiet") == 0
    expected = clean_adapter(recipe)
    assert (tmp_path / "out" / "adapter.safetensors").read_bytes() == expected
    report = json.loads((tmp_path / "out" / "build-report.json").read_text())
    assert report["repaired"] == [latents.parent.name]
    assert_store_consistent(cache)
    # --force train resumes from this key's checkpoints: they were made from clean latents.
    assert zrecipe("build", recipe, "--quiet", "--force", "train") == 0
    assert (tmp_path / "out" / "adapter.safetensors").read_bytes() == expected


@pytest.mark.parametrize(
    ("name", "rerun"), [("embedding.safetensors", ()), ("image.png", ("--force", "encode-image"))]
)
def test_same_size_corruption_of_other_inputs_is_rebuilt(tmp_path, tiny_model, name, rerun):
    recipe = make_project(tmp_path, tiny_model)
    assert zrecipe("build", recipe, "--quiet") == 0
    cache = tmp_path / "cache"
    for victim in sorted(cache.glob(f"objects/*/*/{name}"))[:2]:
        flip_bytes(victim, offset=victim.stat().st_size - 12)
    write_recipe(recipe, tiny_model, lr="5.0e-4")  # train (and with --force, encode-image) read them
    assert zrecipe("build", recipe, "--quiet", *rerun) == 0
    assert (tmp_path / "out" / "adapter.safetensors").read_bytes() == clean_adapter(recipe)
    assert_store_consistent(cache)


def test_damaged_entry_met_while_publishing_is_rebuilt(tmp_path, tiny_model):
    recipe = make_project(tmp_path, tiny_model)
    assert zrecipe("build", recipe, "--quiet") == 0
    out = tmp_path / "out" / "adapter.safetensors"
    good = out.read_bytes()
    flip_bytes(entry_of(tmp_path / "cache", "train") / "adapter.safetensors")  # the store's copy...
    out.unlink()  # ...is the one publishing must copy
    assert zrecipe("build", recipe, "--quiet") == 0
    assert out.read_bytes() == good  # rebuilt (resumed from the final checkpoint), then published
    assert_store_consistent(tmp_path / "cache")


def test_damaged_checkpoint_is_not_resumed_from(tmp_path, tiny_model):
    recipe = make_project(tmp_path, tiny_model, steps=4, every=2)
    assert zrecipe("build", recipe, "--quiet") == 0
    good = (tmp_path / "out" / "adapter.safetensors").read_bytes()
    work = next((tmp_path / "cache" / "work").iterdir())
    newest = work / "checkpoints" / "0000004_checkpoint.zip"
    with zipfile.ZipFile(newest) as zf:
        member = zf.getinfo("adapter.safetensors")
    flip_bytes(newest, offset=member.header_offset + 200)  # inside the adapter member's data
    assert zrecipe("build", recipe, "--quiet", "--force", "train") == 0  # resumes from step 2
    assert (tmp_path / "out" / "adapter.safetensors").read_bytes() == good
    with zipfile.ZipFile(tmp_path / "out" / "checkpoints" / "0000004_checkpoint.zip") as zf:
        assert zf.testzip() is None


def test_doctor_store_and_gc_verify_find_damage(tmp_path, tiny_model, capsys):
    recipe = make_project(tmp_path, tiny_model)
    assert zrecipe("build", recipe, "--quiet") == 0
    cache = tmp_path / "cache"
    victim = next(cache.glob("objects/*/*/latents.safetensors"))
    flip_bytes(victim)
    rc, out, _ = run_cli(capsys, "doctor", "--store", "--cache", cache)
    assert rc == 1 and victim.parent.name in out and "removed" in out
    assert not victim.parent.exists()
    rc, out, _ = run_cli(capsys, "gc", "--verify", "--cache", cache)
    assert rc == 0 and "every file matches its hash" in out
    zpath = next(cache.glob("work/*/checkpoints/*.zip"))
    with zipfile.ZipFile(zpath) as zf:
        offset = zf.getinfo("optimizer.safetensors").header_offset + 100
    flip_bytes(zpath, offset=offset)
    rc, out, _ = run_cli(capsys, "gc", "--verify", "--dry-run", "--cache", cache)
    assert rc == 1 and zpath.name in out and zpath.exists()
    assert zrecipe("build", recipe, "--quiet") == 0  # the removed entry is rebuilt
    assert_store_consistent(cache)


def test_verify_store_engine_level(tmp_path):
    from zrecipe.engine import verify_store

    e = Env(tmp_path, n=3)
    e.build()
    assert verify_store(e.store).ok
    key = next(iter(e.store.iter_entries()))
    flip_bytes(
        e.store.path(key) / next(p.name for p in e.store.path(key).iterdir() if p.name != "MANIFEST.json")
    )
    report = verify_store(e.store, repair=False)
    assert report.damaged == [key] and e.store.path(key).exists()
    assert verify_store(e.store).damaged == [key] and not e.store.path(key).exists()


def test_engine_same_size_damage_fails_the_reader_and_commits_nothing(tmp_path):
    e = Env(tmp_path, n=3)
    e.build()
    g = e.graph()
    key = plan(g, e.store, None).by_id()[("transform", "f1.txt")].key
    flip_bytes(e.store.path(key) / "out.txt", offset=1)  # same size: the size check cannot see it
    g.kinds["aggregate"] = StepKind("aggregate", 2, g.kinds["aggregate"].run)  # only the aggregate is stale
    p = plan(g, e.store, Record.load(e.store.root, g.graph_id), check_inputs=True)
    agg = p.by_id()[("aggregate", "all")]
    with pytest.raises(StepFailed, match="input damaged") as info:
        execute(p, e.store, e.ctx, progress=False)
    assert info.value.only_damaged and info.value.damaged == [key]
    assert not e.store.has(agg.key) and not e.store.path(key).exists()
    # build() re-plans and rebuilds the damaged entry, then the aggregate, with the right bytes.
    _, r = build(g, e.store, e.ctx, progress=False)
    assert r.repaired == [] and r.kinds["transform"].ran == 1
    assert (e.store.path(agg.key) / "all.txt").read_text() == "ITEM 0!|ITEM 1!|ITEM 2!"


def test_engine_build_repairs_in_one_call(tmp_path):
    e = Env(tmp_path, n=3)
    e.build()
    g = e.graph()
    key = plan(g, e.store, None).by_id()[("transform", "f2.txt")].key
    flip_bytes(e.store.path(key) / "out.txt", offset=0)
    g.kinds["aggregate"] = StepKind("aggregate", 2, g.kinds["aggregate"].run)
    with StoreLock(e.store.root):
        _, r = build(g, e.store, e.ctx, progress=False)
    assert r.repaired == [key]
    agg = plan(g, Store(e.store.root), None).by_id()[("aggregate", "all")]
    assert (e.store.path(agg.key) / "all.txt").read_text() == "ITEM 0!|ITEM 1!|ITEM 2!"
