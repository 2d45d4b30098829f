"""ensure_models: fetch only the missing files, resumably, with progress and one-line errors.

Every test talks to a fake hub on 127.0.0.1 (tests/fake_hub.py); any other host is refused outright.
"""
from __future__ import annotations

import dataclasses
import random
import socket
from pathlib import Path

import huggingface_hub.file_download as hf_file_download
import pytest
from filelock import FileLock
from huggingface_hub import constants as hf_constants

from fake_hub import FakeHub, guard_loopback_only, isolate_hf
from framepack_ui.errors import Cancelled, ModelFilesError
from framepack_ui.weights import download, layout
from framepack_ui.weights.download import DownloadProgress, describe_missing, ensure_models

CHUNK = 64 * 1024  # http_get's read size in these tests (10 MB for real), so a cut lands after written chunks
BIG = 600_000  # size of each fake .safetensors file
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"


def _fake_repos() -> dict[str, dict[str, bytes]]:
    """Every file the layout needs, plus what the real repositories also hold and the app must never fetch."""
    rng = random.Random(0)
    repos: dict[str, dict[str, bytes]] = {}
    for component in layout.COMPONENTS.values():
        files = repos.setdefault(component.repo, {})
        for name in component.files:
            path = f"{component.subfolder}/{name}" if component.subfolder else name
            files[path] = rng.randbytes(BIG) if name.endswith(".safetensors") else f'{{"file": "{path}"}}'.encode()
    hunyuan = repos[layout.HUNYUAN_REPO]
    hunyuan["README.md"] = b"# HunyuanVideo"
    hunyuan["model_index.json"] = b"{}"
    hunyuan["transformer/config.json"] = b"{}"
    for i in range(1, 4):  # stands in for the 25 GB transformer FramePack never reads
        hunyuan[f"transformer/diffusion_pytorch_model-{i:05d}-of-00003.safetensors"] = rng.randbytes(2 * BIG)
    repos[layout.REDUX_REPO]["redux/model.safetensors"] = rng.randbytes(BIG)
    repos[layout.F1_REPO]["README.md"] = b"# F1"
    return repos


def _needed() -> set[tuple[str, str]]:
    return {(c.repo, f"{c.subfolder}/{f}" if c.subfolder else f) for c in layout.COMPONENTS.values() for f in c.files}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    guard_loopback_only(monkeypatch)
    with FakeHub(_fake_repos()) as fake:
        isolate_hf(monkeypatch, tmp_path, fake.url)
        monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
        monkeypatch.setattr(hf_file_download.time, "sleep", lambda seconds: None)  # http_get waits 1 s per retry
        yield fake


@pytest.fixture
def models(tmp_path) -> Path:
    return tmp_path / "models"


def _on_disk(models: Path, repo: str, path: str) -> bytes:
    return (models / repo / path).read_bytes()


def _leftovers(models: Path) -> list[Path]:
    return sorted(models.rglob("*.incomplete"))


def test_downloads_only_needed_subfolders(hub, models):
    ensure_models(models, endpoint=hub.url)

    assert layout.missing(models) == {}
    for repo, path in _needed():
        assert _on_disk(models, repo, path) == hub.repos[repo][path]
    assert hub.files_requested() == _needed()  # nothing else, in particular not HunyuanVideo's transformer
    assert not [p for p in hub.requested_paths() if "/transformer/" in p or p.endswith("README.md")]
    assert not (models / layout.HUNYUAN_REPO / "transformer").exists()
    assert all("/resolve/" in p or p.startswith("/blobs/") for p in hub.requested_paths())  # no /api calls
    assert len(hub.requested_paths("HEAD")) == len(_needed())  # one metadata request per file
    assert _leftovers(models) == []


def test_download_resumes_after_interruption(hub, models):
    data = hub.repos[layout.HUNYUAN_REPO][VAE_WEIGHTS]
    # Dropped at 250 kB, then 5 more drops: more than http_get's own retries within one call.
    hub.cut(layout.HUNYUAN_REPO, VAE_WEIGHTS, at=250_000, times=6)

    with pytest.raises(ModelFilesError) as first:
        ensure_models(models, ("vae",), endpoint=hub.url)
    assert "\n" not in first.value.message and "run it again to resume" in first.value.message
    assert "diffusion_pytorch_model.safetensors" in first.value.message
    dest = models / layout.HUNYUAN_REPO / VAE_WEIGHTS
    assert not dest.exists()
    [partial] = _leftovers(models)
    kept = partial.stat().st_size
    assert 0 < kept <= 250_000 and partial.read_bytes() == data[:kept]

    hub.clear_log()
    ensure_models(models, ("vae",), endpoint=hub.url)

    assert dest.read_bytes() == data
    gets = [r for r in hub.requests if r.method == "GET" and r.origin == "cdn"]
    assert [r.range for r in gets] == [f"bytes={kept}-"]  # continued where the partial file ends
    assert hub.bytes_served[(layout.HUNYUAN_REPO, VAE_WEIGHTS)] == len(data) - kept  # nothing fetched twice
    assert ("GET", f"/{layout.HUNYUAN_REPO}/resolve/main/vae/config.json") not in {
        (r.method, r.path) for r in hub.requests}  # the config, already complete, was not fetched again
    assert _leftovers(models) == []


def test_dropped_connection_is_resumed_within_the_call(hub, models):
    data = hub.repos[layout.HUNYUAN_REPO][VAE_WEIGHTS]
    hub.cut(layout.HUNYUAN_REPO, VAE_WEIGHTS, at=250_000, times=1)

    ensure_models(models, ("vae",), endpoint=hub.url)

    assert (models / layout.HUNYUAN_REPO / VAE_WEIGHTS).read_bytes() == data
    ranges = [r.range for r in hub.requests if r.method == "GET" and r.origin == "cdn"]
    assert ranges[0] is None and len(ranges) == 2 and ranges[1].startswith("bytes=")
    assert hub.bytes_served[(layout.HUNYUAN_REPO, VAE_WEIGHTS)] < len(data) + CHUNK  # at most a chunk re-sent


def test_progress_reported(hub, models):
    events: list[DownloadProgress] = []
    names = ("vae", "image_encoder", "feature_extractor")

    ensure_models(models, names, endpoint=hub.url, progress=events.append)

    expected = {(n, f): len(hub.repos[layout.COMPONENTS[n].repo][f"{layout.COMPONENTS[n].subfolder}/{f}"])
                for n in names for f in layout.COMPONENTS[n].files}
    total = sum(expected.values())
    assert {(e.component, e.file) for e in events} == set(expected)
    assert all(e.overall_total == total for e in events)
    overall = [e.overall_done for e in events]
    assert overall == sorted(overall) and overall[-1] == total
    for (component, file), size in expected.items():
        mine = [e for e in events if (e.component, e.file) == (component, file)]
        assert all(e.total_bytes == size for e in mine)
        assert [e.done_bytes for e in mine] == sorted(e.done_bytes for e in mine) and mine[-1].done_bytes == size
    assert len([e for e in events if e.file == "diffusion_pytorch_model.safetensors"]) > BIG // CHUNK  # per chunk
    with pytest.raises(dataclasses.FrozenInstanceError):
        events[0].done_bytes = 1  # type: ignore[misc]


def test_cancel_from_progress_keeps_partial_for_next_run(hub, models):
    data = hub.repos[layout.HUNYUAN_REPO][VAE_WEIGHTS]

    def stop_midway(event: DownloadProgress) -> None:
        if event.file == "diffusion_pytorch_model.safetensors" and event.done_bytes >= 3 * CHUNK:
            raise Cancelled()

    with pytest.raises(Cancelled):
        ensure_models(models, ("vae",), endpoint=hub.url, progress=stop_midway)
    [partial] = _leftovers(models)
    kept = partial.stat().st_size  # http_get counts a chunk just before writing it: 2 or 3 chunks on disk
    assert 2 * CHUNK <= kept <= 3 * CHUNK and partial.read_bytes() == data[:kept]

    hub.clear_log()
    ensure_models(models, ("vae",), endpoint=hub.url)
    assert (models / layout.HUNYUAN_REPO / VAE_WEIGHTS).read_bytes() == data
    assert [r.range for r in hub.requests if r.method == "GET" and r.origin == "cdn"] == [f"bytes={kept}-"]


def test_cancel_event_stops_after_a_chunk_and_the_next_run_resumes(hub, models):
    import threading

    data = hub.repos[layout.HUNYUAN_REPO][VAE_WEIGHTS]
    cancel = threading.Event()

    def cancel_midway(event: DownloadProgress) -> None:  # as a Cancel button would, from another thread
        if event.file == "diffusion_pytorch_model.safetensors" and event.done_bytes >= 3 * CHUNK:
            cancel.set()

    with pytest.raises(Cancelled):
        ensure_models(models, ("vae",), endpoint=hub.url, progress=cancel_midway, cancel=cancel)
    assert not (models / layout.HUNYUAN_REPO / VAE_WEIGHTS).exists()  # nothing half-fetched looks complete
    [partial] = _leftovers(models)
    kept = partial.stat().st_size  # the chunk that set it was written; the next one was not
    assert 3 * CHUNK <= kept < 5 * CHUNK and partial.read_bytes() == data[:kept]

    hub.clear_log()
    with pytest.raises(Cancelled):  # still set: stops before fetching any byte
        ensure_models(models, ("vae",), endpoint=hub.url, cancel=cancel)
    assert hub.requested_paths("GET") == [] and _size_of(partial) == kept

    ensure_models(models, ("vae",), endpoint=hub.url, cancel=threading.Event())
    assert (models / layout.HUNYUAN_REPO / VAE_WEIGHTS).read_bytes() == data
    assert [r.range for r in hub.requests if r.method == "GET" and r.origin == "cdn"] == [f"bytes={kept}-"]


def _size_of(path: Path) -> int:
    return path.stat().st_size


def test_offline_message_names_missing_files_and_destination(hub, models, monkeypatch):
    (models / layout.F1_REPO).mkdir(parents=True)
    (models / layout.F1_REPO / "config.json").write_text("{}")

    with pytest.raises(ModelFilesError) as off:
        ensure_models(models, ("transformer", "vae"), allow_download=False, endpoint=hub.url)
    message = off.value.message
    assert "\n" not in message and message == str(off.value)
    transformer_dir = models / layout.F1_REPO
    assert f"transformer ({layout.F1_REPO}: diffusion_pytorch_model.safetensors.index.json, " \
           f"diffusion_pytorch_model-00001..00003-of-00003.safetensors) -> put them in {transformer_dir}" in message
    assert f"vae ({layout.HUNYUAN_REPO}: vae/config.json, vae/diffusion_pytorch_model.safetensors) " \
           f"-> put them in {models / layout.HUNYUAN_REPO / 'vae'}" in message
    assert "transformer (" in message and "config.json," not in message.split("transformer (")[1].split(")")[0]
    assert "python -m framepack_ui download" in message and "downloads are turned off" in message

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFilesError, match="HF_HUB_OFFLINE") as offline:
        ensure_models(models, ("vae",), endpoint=hub.url)
    assert "vae/diffusion_pytorch_model.safetensors" in offline.value.message
    assert hub.requests == []  # neither asked the hub anything
    monkeypatch.delenv("HF_HUB_OFFLINE")

    with socket.socket() as s:  # a loopback port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ModelFilesError, match="cannot reach") as unreachable:
        ensure_models(models, ("vae",), endpoint=dead)
    assert "\n" not in unreachable.value.message
    assert f"-> put them in {models / layout.HUNYUAN_REPO / 'vae'}" in unreachable.value.message


def test_nothing_missing_makes_no_request(hub, models):
    ensure_models(models, ("vae", "tokenizer"), endpoint=hub.url)
    hub.clear_log()

    ensure_models(models, ("vae", "tokenizer"), endpoint=hub.url)
    ensure_models(models, ("vae",), endpoint="http://127.0.0.1:9", allow_download=False)

    assert hub.requests == []
    assert describe_missing(models, ("vae", "tokenizer")) == ""


def test_disk_space_shortfall_is_clear(hub, models, monkeypatch):
    real = download.shutil.disk_usage
    monkeypatch.setattr(download.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=100_000))

    with pytest.raises(ModelFilesError) as short:
        ensure_models(models, ("vae", "image_encoder"), endpoint=hub.url)

    need = sum(len(hub.repos[c.repo][f"{c.subfolder}/{f}"]) for n in ("vae", "image_encoder")
               for c in [layout.COMPONENTS[n]] for f in c.files)
    message = short.value.message
    assert "\n" not in message
    assert f"need {download._human(need)} free on {download._volume(models)}, have {download._human(100_000)}" in message
    assert hub.requested_paths("GET") == []  # only the sizes were asked for
    assert _leftovers(models) == [] and layout.missing(models, ("vae",))


def test_second_download_into_the_same_folder_is_refused(hub, models):
    models.mkdir()
    with FileLock(str(models / ".download.lock")):
        with pytest.raises(ModelFilesError, match="another download"):
            ensure_models(models, ("vae",), endpoint=hub.url)
    assert hub.requests == []


def test_describe_missing_lists_everything_on_one_line(models):
    text = describe_missing(models)
    assert "\n" not in text and text.startswith("missing model files: ")
    for name, component in layout.COMPONENTS.items():
        assert f"{name} ({component.repo}: " in text
        assert f"-> put them in {component.folder(models)}" in text
    assert "text_encoder/model-00001..00004-of-00004.safetensors" in text
    assert text.endswith("or run `python -m framepack_ui download`")


def test_tests_cannot_reach_beyond_loopback(monkeypatch):
    guard_loopback_only(monkeypatch)
    with pytest.raises(OSError, match="non-loopback"):
        socket.getaddrinfo("huggingface.co", 443)
    with pytest.raises(OSError, match="non-loopback"), socket.socket() as s:
        s.connect(("192.0.2.1", 443))  # TEST-NET-1: refused before any packet leaves
