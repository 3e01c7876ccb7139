"""Downloads with the real `huggingface_hub` client against a hub-compatible server on loopback.

The server (tests/hub_server.py) serves the tiny model as repo `org/tiny` at a fixed commit, plus files
the pipeline must not fetch (a README, sample image, `.bin` and `fp16` variant copies). Nothing here
patches the download path: the client talks HTTP to the server through `HF_ENDPOINT`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_server import COMMIT, FakeHub

from zrecipe.cli.main import app, run_app
from zrecipe.errors import ModelError
from zrecipe.models.z_image.hub import pipeline_files, remove_stale_partials, repo_folder
from zrecipe.models.z_image.resolve import no_downloads, resolve_model
from zrecipe.models.z_image.tiny import create_tiny_model

MiB = 1 << 20
BIG = "vae/diffusion_pytorch_model.safetensors"  # replaced by 24 MiB in `org/big`
EXTRA = {
    "README.md": b"# tiny\n",
    "assets/sample.png": b"\x89PNG not really",
    "transformer/diffusion_pytorch_model.fp16.safetensors": b"variant" * 100,
    "vae/diffusion_pytorch_model.bin": b"pickle" * 100,
}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, bytes]:
    folder = create_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")
    return FakeHub.folder_files(folder)


@pytest.fixture
def server(tiny_files, tmp_path, monkeypatch):
    """The hub with `org/tiny`, `org/big` (a 24 MiB VAE file) and a gated `org/gated`; a fresh cache."""
    with FakeHub() as hub:
        hub.add_repo("org/tiny", {**tiny_files, **EXTRA})
        big = os.urandom(24 * MiB)
        hub.add_repo("org/big", {**tiny_files, BIG: big})
        hub.add_repo("org/gated", tiny_files, gated=True, tokens=("hf_good",))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        # setenv, not delenv: monkeypatch then removes the variable again after `--offline` set it.
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield hub


def downloaded(hub: FakeHub) -> set[str]:
    return {name for method, name, _, status in hub.requests if method == "GET" and status in (200, 206)}


def test_download_fetches_exactly_the_pipeline_files(server, tmp_path, tiny_files):
    folder = resolve_model("org/tiny")
    assert folder == tmp_path / "hub" / "models--org--tiny" / "snapshots" / COMMIT
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == pipeline_files(tiny_files) == sorted(tiny_files)
    files = {n for n in downloaded(server) if not n.startswith("/api/")}
    assert files == set(tiny_files)  # not the README, the image, the .bin or the fp16 variant
    assert (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").read_text() == COMMIT
    for name, data in tiny_files.items():
        assert (folder / name).read_bytes() == data


def test_a_downloaded_snapshot_has_the_identity_of_the_same_files_placed_by_hand(
    server, tmp_path, tiny_files
):
    from zrecipe.engine import StatCache
    from zrecipe.pipeline.identity import ModelIdentity

    by_hand = tmp_path / "by-hand"
    for name, data in tiny_files.items():
        (by_hand / name).parent.mkdir(parents=True, exist_ok=True)
        (by_hand / name).write_bytes(data)
    with StatCache(tmp_path / "stat.sqlite") as sc:
        hub = ModelIdentity("org/tiny", tmp_path / "store", sc)
        hand = ModelIdentity(str(by_hand), tmp_path / "store", sc)
        ids = [(i.transformer, i.vae, i.text_encoder) for i in (hub, hand)]
    assert ids[0] == ids[1]
    assert len(set(ids[0])) == 3  # three different components


def test_a_complete_snapshot_resolves_without_the_network(server, monkeypatch):
    first = resolve_model("org/tiny")
    before = len(server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("org/tiny") == first
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve_model("org/tiny") == first  # complete in the cache: no request at all
    assert len(server.requests) == before


def test_a_dropped_connection_resumes_with_a_range(server, capsys):
    """The server drops the 24 MiB file after 15 MiB: the client asks for the rest from the last 10 MiB
    chunk it wrote. Measured: 24 MiB + 5 MiB served, so 5 MiB were transferred twice."""
    server.cut_after[BIG] = 15 * MiB
    folder = resolve_model("org/big")
    assert (folder / BIG).read_bytes() == server.repos["org/big"].files[BIG]
    ranges = [r for m, name, r, status in server.requests if name == BIG and m == "GET"]
    assert ranges == [None, f"bytes={10 * MiB}-"]
    assert server.body_bytes(BIG) == 24 * MiB + 5 * MiB
    print(f"dropped at 15 MiB of 24 MiB: {server.body_bytes(BIG) - 24 * MiB} bytes re-transferred")


def test_a_killed_download_keeps_finished_files_and_redoes_only_the_file_in_flight(server, tmp_path):
    """`zrecipe download` is killed while the 24 MiB file is half sent: every other file is complete and
    is not fetched again; the file in flight starts over (huggingface_hub gives each process its own
    temporary file), and the dead process's partial file is deleted."""
    server.hold[BIG] = 12 * MiB
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen(
        [sys.executable, "-m", "zrecipe.cli.main", "download", "org/big"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    others = {n: len(d) for n, d in server.repos["org/big"].files.items() if n != BIG}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        server.body_bytes(BIG) >= 12 * MiB and all(server.body_bytes(n) == size for n, size in others.items())
    ):
        time.sleep(0.05)
    partials = list((repo_folder("org/big") / "blobs").glob("*.incomplete"))
    child.send_signal(signal.SIGKILL)
    child.wait()
    server.release()
    assert server.body_bytes(BIG) >= 12 * MiB, "the download never reached the held file"
    assert len(partials) == 1
    first = dict(server.served)

    folder = resolve_model("org/big")
    assert (folder / BIG).read_bytes() == server.repos["org/big"].files[BIG]
    again = {
        n: server.served[n] - first.get(n, 0) for n in server.served if server.served[n] != first.get(n, 0)
    }
    assert again == {BIG: 24 * MiB}  # nothing else was transferred twice
    assert not list((repo_folder("org/big") / "blobs").glob("*.incomplete"))
    print(f"killed after {first[BIG]} bytes of the 24 MiB file: {first[BIG]} bytes re-transferred")


def test_partial_files_of_live_downloads_are_kept(server, tmp_path):
    from filelock import FileLock

    blobs = repo_folder("org/tiny") / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "aaaa.1234.incomplete").write_bytes(b"dead")
    (blobs / "bbbb.5678.incomplete").write_bytes(b"live")
    lock = Path(os.environ["HF_HUB_CACHE"]) / ".locks" / "models--org--tiny" / "bbbb.lock"
    lock.parent.mkdir(parents=True)
    with FileLock(str(lock)):  # held, as by a download in progress
        removed = remove_stale_partials(repo_folder("org/tiny"))
    assert [p.name for p in removed] == ["aaaa.1234.incomplete"]
    assert (blobs / "bbbb.5678.incomplete").exists()


def test_hf_home_is_honoured(server, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve_model("org/tiny").is_relative_to(tmp_path / "home" / "hub" / "models--org--tiny")


def test_component_files_download_only_the_rest_of_the_base(server, tmp_path, tiny_files):
    own = tmp_path / "mine.safetensors"
    own.write_bytes(tiny_files["vae/diffusion_pytorch_model.safetensors"])
    folder = resolve_model(f"org/tiny,vae={own}")
    got = {n for n in downloaded(server) if not n.startswith("/api/")}
    assert "vae/diffusion_pytorch_model.safetensors" not in got and "vae/config.json" in got
    assert "transformer/diffusion_pytorch_model-00001-of-00002.safetensors" in got
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").resolve() == own.resolve()


def error_of(argv: list[str], capsys) -> tuple[int, str]:
    code = run_app(app, argv)
    return code, capsys.readouterr().err


def test_download_command_prints_the_folder(server, capsys):
    assert run_app(app, ["download", "org/tiny"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith(f"models--org--tiny/snapshots/{COMMIT}")


def test_no_network_is_exit_2_naming_the_repo_and_the_fix(server, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    code, err = error_of(["download", "org/tiny"], capsys)
    assert code == 2
    assert "model org/tiny: cannot reach http://127.0.0.1:9" in err and "Check the network" in err
    assert "Traceback" not in err


def test_gated_repo_without_a_token(server, capsys):
    code, err = error_of(["download", "org/gated"], capsys)
    assert code == 2
    assert "org/gated: the repo is gated and needs a token (no HF_TOKEN is set)" in err
    assert "https://huggingface.co/org/gated" in err and "set HF_TOKEN" in err


def test_gated_repo_with_a_token_without_access(server, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    code, err = error_of(["download", "org/gated"], capsys)
    assert code == 2
    assert "org/gated: the repo is gated and your token has no access to it (HF_TOKEN is set)" in err
    assert [s for *_, s in server.requests] == [403]


def test_gated_repo_with_a_granted_token_downloads(server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    assert (resolve_model("org/gated") / "model_index.json").is_file()


def test_missing_repo(server, capsys):
    code, err = error_of(["download", "org/nope"], capsys)
    assert code == 2
    assert "model org/nope: no such repo on http://127.0.0.1" in err


def test_offline_with_nothing_cached_makes_no_request(server, monkeypatch, capsys):
    code, err = error_of(["download", "--offline", "org/tiny"], capsys)
    assert code == 2
    assert "org/tiny: it is not in the local Hugging Face cache" in err and "--offline" in err
    assert server.requests == []


def test_a_full_disk_is_refused_before_anything_is_written(server, tmp_path, monkeypatch, capsys):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setenv("HF_HUB_CACHE", str(small))
        code, err = error_of(["download", "org/big"], capsys)
        assert code == 2
        assert "not enough disk space" in err and "HF_HUB_CACHE" in err and "org/big" in err
        assert not [p for p in small.rglob("*") if p.is_file() and "blobs" in p.parts]
    finally:
        subprocess.run(["umount", str(small)])


def test_planning_reports_the_download_and_fetches_nothing(server):
    with no_downloads(), pytest.raises(ModelError) as info:
        resolve_model("org/tiny")
    message = str(info.value)
    assert f"downloads it ({len(pipeline_files(server.repos['org/tiny'].files))} files," in message
    assert "zrecipe download org/tiny" in message
    assert not [r for r in server.requests if "/resolve/" in r[1] or not r[1].startswith("/api/")]


PLAN_RECIPE = """\
model: {model}
datasets: []
training_loop: {{max_steps: 1}}
sample: {{prompts: [a red circle]}}
"""


def test_plan_says_what_the_build_downloads_then_the_build_downloads(server, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(PLAN_RECIPE.format(model="org/tiny"))
    code, err = error_of(["plan", str(recipe), "--until", "encode-text"], capsys)
    assert code == 2
    assert (
        "org/tiny is not in the local Hugging Face cache" in err and "`zrecipe build` downloads it (" in err
    )
    assert not [r for r in server.requests if not r[1].startswith("/api/")]  # metadata only, no file
    code, err = error_of(["plan", "--offline", str(recipe), "--until", "encode-text"], capsys)
    assert code == 2 and "downloads are off" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    before = len(server.requests)
    code, err = error_of(["build", str(recipe), "--until", "encode-text", "-q"], capsys)
    assert code == 0, err
    assert {n for n in downloaded(server) if not n.startswith("/api/")} == set(
        server.repos["org/tiny"].files
    ) - set(EXTRA)
    assert len(server.requests) > before
    assert run_app(app, ["plan", str(recipe), "--until", "encode-text", "--check"]) == 0  # now up to date
