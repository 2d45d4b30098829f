"""What the web app needs when it serves a LAN (`--listen`): a cap on uploads and a back-off on failed logins.

Gradio checks an upload's size while it streams it in (`launch(max_file_size=...)`), so a refused upload never
fills the disk; it has no limit on password guesses, hence the ASGI middleware here. Both are given to
`launch()` by app.py (`upload_limit_bytes`, `login_backoff_middleware`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from ..units import MB

log = logging.getLogger(__name__)

# A start image is a few MB and a settings file a few KB; the biggest upload is a video to extend (two minutes
# of 1080p from a phone is about 300 MB). Uploads stream into Gradio's cache folder: 500 MB bounds what a page,
# or anyone on the LAN, can write there in one request.
DEFAULT_MAX_UPLOAD_MB = 500
LOGIN_FAILURES = 5  # failed logins from one address within LOGIN_WINDOW_S...
LOGIN_WINDOW_S = 60.0
LOGIN_WAIT_S = 5.0  # ...make each further attempt from it wait this long (one at a time per address)


def upload_limit_bytes(max_upload_mb: float) -> int:
    """launch()'s max_file_size for a limit in MB (whole bytes)."""
    return int(max_upload_mb * MB)


@dataclass
class _Address:
    """One client address: when its recent logins failed, and a lock so its attempts run one at a time."""
    failures: deque
    lock: asyncio.Lock


class LoginBackoff:
    """ASGI middleware around Gradio's POST /login: after `failures` failed logins from one address within
    `window_s`, each further attempt from that address waits `wait_s` before it is checked. Attempts from one
    address are taken one at a time, so parallel guesses queue behind each other's wait instead of sharing it. A
    successful login clears its address's count. Addresses are the client's as the server sees it (behind a
    reverse proxy everyone shares the proxy's)."""

    def __init__(self, app, failures: int = LOGIN_FAILURES, window_s: float = LOGIN_WINDOW_S,
                 wait_s: float = LOGIN_WAIT_S, clock=time.monotonic):
        self.app = app
        self.failures, self.window_s, self.wait_s, self.clock = failures, window_s, wait_s, clock
        self._addresses: dict[str, _Address] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not _is_login(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        host = (scope.get("client") or ("unknown",))[0]
        address = self._address(host)
        async with address.lock:
            if self._recent_failures(address) >= self.failures:
                log.warning("login from %s: %d failed attempts within %.0f s, waiting %.0f s", host,
                            len(address.failures), self.window_s, self.wait_s)
                await asyncio.sleep(self.wait_s)
            statuses = []

            async def watched_send(message):
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])
                await send(message)

            try:
                await self.app(scope, receive, watched_send)
            finally:
                self._record(host, address, statuses[0] if statuses else None)

    def _address(self, host: str) -> _Address:
        address = self._addresses.get(host)
        if address is None:
            address = self._addresses[host] = _Address(deque(), asyncio.Lock())
        return address

    def _recent_failures(self, address: _Address) -> int:
        cutoff = self.clock() - self.window_s
        while address.failures and address.failures[0] < cutoff:
            address.failures.popleft()
        return len(address.failures)

    def _record(self, host: str, address: _Address, status: int | None) -> None:
        if status is not None and 200 <= status < 400:  # logged in (or redirected when there is no password)
            address.failures.clear()
        else:  # Gradio answers a wrong user name or password with 400
            address.failures.append(self.clock())
        # forget addresses with nothing recent, so a long-running app's table stays small
        for other, entry in list(self._addresses.items()):
            if other != host and not entry.lock.locked() and not self._recent_failures(entry):
                del self._addresses[other]


def _is_login(path: str) -> bool:
    return path.rstrip("/").endswith("/login") or path.rstrip("/") == "/login"
