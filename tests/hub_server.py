"""A small Hugging Face Hub-compatible HTTP server on loopback, for download tests with the real client.

It serves repos held in memory at a fixed commit through the endpoints `huggingface_hub` (2.4) calls for
`snapshot_download` (read from its code): `GET /api/models/<repo>[/revision/<rev>]` (repo info with
siblings, their sizes with `?blobs=true`), `GET /api/models/<repo>/tree/<rev>?recursive=...` (the file listing with sizes, git and LFS
ids), and `HEAD` / `GET /<repo>/resolve/<rev>/<file>` with `X-Repo-Commit`, `ETag`, `Content-Length` and
byte `Range`s. Errors carry the `X-Error-Code` headers the client turns into typed exceptions: a gated
repo answers 401 without a token and 403 with a token that has no access; an unknown repo 404.

Test hooks: `cut_after[file] = n` makes the next full GET of `file` send `n` bytes and drop the
connection (a network failure mid-file); `hold[file] = n` sends `n` bytes and then blocks until
`release()` (a download frozen mid-file, to kill the client there). `served[file]` counts the body bytes
sent per file; `requests` logs (method, path, Range header, status).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")  # stored in LFS on the Hub (ETag = sha256)


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = COMMIT
    gated: bool = False
    tokens: tuple[str, ...] = ()  # tokens granted access to a gated repo


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)
    hold: dict[str, int] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None, int]] = field(default_factory=list)

    def __post_init__(self):
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- setup ------------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes], **options) -> Repo:
        self.repos[repo_id] = Repo(dict(files), **options)
        return self.repos[repo_id]

    @staticmethod
    def folder_files(folder: Path) -> dict[str, bytes]:
        """Every file under `folder` by its repo path."""
        return {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
        }

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def release(self) -> None:
        """Let held transfers continue."""
        self._released.set()

    def body_bytes(self, name: str | None = None) -> int:
        """Body bytes sent for `name` (all files when None)."""
        with self._lock:
            return self.served.get(name, 0) if name else sum(self.served.values())

    def _count(self, name: str, n: int) -> None:
        with self._lock:
            self.served[name] = self.served.get(name, 0) + n


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self._route(body=True)

    def do_HEAD(self) -> None:
        self._route(body=False)

    # -- routing ----------------------------------------------------------------------------------------

    def _route(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and (len(parts) == 4 or parts[4:5] in (["revision"], ["tree"])):
            repo_id, kind = "/".join(parts[2:4]), (parts[4:5] or ["revision"])[0]
            repo = self._repo(repo_id)
            if repo is not None:
                blobs = "blobs=true" in urlsplit(self.path).query.lower()
                self._json(self._info(repo_id, repo, blobs) if kind == "revision" else self._tree(repo))
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo_id, name = "/".join(parts[:2]), "/".join(parts[4:])
            repo = self._repo(repo_id)
            if repo is not None:
                self._file(repo, name, body)
        else:
            self._error(404, "EntryNotFound", f"{path} not found")

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.gated:
            auth = self.headers.get("authorization", "")
            token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
            if token is None:
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. Please log in.")
                return None
            if token not in repo.tokens:
                self._error(
                    403, "GatedRepo", f"Access to model {repo_id} is restricted; you are not authorized."
                )
                return None
        return repo

    # -- responses --------------------------------------------------------------------------------------

    @staticmethod
    def _info(repo_id: str, repo: Repo, blobs: bool) -> dict:
        siblings = []
        for name, data in sorted(repo.files.items()):
            sibling = {"rfilename": name}
            if blobs:  # `files_metadata=True`: sizes, git ids and LFS details
                sibling.update(size=len(data), blobId=git_oid(data))
                if name.endswith(LFS_SUFFIXES):
                    sibling["lfs"] = {"size": len(data), "sha256": sha256(data), "pointerSize": 134}
            siblings.append(sibling)
        return {
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.commit,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "siblings": siblings,
        }

    @staticmethod
    def _tree(repo: Repo) -> list[dict]:
        entries, folders = [], set()
        for name, data in sorted(repo.files.items()):
            parent = name.rsplit("/", 1)[0] if "/" in name else None
            while parent and parent not in folders:
                folders.add(parent)
                entries.append(
                    {"type": "directory", "oid": git_oid(parent.encode()), "size": 0, "path": parent}
                )
                parent = parent.rsplit("/", 1)[0] if "/" in parent else None
            entry = {"type": "file", "oid": git_oid(data), "size": len(data), "path": name}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": sha256(data), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries

    def _file(self, repo: Repo, name: str, body: bool) -> None:
        data = repo.files.get(name)
        if data is None:
            self._error(404, "EntryNotFound", f"{name} does not exist", commit=repo.commit)
            return
        etag = sha256(data) if name.endswith(LFS_SUFFIXES) else git_oid(data)
        start, status = 0, 200
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            start = int(wanted.removeprefix("bytes=").split("-")[0] or 0)
            status = 206
        chunk = data[start:]
        self.hub.requests.append((self.command, name, wanted, status))
        self.send_response(status)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(chunk)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        cut = self.hub.cut_after.pop(name, None) if start == 0 else None
        hold = self.hub.hold.pop(name, None) if start == 0 else None
        limit = cut if cut is not None else hold
        if limit is not None:
            self._send(name, chunk[:limit])
            if hold is not None:
                self.hub._released.wait()
            self.close_connection = True  # the rest never comes: the client sees a truncated body
            return
        self._send(name, chunk)

    def _send(self, name: str, data: bytes) -> None:
        step = 64 * 1024
        for i in range(0, len(data), step):
            self.wfile.write(data[i : i + step])
            self.wfile.flush()
            self.hub._count(name, len(data[i : i + step]))

    def _json(self, data) -> None:
        raw = json.dumps(data).encode()
        self.hub.requests.append((self.command, urlsplit(self.path).path, None, 200))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        self.hub.requests.append((self.command, urlsplit(self.path).path, None, status))
        raw = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)
