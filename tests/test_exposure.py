"""The app served to a LAN (issue 21, "Exposure"): with `--listen` and `--auth`, an upload above the limit is
refused in one line before it reaches the disk, repeated failed logins from one address slow down, and only the
output and upload folders are served, whatever path a file route is given; without `--listen` nothing listens
beyond loopback. `python app.py` runs as its own process; every request goes to 127.0.0.1 (the `--listen`
server binds 0.0.0.0, and the test reaches it through loopback)."""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import time
import urllib.parse
from pathlib import Path

import psutil
import pytest

from framepack_ui.ui.exposure import LOGIN_FAILURES, LOGIN_WAIT_S, LoginBackoff
from test_ui_browser import REPO, run_app

USER, PASSWORD = "alice", "wonderland"
UPLOAD_LIMIT_MB = 1
SECRET = "framepack-test-secret-7f3a"  # in every file that must not be served


def request(url: str, method: str = "GET", path: str = "/", body: bytes | None = None, headers: dict | None = None,
            timeout_s: float = 60) -> tuple[int, bytes, dict]:
    """(status, body, headers) of one request sent with the path exactly as given (no client normalises `..`)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


def login(url: str, password: str) -> tuple[int, str]:
    """(status, the login cookie header for later requests, "" when refused)."""
    body = urllib.parse.urlencode({"username": USER, "password": password}).encode()
    status, _, headers = request(url, "POST", "/login", body,
                                 {"Content-Type": "application/x-www-form-urlencoded"})
    cookies = [part.split(";")[0] for key, value in headers.items() if key.lower() == "set-cookie"
               for part in [value]]
    return status, "; ".join(cookies)


def multipart(name: str, content: bytes) -> tuple[bytes, dict]:
    boundary = "framepack-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def lan_server(tiny_models_dir, tmp_path_factory):
    """The app with --listen, --auth and a 1 MB upload limit; yields (url, pid, outputs, upload folder, the login
    cookie). Gradio's upload and cache folder is `gradio` beside the outputs."""
    outputs = tmp_path_factory.mktemp("outputs_exposed")
    uploads = outputs.parent / "gradio"
    with run_app(tiny_models_dir, outputs, "--listen", "--auth", f"{USER}:{PASSWORD}", "--max-upload",
                 str(UPLOAD_LIMIT_MB), env={"GRADIO_TEMP_DIR": str(uploads)}, name="app_exposed") as (url, pid):
        status, cookie = login(url, PASSWORD)
        assert status == 200 and cookie, status
        yield url, pid, outputs, uploads, cookie


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_an_upload_above_the_limit_is_refused_in_one_line_before_it_reaches_the_disk(lan_server):
    url, _, _, uploads, cookie = lan_server
    limit = UPLOAD_LIMIT_MB * 1_000_000
    before = set(files_under(uploads))
    body, headers = multipart("big.mp4", b"\0" * (3 * limit))
    status, answer, _ = request(url, "POST", "/gradio_api/upload", body, {**headers, "Cookie": cookie})
    line = answer.decode(errors="replace").strip()
    assert status == 413, (status, line)
    assert "\n" not in line and f"maximum allowed size of {limit} bytes" in line, line
    # the part Gradio had streamed in before the limit is removed; nothing near the upload's size was kept
    assert set(files_under(uploads)) == before
    assert not [p for p in files_under(uploads) if p.stat().st_size > limit]

    body, headers = multipart("small.png", b"x" * (limit // 2))  # the control: under the limit it is taken
    status, answer, _ = request(url, "POST", "/gradio_api/upload", body, {**headers, "Cookie": cookie})
    assert status == 200, (status, answer[:300])
    [path] = json.loads(answer)
    assert Path(path).stat().st_size == limit // 2


def test_the_upload_limit_is_stated_in_the_help_and_defaults_to_500_mb():
    import app
    from framepack_ui.ui.exposure import DEFAULT_MAX_UPLOAD_MB, upload_limit_bytes

    assert app.parse_args([]).max_upload is None and DEFAULT_MAX_UPLOAD_MB == 500
    assert upload_limit_bytes(app.parse_args(["--max-upload", "2.5"]).max_upload) == 2_500_000
    with pytest.raises(SystemExit):
        app.parse_args(["--max-upload", "0"])


# Every route Gradio serves files through, and ways to climb out of the folders it allows: plain, percent-encoded,
# doubly encoded, backslashes. Each names a file outside the output and upload folders that holds SECRET.
CLIMBS = ("../", "..%2f", "%2e%2e/", "%2e%2e%2f", "..%252f", "..\\", "..%5c")


def traversal_paths(outputs: Path, uploads: Path, secrets: list[Path]) -> list[str]:
    live = outputs / ".live"
    paths = []
    for secret in secrets:
        for route in ("/gradio_api/file=", "/file=", "/gradio_api/file/"):
            paths.append(f"{route}{secret}")
            paths.append(f"{route}{urllib.parse.quote(str(secret))}")
            for inside in (outputs, uploads, live):
                up = len(inside.parts) - 1  # from the allowed folder to the file system's root
                for climb in CLIMBS:
                    paths.append(f"{route}{inside}/{climb * up}{str(secret).lstrip('/')}")
        for route in ("/static/", "/assets/", "/gradio_api/static/", "/gradio_api/assets/", "/svelte/",
                      "/gradio_api/custom_component/x/client/", "/gradio_api/proxy=", "/gradio_api/deep_link?deep_link="):
            for climb in CLIMBS:
                paths.append(f"{route}{climb * 16}{str(secret).lstrip('/')}")
            paths.append(f"{route}file://{secret}")
    return paths


def test_only_the_output_and_upload_folders_are_served_through_any_file_route(lan_server, tiny_models_dir):
    url, _, outputs, uploads, cookie = lan_server
    inside = outputs / "served.json"
    inside.write_text('{"served": true}')
    beside = outputs.parent / "beside_outputs.txt"  # next to the outputs folder: must stay private
    beside.write_text(SECRET)
    in_models = tiny_models_dir / "secret.txt"
    in_models.write_text(SECRET)
    in_repo = REPO / "tests" / ".exposure_secret.txt"  # the app's working directory
    in_repo.write_text(SECRET)
    try:
        auth = {"Cookie": cookie}
        # the controls: with the login cookie, the outputs folder and an upload are served
        assert request(url, path=f"/gradio_api/file={inside}", headers=auth)[:2] == (200, b'{"served": true}')
        body, headers = multipart("mine.txt", b"uploaded here")
        status, answer, _ = request(url, "POST", "/gradio_api/upload", body, {**headers, **auth})
        [uploaded] = json.loads(answer)
        assert request(url, path=f"/gradio_api/file={uploaded}", headers=auth)[:2] == (200, b"uploaded here")

        paths = traversal_paths(outputs, uploads, [beside, in_models, in_repo])
        leaked = []
        for path in paths:
            status, answer, _ = request(url, path=path, headers=auth)
            if SECRET.encode() in answer:
                leaked.append((path, status))
        assert not leaked, leaked
        print(f"{len(paths)} traversal paths refused")
        # gradio's own front end is served (the pages need it), but nothing of the app's source beside it
        for path in ("/static/../../../app.py", "/assets/../../app.py", f"/gradio_api/file={REPO / 'app.py'}"):
            assert b"FramePack UI web app" not in request(url, path=path, headers=auth)[1], path
    finally:
        for secret in (beside, in_models, in_repo):
            secret.unlink()


def test_failed_logins_from_one_address_wait_at_least_5_s_after_the_fifth(lan_server):
    """Five wrong passwords within a minute: the sixth attempt, and two more sent at once, each wait LOGIN_WAIT_S
    (5 s) before their answer. Lower bounds on time only: load makes them longer, never shorter (the server
    sleeps, then answers)."""
    url, *_ = lan_server
    for _ in range(LOGIN_FAILURES):
        assert login(url, "wrong")[0] == 400
    started = time.monotonic()
    assert login(url, "wrong")[0] == 400
    assert time.monotonic() - started >= LOGIN_WAIT_S
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # at once: they queue, one wait each
        statuses = list(pool.map(lambda _: login(url, "wrong")[0], range(2)))
    assert statuses == [400, 400] and time.monotonic() - started >= 2 * LOGIN_WAIT_S
    started = time.monotonic()
    status, cookie = login(url, PASSWORD)  # the right password still gets in, after the wait
    assert status == 200 and cookie and time.monotonic() - started >= LOGIN_WAIT_S


def test_the_login_back_off_counts_per_address_and_forgets_after_the_window():
    """The middleware alone, on a stand-in clock: failures count per client address within the window; a success
    or the window's end clears them."""
    import asyncio

    now = [0.0]
    slept = []

    async def gradio_login(scope, receive, send):  # Gradio's answer: 200 for the right password, else 400
        status = 200 if scope["query_string"] == b"right" else 400
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    backoff = LoginBackoff(gradio_login, clock=lambda: now[0])

    async def attempt(host, password="wrong", path="/login"):
        real_sleep = asyncio.sleep

        async def fake_sleep(seconds):
            slept.append((host, seconds))
            await real_sleep(0)

        asyncio.sleep = fake_sleep
        try:
            await backoff({"type": "http", "method": "POST", "path": path, "client": (host, 1),
                           "query_string": password.encode()}, None, _ignore)
        finally:
            asyncio.sleep = real_sleep

    async def scenario():
        for _ in range(LOGIN_FAILURES):
            await attempt("10.0.0.1")
        assert slept == []
        await attempt("10.0.0.2")  # another address is not slowed
        await attempt("10.0.0.1", path="/login/")
        assert slept == [("10.0.0.1", LOGIN_WAIT_S)]
        now[0] += 61  # a minute without attempts: forgotten
        await attempt("10.0.0.1")
        assert len(slept) == 1
        for _ in range(LOGIN_FAILURES - 1):  # five within the window, with the one above
            await attempt("10.0.0.1")
        await attempt("10.0.0.1", "right")  # waits, then clears the count
        await attempt("10.0.0.1")
        assert len(slept) == 2

    asyncio.run(scenario())


async def _ignore(message):
    pass


def app_sockets(pid: int) -> list:
    """Every inet socket of the app's process and its children."""
    process = psutil.Process(pid)
    sockets = []
    for each in [process, *process.children(recursive=True)]:
        sockets += each.net_connections(kind="inet")
    return sockets


def test_without_listen_nothing_listens_beyond_loopback(tiny_models_dir, tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with run_app(tiny_models_dir, outputs, "--auth", f"{USER}:{PASSWORD}", name="app_local") as (url, pid):
        assert login(url, PASSWORD)[0] == 200  # served, and the sockets read while it serves
        sockets = app_sockets(pid)
    listening = [s for s in sockets if s.status == psutil.CONN_LISTEN]
    assert listening, sockets
    # TCP listeners and bound UDP sockets alike: every local address is loopback
    assert all(psutil_ip_is_loopback(s.laddr.ip) for s in sockets if s.laddr), sockets


def psutil_ip_is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1"


def test_with_listen_the_app_listens_on_every_interface(lan_server):
    """The control for the test above: the same reading sees 0.0.0.0 when --listen asks for it."""
    _, pid, *_ = lan_server
    listening = [s.laddr.ip for s in app_sockets(pid) if s.status == psutil.CONN_LISTEN]
    assert listening and set(listening) == {"0.0.0.0"}, listening
