"""A fake Hugging Face Hub on 127.0.0.1 for download tests: no test ever talks to the real hub.

It answers the requests that huggingface_hub 2.4 makes to fetch one file (logged and checked against the
real client): `HEAD /{repo}/resolve/{revision}/{path}` for the metadata (X-Repo-Commit, ETag, size), then
`GET` of the same url, or of the CDN url it redirects to. Like the real hub, large ("LFS") files answer the
resolve url with a 302 to a second origin (the fake CDN, another port) carrying X-Linked-Size and
X-Linked-Etag (the sha256), and the CDN honours `Range` with 206. Any other path (e.g. `/api/...`) is
logged and answered 404, so a test can see that nothing else was asked for.

Every request is recorded (method, path, Range header) and the body bytes served per file are counted,
so tests can assert exactly what was fetched. `cut()` injects a dropped connection part-way through a file;
`hold()` pauses one part-way, so a test can act (cancel) while a download is surely running.
"""
from __future__ import annotations

import hashlib
import http.server
import socket
import sys
import threading
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # url path as sent, e.g. "/owner/repo/resolve/main/vae/config.json" or "/blobs/<sha256>"
    range: str | None  # the Range header, if any
    origin: str  # "hub" or "cdn"


@dataclass
class _Hold:
    at: int  # absolute offset in the file where the next GET pauses
    reached: threading.Event  # set once the bytes before `at` are sent
    release: threading.Event  # the rest is sent once this is set


@dataclass
class _Cut:
    at: int  # absolute offset in the file where the connection drops
    times: int  # how many more GETs of the file are cut


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Serves {repo_id: {path_in_repo: bytes}} over HTTP on 127.0.0.1 (a hub origin and a CDN origin).

    Use as a context manager; `url` is the endpoint to pass as HF_ENDPOINT / `endpoint=`.
    """

    def __init__(self, repos: dict[str, dict[str, bytes]], *, lfs_suffixes: tuple[str, ...] = (".safetensors",)):
        self.repos = repos
        self.lfs_suffixes = lfs_suffixes
        self.commits = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}  # one fixed commit per repo
        self.requests: list[Request] = []
        self.bytes_served: dict[tuple[str, str], int] = {}  # (repo, path) -> body bytes sent by GETs
        self._blobs: dict[str, tuple[str, str]] = {}  # sha256 -> (repo, path), for CDN urls
        self._cuts: dict[tuple[str, str], _Cut] = {}
        self._holds: dict[tuple[str, str], _Hold] = {}
        self._lock = threading.Lock()
        self._servers: list[http.server.ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.url = ""
        self.cdn_url = ""
        for repo, files in repos.items():
            for path, data in files.items():
                if self._is_lfs(path):
                    self._blobs[hashlib.sha256(data).hexdigest()] = (repo, path)

    # -- test helpers -------------------------------------------------------------------------------
    def cut(self, repo: str, path: str, *, at: int, times: int = 1) -> None:
        """Drop the connection at byte `at` of the file in each of its next `times` GET responses.

        A GET that starts at or after `at` (a resumed one) sends its headers and then drops with no body.
        """
        with self._lock:
            self._cuts[(repo, path)] = _Cut(at, times)

    def hold(self, repo: str, path: str, *, at: int) -> tuple[threading.Event, threading.Event]:
        """Pause the next GET of the file after its first `at` bytes; returns (reached, release): `reached` is set
        once those bytes are sent, and the rest follows once the test sets `release` (or after 60 s)."""
        held = _Hold(at, threading.Event(), threading.Event())
        with self._lock:
            self._holds[(repo, path)] = held
        return held.reached, held.release

    def requested_paths(self, method: str | None = None) -> list[str]:
        with self._lock:
            return [r.path for r in self.requests if method is None or r.method == method]

    def files_requested(self) -> set[tuple[str, str]]:
        """(repo, path in repo) of every file whose metadata or bytes were asked for, through the hub or CDN."""
        found = set()
        with self._lock:
            requests = list(self.requests)
        for r in requests:
            key = self._blobs.get(r.path.removeprefix("/blobs/")) if r.origin == "cdn" else self._parse_resolve(r.path)
            if key is not None:
                found.add(key[:2])
        return found

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_served.clear()

    # -- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> "FakeHub":
        hub_server = self._serve("hub")
        cdn_server = self._serve("cdn")
        self.url = f"http://127.0.0.1:{hub_server.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{cdn_server.server_address[1]}"
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _serve(self, origin: str) -> http.server.ThreadingHTTPServer:
        server = _QuietServer(("127.0.0.1", 0), _make_handler(self, origin))
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), name=f"fake-hub-{origin}", daemon=True)
        thread.start()
        self._servers.append(server)
        self._threads.append(thread)
        return server

    # -- internals ------------------------------------------------------------------------------------
    def _is_lfs(self, path: str) -> bool:
        return path.endswith(self.lfs_suffixes)

    def _parse_resolve(self, url_path: str) -> tuple[str, str, str] | None:
        """'/owner/name/resolve/<rev>/<path>' -> (repo, path, rev) if it names a known repo."""
        parts = unquote(urlsplit(url_path).path).lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return None
        return "/".join(parts[:2]), "/".join(parts[4:]), parts[3]

    def _take_cut(self, key: tuple[str, str]) -> int | None:
        with self._lock:
            cut = self._cuts.get(key)
            if cut is None or cut.times <= 0:
                return None
            cut.times -= 1
            return cut.at

    def _take_hold(self, key: tuple[str, str], start: int, end: int) -> _Hold | None:
        with self._lock:
            held = self._holds.get(key)
            if held is None or not start < held.at < end:
                return None
            del self._holds[key]
            return held

    def _count(self, key: tuple[str, str], n: int) -> None:
        with self._lock:
            self.bytes_served[key] = self.bytes_served.get(key, 0) + n


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that gives up mid-response (a cancelled download) is expected; anything else is shown.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _make_handler(hub: FakeHub, origin: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects from the hub

        def log_message(self, *args) -> None:  # quiet: the request log is hub.requests
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            with hub._lock:
                hub.requests.append(Request(self.command, self.path, self.headers.get("Range"), origin))
            if origin == "cdn":
                key = hub._blobs.get(urlsplit(self.path).path.removeprefix("/blobs/"))
                if key is None:
                    return self._status(404)
                return self._content(key, body, sha256=None)
            parsed = hub._parse_resolve(self.path)
            if parsed is None:
                return self._status(404)  # e.g. /api/models/...: the client should not need it
            repo, path, revision = parsed
            if repo not in hub.repos:
                return self._status(401, {"X-Error-Code": "RepoNotFound"})
            commit = hub.commits[repo]
            if revision not in ("main", commit):
                return self._status(404, {"X-Error-Code": "RevisionNotFound"})
            data = hub.repos[repo].get(path)
            if data is None:
                return self._status(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
            if hub._is_lfs(path):  # like the hub: LFS files redirect to the CDN, metadata in X-Linked-*
                sha256 = hashlib.sha256(data).hexdigest()
                self.send_response(302)
                self.send_header("Location", f"{hub.cdn_url}/blobs/{sha256}")
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{_git_blob_sha1(data)}"')  # the pointer file's etag
                self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return self._content((repo, path), body, sha256=None, commit=commit)

        def _content(self, key: tuple[str, str], body: bool, sha256: str | None, commit: str | None = None) -> None:
            repo, path = key
            data = hub.repos[repo][path]
            start, end = 0, len(data)  # [start, end)
            status = 200
            wanted = self.headers.get("Range")
            if wanted and wanted.startswith("bytes="):
                first, _, last = wanted[len("bytes="):].partition("-")
                start = int(first) if first else 0
                end = int(last) + 1 if last else len(data)
                if start >= len(data):
                    return self._status(416, {"Content-Range": f"bytes */{len(data)}"})
                status = 206
            self.send_response(status)
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest() if hub._is_lfs(path) else _git_blob_sha1(data)}"')
            if commit is not None:
                self.send_header("X-Repo-Commit", commit)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return None
            cut_at = hub._take_cut(key)
            stop = end if cut_at is None else max(start, min(end, cut_at))
            hub._count(key, stop - start)  # before sending: the client may be done before this thread goes on
            held = hub._take_hold(key, start, stop)
            if held is not None:  # injected pause: the first part, then wait for the test
                self.wfile.write(data[start:held.at])
                self.wfile.flush()
                held.reached.set()
                held.release.wait(60)
                start = held.at
            self.wfile.write(data[start:stop])
            self.wfile.flush()
            if stop < end:  # injected fault: drop the connection mid-body
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return None

        def _status(self, code: int, headers: dict[str, str] | None = None) -> None:
            payload = b'{"error": "not found"}' if code != 416 else b""
            self.send_response(code)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return None

    return Handler


def guard_loopback_only(monkeypatch) -> None:
    """Make any connection or name lookup for a non-loopback host fail at once (a safety net for tests)."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def _check(host) -> None:
        if str(host) not in LOOPBACK_HOSTS:
            raise OSError(f"test tried to reach non-loopback host {host!r}")

    def getaddrinfo(host, *args, **kwargs):
        _check(host.decode() if isinstance(host, bytes) else host)
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address[0])
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address[0])
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


def isolate_hf(monkeypatch, tmp_path, endpoint: str) -> None:
    """Point huggingface_hub at `endpoint` with no token, no telemetry, no xet and a throwaway HF_HOME.

    huggingface_hub reads its environment once, at import, so the module constants are patched as well.
    """
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_TOKEN_PATH": str(home / "token"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name, value in {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
                        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
                        "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_DISABLE_XET": True,
                        "HF_HUB_DISABLE_IMPLICIT_TOKEN": True, "HF_HUB_OFFLINE": False,
                        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json")}.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)


def repos_of(models_dir) -> dict[str, dict[str, bytes]]:
    """Every file the layout needs, read from a models folder in the real layout (e.g. the tiny models), as the
    {repo_id: {path_in_repo: bytes}} a FakeHub serves."""
    from framepack_ui.weights import layout

    repos: dict[str, dict[str, bytes]] = {}
    for component in layout.COMPONENTS.values():
        for name in component.files:
            path = f"{component.subfolder}/{name}" if component.subfolder else name
            repos.setdefault(component.repo, {})[path] = (component.folder(models_dir) / name).read_bytes()
    return repos
