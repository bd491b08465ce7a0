"""What other processes changed, told to this API process at once: PostgreSQL LISTEN/NOTIFY.

Triggers (migration 0007_shared_limits) send, at commit, the name whose versions or aliases
changed (channel `cnn_registry`) and the id of a revoked key (`cnn_keys`), whichever process
or tool made the change. `Notices` keeps one connection per API process listening on both,
on a thread of its own, and runs the callbacks on the app's event loop. Whenever it
(re)connects it runs the `on_gap` callbacks: notifications sent while it was not listening
are lost, so the subscribers then treat everything as changed.

SQLite sends nothing: there `start` does nothing, and the API processes of one SQLite file
rely on their polls (REGISTRY_POLL_S for the registry, AUTH_CACHE_S for keys).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

REGISTRY_CHANNEL = "cnn_registry"
KEYS_CHANNEL = "cnn_keys"
# How long a wait for notifications lasts before the stop flag is looked at again.
WAKE_S = 0.2
MAX_BACKOFF_S = 10.0


class Notices:
    """The listener of one API process; subscribe before `start`."""

    def __init__(self, database_url: str) -> None:
        url = make_url(database_url)
        self.supported = url.get_backend_name() == "postgresql"
        self._conninfo = (
            url.set(drivername="postgresql").render_as_string(hide_password=False)
            if self.supported
            else ""
        )
        self._handlers: dict[str, list[Callable[[str], Any]]] = {
            REGISTRY_CHANNEL: [],
            KEYS_CHANNEL: [],
        }
        self._on_gap: list[Callable[[], Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = threading.Event()  # connected and LISTENing now

    def on_registry(self, callback: Callable[[str], Any]) -> None:
        """callback(name): a version or alias of `name` changed."""
        self._handlers[REGISTRY_CHANNEL].append(callback)

    def on_key_revoked(self, callback: Callable[[int], Any]) -> None:
        """callback(key_id): that key was revoked."""
        self._handlers[KEYS_CHANNEL].append(lambda payload: callback(int(payload)))

    def on_gap(self, callback: Callable[[], Any]) -> None:
        """callback(): the listener (re)connected; changes may have been missed."""
        self._on_gap.append(callback)

    def start(self) -> None:
        """Listen from now on (call on the event loop that is to run the callbacks)."""
        if not self.supported or self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="notices", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=WAKE_S * 4)
            self._thread = None

    def _run(self) -> None:
        import psycopg

        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {REGISTRY_CHANNEL}")
                    conn.execute(f"LISTEN {KEYS_CHANNEL}")
                    self.listening.set()
                    for callback in self._on_gap:
                        self._call(callback)
                    backoff = 0.5
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=WAKE_S):
                            for handler in self._handlers.get(note.channel, ()):
                                self._call(handler, note.payload)
            except Exception as exc:
                self.listening.clear()
                if self._stop.is_set():
                    break
                log.warning(
                    "registry and key notices interrupted (%s); again in %.1f s", exc, backoff
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        self.listening.clear()

    def _call(self, callback: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(_guarded, callback, *args)
        except RuntimeError:  # the loop closed meanwhile (shutdown)
            pass


def _guarded(callback: Callable[..., Any], *args: Any) -> None:
    try:
        callback(*args)
    except Exception:
        log.exception("a notice handler failed")
