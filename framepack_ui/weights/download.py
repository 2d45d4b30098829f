"""Fetch exactly the model files the app lacks, into the real Hugging Face folder layout, resumably.

Only the files `layout.missing()` names are fetched, one at a time, never a whole repository (the
HunyuanVideo repository also holds a 25 GB transformer FramePack never reads). Each file is asked for
with huggingface_hub's own pieces: `get_hf_file_metadata` (a HEAD of `/{repo}/resolve/main/{path}`: size,
etag, commit) and `http_get` (a GET of the same path pinned to that commit, following the hub's redirect to
its CDN, with a `Range` header when resuming).

Why not `hf_hub_download`: in huggingface_hub 2.4 it writes each file to a temporary file with a random
name and deletes it on any failure, so a download cut at 20 of 25 GB starts again from zero on the next
run (`http_get`'s own retries, with Range, only help within one call). Here the partial file keeps a stable
name next to its destination (`<file>.<etag>.incomplete`), so the next run, even after the app was closed,
continues from where it stopped; it is renamed into place only once complete and of the right size.

Public repositories only: no token is read or sent.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx2
from filelock import FileLock, Timeout
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers
from tqdm.std import tqdm

from framepack_ui import __version__
from framepack_ui.errors import Cancelled, ModelFilesError
from framepack_ui.units import GB, MB
from framepack_ui.weights import layout
from framepack_ui.weights.layout import DOWNLOAD_COMMAND

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadProgress:
    """Bytes fetched so far, for one file and for the whole download (partial files from earlier runs count).

    Sent once per chunk read (10 MB with huggingface_hub's default), at the start and at the end of each file.
    """
    component: str  # layout component name, e.g. "text_encoder"
    file: str  # file name as in Component.files, e.g. "model-00001-of-00004.safetensors"
    done_bytes: int
    total_bytes: int  # 0 when the hub did not say and there is no estimate
    overall_done: int
    overall_total: int
    model_done: int = 0  # this file's component (model), for a bar per model
    model_total: int = 0

    def line(self) -> str:
        return (f"{self.component}/{self.file}: {self.done_bytes / MB:.0f}/{self.total_bytes / MB:.0f} MB "
                f"(all: {self.overall_done / GB:.2f}/{self.overall_total / GB:.2f} GB)")


ProgressCallback = Callable[[DownloadProgress], None]


@dataclass
class _Item:
    """One missing file and what the hub said about it."""
    component: str
    file: str  # relative to the component folder
    repo: str
    repo_path: str  # relative to the repository root, as on the hub
    dest: Path
    size: int | None = None  # from the hub, None if it did not say
    estimate: int = 0  # size for the space check and progress totals
    etag: str = ""
    commit: str = ""

    def partial(self) -> Path:
        return self.dest.with_name(f"{self.dest.name}.{self.etag[:16]}.incomplete")


# --------------------------------------------------------------------------------------------------------
# what is missing, in words


@dataclass(frozen=True)
class MissingModel:
    """One model (layout component) with files missing: for a list a person can copy files by hand from."""
    name: str  # layout component name
    repo: str  # the Hugging Face repository the files come from
    folder: Path  # where they go
    files: tuple[str, ...]  # relative to the repository root (shards folded: model-00001..00004-of-00004...)
    approx_bytes: int  # what the missing files weigh, estimated from the real model's size


def missing_models(models_dir: Path) -> list[MissingModel]:
    """Every model with files missing, in layout order; [] when none is."""
    found = []
    for name, paths in layout.missing(Path(models_dir)).items():
        component = layout.COMPONENTS[name]
        folder = component.folder(Path(models_dir))
        prefix = f"{component.subfolder}/" if component.subfolder else ""
        files = _compact([p.relative_to(folder).as_posix() for p in paths])
        found.append(MissingModel(name, component.repo, folder, tuple(prefix + f for f in files),
                                  component.approx_bytes * len(paths) // len(component.files)))
    return found


def describe_missing(models_dir: Path, names: tuple[str, ...] | None = None) -> str:
    """One line naming every missing file, its repository and the folder it goes in; "" when none is missing."""
    lacking = layout.missing(Path(models_dir), names)
    if not lacking:
        return ""
    parts = []
    for name, paths in lacking.items():
        component = layout.COMPONENTS[name]
        folder = component.folder(Path(models_dir))
        prefix = f"{component.subfolder}/" if component.subfolder else ""
        files = _compact([p.relative_to(folder).as_posix() for p in paths])
        parts.append(f"{name} ({component.repo}: {', '.join(prefix + f for f in files)}) -> put them in {folder}")
    return f"missing model files: {'; '.join(parts)}; or run `{DOWNLOAD_COMMAND}`"


def _compact(files: list[str]) -> list[str]:
    """Folds a run of shards into one entry: model-00001..00004-of-00004.safetensors (keeps the order)."""
    out: list[str] = []
    run: list[tuple[str, int, str]] = []  # (stem, index, tail) of consecutive shards of one series

    def flush() -> None:
        if len(run) == 1:
            stem, i, tail = run[0]
            out.append(f"{stem}-{i:05d}{tail}")
        elif run:
            stem, tail = run[0][0], run[0][2]
            out.append(f"{stem}-{run[0][1]:05d}..{run[-1][1]:05d}{tail}")
        run.clear()

    for f in files:
        shard = _split_shard(f)
        if shard is None:
            flush()
            out.append(f)
        elif run and (shard[0], shard[2]) == (run[-1][0], run[-1][2]) and shard[1] == run[-1][1] + 1:
            run.append(shard)
        else:
            flush()
            run.append(shard)
    flush()
    return out


def _split_shard(name: str) -> tuple[str, int, str] | None:
    """'model-00002-of-00004.safetensors' -> ('model', 2, '-of-00004.safetensors'); None if not a shard."""
    head, sep, rest = name.rpartition("-of-")
    stem, dash, index = head.rpartition("-")
    if not (sep and dash and index.isdigit() and len(index) == 5):
        return None
    return stem, int(index), f"-of-{rest}"


# --------------------------------------------------------------------------------------------------------
# fetching


def ensure_models(
    models_dir: Path,
    names: tuple[str, ...] | None = None,
    *,
    allow_download: bool = True,
    progress: ProgressCallback | None = None,
    endpoint: str | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """Make sure every file of the named components (all by default) is under `models_dir`, fetching what lacks.

    Touches the network only when a file is missing. Raises ModelFilesError (one line) when files are missing
    and cannot be fetched: downloads off, offline, hub error, or not enough disk space. An exception raised by
    `progress` (e.g. Cancelled) stops the download and propagates; partial files are kept and the next call
    resumes them. Setting `cancel` does the same from another thread: checked before each file and after each
    chunk, it raises Cancelled.
    """
    models_dir = Path(models_dir)
    if not layout.missing(models_dir, names):
        return
    if not allow_download:
        raise ModelFilesError(f"{describe_missing(models_dir, names)} (downloads are turned off)")
    if _offline_mode():
        raise ModelFilesError(f"{describe_missing(models_dir, names)} (not downloaded: HF_HUB_OFFLINE is set)")

    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT).rstrip("/")
    models_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(models_dir / ".download.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ModelFilesError(f"another download into {models_dir} is running; wait for it to finish") from None
    try:
        items = _plan(models_dir, names)  # re-read under the lock: another run may just have finished
        if not items:
            return
        _ask_hub(items, models_dir, names, endpoint)
        _check_space(items, models_dir)
        _fetch_all(items, models_dir, names, endpoint, progress, cancel)
    finally:
        lock.release()

    still = describe_missing(models_dir, names)
    if still:  # cannot happen unless the layout and the hub disagree; say so rather than fail later
        raise ModelFilesError(f"{still} (download finished but these are still missing)")


def _offline_mode() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; honour a later change of the environment too.
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return hf_constants.is_offline_mode() or value in {"1", "ON", "YES", "TRUE"}


def _plan(models_dir: Path, names: tuple[str, ...] | None) -> list[_Item]:
    items = []
    for name, paths in layout.missing(models_dir, names).items():
        component = layout.COMPONENTS[name]
        folder = component.folder(models_dir)
        for path in paths:
            file = path.relative_to(folder).as_posix()
            repo_path = f"{component.subfolder}/{file}" if component.subfolder else file
            items.append(_Item(name, file, component.repo, repo_path, path,
                               estimate=component.approx_bytes // len(component.files)))
    return items


def _ask_hub(items: list[_Item], models_dir: Path, names: tuple[str, ...] | None, endpoint: str) -> None:
    """HEAD each missing file: its size (for the space check), etag (names the partial file) and commit."""
    headers = _headers()
    for item in items:
        url = hf_hub_url(item.repo, item.repo_path, endpoint=endpoint)
        try:
            meta = get_hf_file_metadata(url, token=False, headers=headers, endpoint=endpoint)
        except _CONNECTION_ERRORS as e:
            raise ModelFilesError(
                f"{describe_missing(models_dir, names)} (not downloaded: cannot reach {endpoint}: {_short(e)})"
            ) from e
        except (HfHubHTTPError, httpx2.HTTPError, httpx2.InvalidURL) as e:
            raise ModelFilesError(
                f"{describe_missing(models_dir, names)} (download failed: {item.repo}/{item.repo_path} "
                f"at {endpoint}: {_short(e)})"
            ) from e
        if not meta.etag or not meta.commit_hash:
            raise ModelFilesError(
                f"{describe_missing(models_dir, names)} (download failed: {endpoint} does not answer like the "
                f"Hugging Face hub for {item.repo}/{item.repo_path}; check HF_ENDPOINT)"
            )
        item.size, item.etag, item.commit = meta.size, meta.etag, meta.commit_hash
        if item.size is not None:
            item.estimate = item.size


def _check_space(items: list[_Item], models_dir: Path) -> None:
    need = sum(max(item.estimate - _size(item.partial()), 0) for item in items)
    free = shutil.disk_usage(models_dir).free
    if free < need:
        raise ModelFilesError(
            f"not enough disk space for the model download: need {_human(need)} free on "
            f"{_volume(models_dir)}, have {_human(free)} (models folder: {models_dir})"
        )


def _fetch_all(items: list[_Item], models_dir: Path, names: tuple[str, ...] | None, endpoint: str,
               progress: ProgressCallback | None, cancel: threading.Event | None = None) -> None:
    done = {id(item): min(_size(item.partial()), item.estimate) for item in items}
    overall_total = sum(item.estimate for item in items)
    model_total = {}
    for item in items:
        model_total[item.component] = model_total.get(item.component, 0) + item.estimate

    sent: dict[int, int] = {}

    def report(item: _Item, file_done: int) -> None:
        _check(cancel)  # per chunk, before http_get writes it: the partial file stays a prefix of the real one
        done[id(item)] = file_done
        if progress is not None and sent.get(id(item)) != file_done:
            sent[id(item)] = file_done
            model_done = sum(done[id(i)] for i in items if i.component == item.component)
            progress(DownloadProgress(item.component, item.file, file_done, item.size or item.estimate,
                                      sum(done.values()), overall_total, model_done, model_total[item.component]))

    headers = _headers()
    headers["Accept-Encoding"] = "identity"  # byte offsets of the file itself, so a Range resume lines up
    for item in items:
        _check(cancel)
        partial = item.partial()
        for stale in partial.parent.glob(f"{item.dest.name}.*.incomplete"):
            if stale != partial:  # left by an older version of the file on the hub
                stale.unlink(missing_ok=True)
        have = _size(partial)
        if item.size is not None and have > item.size:
            partial.unlink()
            have = 0
        log.info("downloading %s/%s (%s) -> %s%s", item.repo, item.repo_path, _human(item.size), item.dest,
                 f", resuming at {_human(have)}" if have else "")
        report(item, have)
        # Pinned to the commit of the HEAD answer: every byte, resumed or not, comes from the same version.
        url = hf_hub_url(item.repo, item.repo_path, revision=item.commit, endpoint=endpoint)
        item.dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(partial, "ab") as f:
                http_get(url, f, resume_size=have, headers=headers, expected_size=item.size,
                         displayed_filename=item.repo_path, tqdm_class=_byte_counter(lambda n, i=item: report(i, n)))
        except (HfHubHTTPError, httpx2.HTTPError, OSError) as e:  # network drop, HTTP error, disk full
            raise ModelFilesError(
                f"{describe_missing(models_dir, names)} (download of {item.repo}/{item.repo_path} failed: "
                f"{_short(e)}; run it again to resume)"
            ) from e
        got = _size(partial)
        if item.size is not None and got != item.size:
            partial.unlink(missing_ok=True)
            raise ModelFilesError(
                f"download of {item.repo}/{item.repo_path} came out at {got} bytes instead of {item.size}; "
                f"the partial file was removed, run it again"
            )
        os.replace(partial, item.dest)
        report(item, got)


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled()


# httpx2 raises these when there is no network; huggingface_hub raises OfflineModeIsEnabled (HF_HUB_OFFLINE).
_CONNECTION_ERRORS = (httpx2.ConnectError, httpx2.TimeoutException, httpx2.ProxyError, httpx2.NetworkError,
                      httpx2.RemoteProtocolError, OfflineModeIsEnabled)


def _byte_counter(on_done: Callable[[int], None]) -> type[tqdm]:
    """A silent tqdm for `http_get(tqdm_class=...)` that reports the file's byte count after each chunk."""

    class _ByteCounter(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True  # no bar on the console: the caller shows progress its own way
            super().__init__(*args, **kwargs)
            # http_get passes initial=<bytes already in the file>, and 0 when the server ignored the Range.
            self._bytes = int(kwargs.get("initial") or 0)
            on_done(self._bytes)

        def update(self, n: float | None = 1) -> bool | None:  # n < 0 when http_get rewinds the file
            self._bytes += int(n or 0)
            on_done(self._bytes)
            return super().update(n)

    return _ByteCounter


def _headers() -> dict[str, str]:
    return build_hf_headers(token=False, library_name="framepack_ui", library_version=__version__)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _volume(path: Path) -> str:
    """The drive (Windows) or mount point that holds `path`, for the disk space message."""
    path = Path(path).resolve()
    if path.drive:
        return path.anchor
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)


def _short(error: BaseException) -> str:
    response = getattr(error, "response", None) if isinstance(error, HfHubHTTPError) else None
    if response is not None:  # the hub's own message is several lines long; the status says enough
        return f"HTTP {response.status_code} {response.reason_phrase}".strip()
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _human(size: int | None) -> str:
    if size is None:
        return "size unknown"
    if size >= GB:
        return f"{size / GB:.2f} GB"
    return f"{size / 1e6:.1f} MB" if size >= 1_000_000 else f"{size / 1e3:.0f} kB"
