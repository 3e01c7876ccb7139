"""Hugging Face Hub repos: the local cache, and downloads of exactly the files the pipeline needs.

A repo resolves from the local Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`) when its snapshot
there is complete, and is otherwise downloaded with `huggingface_hub`: `model_index.json`, the configs of
every component folder, the tokenizer folder, and the non-variant safetensors weights of the transformer,
VAE and text encoder (no `.bin`/`.pt`, no `fp16`/`bf16` variant copies, no READMEs or sample images).
`huggingface_hub` gives the progress bars (stderr), honours `HF_TOKEN` and writes every file to a temporary
name that is renamed only once complete, so a half-downloaded file is never used; a snapshot missing a
file (an interrupted download) is not taken as complete. `HF_HUB_OFFLINE=1` (or `--offline`, which sets
it) forbids any network access; then only a complete cached snapshot resolves.

Resuming: a dropped connection is resumed in place with a byte Range by `huggingface_hub` (it writes in
10 MiB chunks, so at most the last unwritten chunk is fetched again); after a killed process the files
already complete are kept and the file that was in flight starts over (`huggingface_hub` gives each
process its own temporary file). Those leftovers of dead processes are deleted before a new download.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from zrecipe.errors import ModelError

WEIGHT_FOLDERS = ("transformer", "vae", "text_encoder")
PIPELINE_FOLDERS = (*WEIGHT_FOLDERS, "tokenizer", "scheduler")
HUB_URL = "https://huggingface.co"
_TRUE = {"1", "on", "yes", "true"}
# `name.safetensors` or `name-00001-of-00003.safetensors`; a dot inside the stem marks a variant copy
# (`diffusion_pytorch_model.fp16.safetensors`), which the pipeline does not load.
_WEIGHTS = re.compile(r"^[^.]+\.safetensors$")
_INDEX = re.compile(r"^[^.]+\.safetensors\.index\.json$")
_CONFIG = re.compile(r"^[^.]+\.json$")


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, honouring the same environment variables as huggingface_hub."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """True when network access to the Hub is switched off (`HF_HUB_OFFLINE`, set by `--offline`)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def set_offline(enabled: bool = True) -> None:
    """Switch Hub access off for this process and the processes it starts (what `--offline` does)."""
    if enabled:
        os.environ["HF_HUB_OFFLINE"] = "1"


def endpoint() -> str:
    """The Hub to download from (`HF_ENDPOINT`, read at call time)."""
    return (os.environ.get("HF_ENDPOINT") or HUB_URL).rstrip("/")


def repo_folder(repo_id: str) -> Path:
    """Where the Hugging Face cache keeps `repo_id` (blobs, refs, snapshots)."""
    return hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))


def pipeline_files(files: Iterable[str], weights: Iterable[str] = WEIGHT_FOLDERS) -> list[str]:
    """The files of a repo listing that the pipeline needs, sorted.

    `model_index.json`; every config json of the pipeline's component folders; the whole tokenizer
    folder; and for the components in `weights` the non-variant safetensors (with their index json).
    """
    weights = set(weights)
    keep = []
    for path in files:
        folder, _, name = path.partition("/")
        if path == "model_index.json":
            keep.append(path)
        elif folder not in PIPELINE_FOLDERS or "/" in name or name.startswith("."):
            continue
        elif folder == "tokenizer" or _CONFIG.match(name):
            keep.append(path)
        elif folder in weights and (_WEIGHTS.match(name) or _INDEX.match(name)):
            keep.append(path)
    return sorted(keep)


@dataclass(frozen=True)
class RepoLayout:
    """What a model repo must hold, for a kind of model: `select(listing)` → the files to fetch, sorted;
    `problems(snapshot folder)` → what keeps it from being complete; `unusable(selected files)` → why the
    repo is not this kind of model (None when it is). The default is the Z-Image pipeline's
    (`pipeline_layout`); the captioning models bring their own (`zrecipe.models.vlm.resolve`)."""

    select: Callable[[Iterable[str]], list[str]]
    problems: Callable[[Path], list[str]]
    unusable: Callable[[list[str]], str | None]


def pipeline_layout(weights: Iterable[str] = WEIGHT_FOLDERS) -> RepoLayout:
    """The Z-Image diffusers pipeline, with the weight files of the components in `weights`."""
    weights = tuple(weights)

    def unusable(wanted: list[str]) -> str | None:
        missing = [
            c
            for c in weights
            if not any(f.startswith(c + "/") and f.endswith(".safetensors") for f in wanted)
        ]
        if "model_index.json" in wanted and not missing:
            return None
        return (
            f"the repo is not a Z-Image diffusers model (no model_index.json, or no safetensors weights for "
            f"{', '.join(missing) or 'its components'}). Use a diffusers-layout repo such as "
            "Tongyi-MAI/Z-Image, or name the component files in the recipe."
        )

    return RepoLayout(
        select=lambda files: pipeline_files(files, weights),
        problems=lambda folder: snapshot_problems(folder, weights),
        unusable=unusable,
    )


def snapshot_problems(folder: Path, weights: Iterable[str] = WEIGHT_FOLDERS) -> list[str]:
    """What keeps `folder` (a snapshot) from being a complete model: missing configs, weights, shards."""
    problems = []
    if not (folder / "model_index.json").is_file():
        problems.append("model_index.json")
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        problems.append("scheduler/scheduler_config.json")
    if not any((folder / "tokenizer" / n).is_file() for n in ("tokenizer.json", "vocab.json")):
        problems.append("tokenizer/tokenizer.json")
    for name in WEIGHT_FOLDERS:
        if not (folder / name / "config.json").is_file():
            problems.append(f"{name}/config.json")
    for name in weights:
        problems += [f"{name}/{f}" for f in _missing_weights(folder / name)]
    return problems


def missing_weights(component: Path) -> list[str]:
    """The weight files a folder's safetensors index names that are not there (or `*.safetensors` when
    it has neither an index nor a weight file)."""
    return _missing_weights(component)


def _missing_weights(component: Path) -> list[str]:
    indexes = sorted(p for p in component.glob("*.safetensors.index.json") if _INDEX.match(p.name))
    if not indexes:
        found = [p for p in component.glob("*.safetensors") if _WEIGHTS.match(p.name)]
        return [] if found else ["*.safetensors"]
    try:
        shards = set(json.loads(indexes[0].read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, AttributeError):
        return [f"{indexes[0].name} (unreadable)"]
    return sorted(s for s in shards if not (component / s).is_file())


def cached_snapshot(
    repo_id: str, weights: Iterable[str] = WEIGHT_FOLDERS, layout: RepoLayout | None = None
) -> tuple[Path | None, list[str]]:
    """(the complete cached snapshot of `repo_id` or None, what the best candidate misses).

    The snapshot `refs/main` names comes first, then the others newest first. `layout`: what a complete
    snapshot holds (default: the Z-Image pipeline with the weights of `weights`)."""
    repo = repo_folder(repo_id)
    snapshots = repo / "snapshots"
    candidates = sorted(
        (p for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else (),
        key=lambda p: (p.stat().st_mtime_ns, p.name),
        reverse=True,
    )
    ref = repo / "refs" / "main"
    if ref.is_file():
        main = snapshots / ref.read_text().strip()
        candidates = [main] + [p for p in candidates if p != main] if main.is_dir() else candidates
    layout = layout or pipeline_layout(weights)
    first_problems: list[str] = []
    for snapshot in candidates:
        problems = layout.problems(snapshot)
        if not problems:
            return snapshot, []
        first_problems = first_problems or problems
    return None, first_problems


def download(
    repo_id: str,
    weights: Iterable[str] = WEIGHT_FOLDERS,
    log: Callable[[str], None] | None = None,
    layout: RepoLayout | None = None,
) -> Path:
    """Download what the pipeline needs of `repo_id` into the Hugging Face cache; the snapshot folder.

    Only `weights` components get their weight files (a recipe that brings its own transformer file
    downloads the base's configs and the other components); `layout` replaces the Z-Image pipeline's file
    selection for another kind of model. Raises ModelError (exit 2) naming the repo and the fix for no
    network, a gated or missing repo, a full disk, or an incomplete result.
    """
    from huggingface_hub import snapshot_download

    log = log or _stderr
    layout = layout or pipeline_layout(weights)
    if offline():
        raise ModelError(offline_message(repo_id, []))
    try:
        commit, sizes = _listing(repo_id)
    except Exception as exc:
        raise _hub_error(repo_id, exc) from exc
    wanted = layout.select(sizes)
    why = layout.unusable(wanted)
    if why:
        raise ModelError(f"model {repo_id}: {why}")
    repo = repo_folder(repo_id)
    snapshot = repo / "snapshots" / commit
    todo = [f for f in wanted if not (snapshot / f).is_file()]
    need = sum(sizes[f] for f in todo)
    remove_stale_partials(repo)
    _check_space(repo_id, need)
    if todo:
        log(f"downloading {repo_id}: {len(todo)} of {len(wanted)} files, {_gb(need)} into {hf_hub_cache()}")
    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=[_literal(f) for f in wanted],
            cache_dir=str(hf_hub_cache()),
            endpoint=endpoint(),
        )
    except Exception as exc:
        raise _hub_error(repo_id, exc, need) from exc
    folder = Path(path)
    problems = [f for f in wanted if not (folder / f).is_file()] or layout.problems(folder)
    if problems:
        raise ModelError(
            f"model {repo_id}: the download finished without {', '.join(problems[:5])}. Run "
            f"`zrecipe download {repo_id}` again to complete it."
        )
    return folder


def download_size(
    repo_id: str, weights: Iterable[str] = WEIGHT_FOLDERS, layout: RepoLayout | None = None
) -> tuple[int, int] | None:
    """(files, bytes) a download of `repo_id` would fetch, from the Hub's listing; None when offline or
    the Hub cannot be asked. Used by planning, which never downloads."""
    if offline():
        return None
    try:
        _, sizes = _listing(repo_id)
    except Exception as exc:
        if _is_network_error(exc):
            return None
        raise _hub_error(repo_id, exc) from exc
    wanted = (layout or pipeline_layout(weights)).select(sizes)
    snapshot, _ = cached_snapshot(repo_id, (), layout)
    todo = [f for f in wanted if snapshot is None or not (snapshot / f).is_file()]
    return len(todo), sum(sizes[f] for f in todo)


def _listing(repo_id: str) -> tuple[str, dict[str, int]]:
    """(commit of main, {file: size}) from one repo-info call (no retries: an unreachable Hub fails fast)."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint()).model_info(repo_id, files_metadata=True)
    return str(info.sha), {s.rfilename: s.size or 0 for s in info.siblings or ()}


def not_downloaded(repo_id: str, spec: str, weights: Iterable[str] = WEIGHT_FOLDERS) -> ModelError:
    """The error planning raises for a model that is not in the local cache yet."""
    size = download_size(repo_id, weights)
    what = f" ({size[0]} files, {_gb(size[1])})" if size else ""
    return ModelError(
        f"model {spec}: {repo_id} is not in the local Hugging Face cache ({repo_folder(repo_id)}) yet. "
        f"`zrecipe build` downloads it{what}, or fetch it first with `zrecipe download {spec}`. "
        "Planning never downloads: the model's identity (the hash of its files) is part of the step keys."
    )


def remove_stale_partials(repo: Path) -> list[Path]:
    """Delete the temporary files of downloads whose process died (nobody holds their blob's lock)."""
    from filelock import FileLock, Timeout

    removed = []
    for partial in sorted((repo / "blobs").glob("*.incomplete")):
        etag = partial.name.split(".", 1)[0]
        lock = hf_hub_cache() / ".locks" / repo.name / f"{etag}.lock"
        try:
            with FileLock(str(lock), timeout=0):
                partial.unlink(missing_ok=True)
                removed.append(partial)
        except (Timeout, OSError):
            continue  # a live download holds it (or the lock folder is not writable): leave it
    return removed


def _check_space(repo_id: str, need: int) -> None:
    folder = hf_hub_cache()
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ModelError(_disk_message(repo_id, need, free))


def _disk_message(repo_id: str, need: int, free: int | None) -> str:
    room = f"; {_gb(free)} free" if free is not None else ""
    return (
        f"model {repo_id}: not enough disk space in {hf_hub_cache()} to download it ({_gb(need)} needed{room}). "
        "Free some space, or point HF_HUB_CACHE (or HF_HOME) at a disk with room."
    )


def offline_message(repo_id: str, problems: list[str]) -> str:
    """Why an offline run cannot resolve `repo_id`, and what to do."""
    state = (
        f"the cached snapshot is incomplete (missing {', '.join(problems[:5])})"
        if problems
        else "it is not in the local Hugging Face cache"
    )
    return (
        f"model {repo_id}: {state} ({repo_folder(repo_id)}), and downloads are off (HF_HUB_OFFLINE / "
        f"--offline). Run `zrecipe download {repo_id}` with network access, or pass a local model folder."
    )


def _hub_error(repo_id: str, exc: BaseException, need: int | None = None) -> ModelError:
    """A one-paragraph ModelError for whatever went wrong talking to the Hub."""
    from huggingface_hub import errors

    page = f"{HUB_URL}/{repo_id}"
    token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "no HF_TOKEN is set"
    if isinstance(exc, errors.GatedRepoError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 403 or os.environ.get("HF_TOKEN"):
            return ModelError(
                f"model {repo_id}: the repo is gated and your token has no access to it ({token}). "
                f"Accept its conditions at {page} with the account of that token, then retry."
            )
        return ModelError(
            f"model {repo_id}: the repo is gated and needs a token ({token}). Accept its conditions at {page}, "
            "create a read token at https://huggingface.co/settings/tokens and set HF_TOKEN (or run "
            "`hf auth login`), then retry."
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return ModelError(
            f"model {repo_id}: no such repo on {endpoint()} (or it is private and {token}). Check the name "
            "(presets: z-image, z-image-turbo), or set HF_TOKEN for a private repo."
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ModelError(_disk_message(repo_id, need or 0, None))
    if _is_network_error(exc) or isinstance(exc, errors.LocalEntryNotFoundError):
        return ModelError(
            f"model {repo_id}: cannot reach {endpoint()} to download it ({_root(exc)}). Check the network, "
            "proxy and HF_ENDPOINT; or download it where there is network (`zrecipe download "
            f"{repo_id}`) and copy the Hugging Face cache, or pass a local model folder."
        )
    if isinstance(exc, errors.HfHubHTTPError):
        return ModelError(f"model {repo_id}: the Hub refused the download ({_root(exc)}). Try again later.")
    return ModelError(f"model {repo_id}: download failed ({type(exc).__name__}: {exc}).")


def _is_network_error(exc: BaseException) -> bool:
    """A connection / timeout / protocol failure of whichever HTTP client huggingface_hub uses."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        kind = type(exc)
        module = kind.__module__.split(".")[0]
        if isinstance(exc, (ConnectionError, TimeoutError)) or (
            module in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
            and any(word in kind.__name__ for word in ("Connect", "Timeout", "Network", "Protocol"))
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _root(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _literal(path: str) -> str:
    """An fnmatch pattern matching exactly `path`."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
