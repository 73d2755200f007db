"""A heartbeat watchdog, so that a rank that dies or freezes ends the whole job instead of hanging it.

A collective blocked on a dead peer cannot be interrupted from Python: gloo waits for its timeout and
NCCL may wait forever. So a daemon thread on every rank bumps a counter in the rendezvous store every
``interval_s`` and watches the counters of its peers; when one stops advancing for ``dead_after_s`` (and
its rank has not marked itself done), the watcher writes a one-line *verdict* into the store, prints
``engram: error: <verdict>; ending rank Q`` and ends its own process with ``os._exit(1)``. Every other
rank reads the verdict on its next tick and ends the same way, naming the same culprit.

Rank 0 watches every rank and every other rank watches rank 0 and the verdict: the store then serves
O(world) reads per tick instead of O(world^2), and a verdict still reaches everyone within one tick.
The store is probed with a plain TCP connect first, because the c10d client prints a multi-line C++
warning when its server has gone; a refused connect names the host of the store instead.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable

__all__ = ["Watchdog", "collective_error_summary", "is_peer_loss"]

# Texts of the errors gloo and NCCL raise from a collective when a peer's connection is gone or the
# collective ran past the process-group timeout (the second line of defence behind the heartbeats).
_PEER_LOST = re.compile(r"(?:Connection closed by peer|Read error|Write error) \[[^\]]*\]:\d+(?::[^.]*)?"
                        r"|Connection reset by peer|Broken pipe|Connection refused|ncclRemoteError"
                        r"|remote process exited|NCCL communicator was aborted[^.]*")
_TIMED_OUT = re.compile(r"Timed out waiting \d+ms[^.]*|Watchdog caught collective operation timeout[^.]*")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_peer_loss(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a collective failing on a lost or stuck peer."""
    return collective_error_summary(exc) is not None


def collective_error_summary(exc: BaseException) -> str | None:
    """One line for a collective that failed because a peer went away (or timed out), None for other errors.

    Keeps the part of the backend's text that says what happened to which address (gloo names the peer's
    address, never its rank), without the source location and the advice that follow it.
    """
    for e in _chain(exc):
        if not isinstance(e, RuntimeError):
            continue
        text = str(e)
        if m := _PEER_LOST.search(text):
            return f"a collective failed because a peer closed its connection ({m.group(0).strip()})"
        if m := _TIMED_OUT.search(text):
            return (f"a collective ran past the process-group timeout ({m.group(0).strip()}): a peer is stuck or "
                    "the ranks disagree on the sequence of collectives")
    return None


def _stderr_line(line: str) -> None:
    """Write one line straight to file descriptor 2: the process may end the next instant."""
    try:
        os.write(2, (line + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


class Watchdog:
    """Heartbeats of one rank in ``store`` and the watch over its peers (see the module docstring).

    Args:
        store: a c10d store shared by all ranks (a prefixed client of the rendezvous store).
        rank, world: this rank and the number of ranks.
        dead_after_s: a peer whose heartbeat has not advanced for this long is judged dead.
        store_host: the rank whose process hosts the store (0 for a plain ``env://`` launch), or None when
            something else does (torchrun's agent); it names the culprit when the store stops answering,
            and a store-hosting rank waits for the others before it leaves.
        store_addr: ``(host, port)`` of the store, probed with a TCP connect (None: never probed).
        interval_s: seconds between heartbeats (default: ``min(1, dead_after_s / 5)``).
        clock, sleep, exit: injectable for tests (``time.monotonic``, ``time.sleep`` and ``os._exit``).
    """

    def __init__(self, store, rank: int, world: int, *, dead_after_s: float, store_host: int | None = 0,
                 store_addr: tuple[str, int] | None = None, interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 exit: Callable[[int], None] = os._exit) -> None:
        self.store, self.rank, self.world = store, rank, world
        self.dead_after_s = float(dead_after_s)
        self.interval_s = float(interval_s) if interval_s is not None else max(0.05, min(1.0, dead_after_s / 5))
        self.store_host, self.store_addr = store_host, store_addr
        self._clock, self._sleep, self._exit = clock, sleep, exit
        self.watched = [p for p in range(world) if p != rank] if rank == 0 else [0]
        self._last: dict[int, int] = {}
        self._seen_at: dict[int, float] = {}
        self._prev_tick: float | None = None
        self._stop = threading.Event()
        self._ending = threading.Lock()
        self._thread: threading.Thread | None = None
        self._store_lost = False
        self.verdict: str | None = None  # what ended this rank (kept for tests that inject `exit`)

    # --- store keys -----------------------------------------------------------------------------------
    @staticmethod
    def _hb(rank: int) -> str:
        return f"hb/{rank}"

    @staticmethod
    def _done(rank: int) -> str:
        return f"done/{rank}"

    # --- the loop -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"engram-watchdog-{self.rank}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # a bug here must not end a healthy job: say so once and stop watching
                _stderr_line(f"[rank {self.rank}] engram: warning: the distributed watchdog stopped: {e!r}")
                return
            self._stop.wait(self.interval_s)

    def tick(self) -> None:
        """One heartbeat and one look at the watched ranks and the verdict; ends the process on a verdict."""
        if not self._store_reachable():
            return self.end(self._store_gone(), publish=False)
        try:
            self.store.add(self._hb(self.rank), 1)
            if self.store.check(["verdict"]):
                return self.end(self.store.get("verdict").decode(), publish=False)
            now = self._clock()
            if self._prev_tick is not None and now - self._prev_tick > self.dead_after_s / 2:
                self._seen_at.clear()  # this thread itself was stalled: it cannot judge anyone's silence
            self._prev_tick = now
            dead = []
            for p in self.watched:
                count = int(self.store.add(self._hb(p), 0))
                if p not in self._seen_at or count != self._last.get(p):
                    self._last[p], self._seen_at[p] = count, now
                elif now - self._seen_at[p] > self.dead_after_s and not self._is_done(p):
                    dead.append((p, now - self._seen_at[p]))
        except RuntimeError:  # the c10d store's errors (DistNetworkError, DistStoreError) are RuntimeErrors
            return self.end(self._store_gone(), publish=False)
        if dead:
            self.end(_stopped(dead))

    def _is_done(self, rank: int) -> bool:
        return int(self.store.add(self._done(rank), 0)) > 0

    # --- the store's own health -----------------------------------------------------------------------
    def _store_reachable(self) -> bool:
        if self.store_addr is None or self.rank == self.store_host:
            return True
        try:
            socket.create_connection(self.store_addr, timeout=max(1.0, self.interval_s)).close()
            return True
        except OSError:
            return False

    def _store_gone(self) -> str:
        self._store_lost = True  # no more requests to it: each failed one prints a C++ warning
        if self.store_host is not None:
            return f"rank {self.store_host} (which hosts the rendezvous store) is gone"
        where = f" at {self.store_addr[0]}:{self.store_addr[1]}" if self.store_addr else ""
        return f"the rendezvous store{where} (hosted by the launcher's agent) is gone"

    # --- ending ---------------------------------------------------------------------------------------
    def end(self, reason: str, *, publish: bool = True) -> None:
        """End this rank for ``reason``: publish it as the verdict (the first one written stands), print the
        verdict that stands, exit 1."""
        if not self._ending.acquire(blocking=False):
            self._ending.acquire(timeout=10.0)  # another thread is ending this rank: let it print and exit
            return
        reason = self.publish(reason) if publish else self._acknowledge(reason)
        self.verdict = reason
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        _stderr_line(f"engram: error: {reason}; ending rank {self.rank}")
        self._stop.set()
        self._exit(1)

    def publish(self, reason: str) -> str:
        """Write ``reason`` as the job's verdict unless one exists; returns the verdict that stands."""
        if self._store_lost or not self._store_reachable():
            return reason
        try:
            reason = self.store.compare_set("verdict", "", reason).decode()
        except RuntimeError:
            return reason
        return self._acknowledge(reason)

    def _acknowledge(self, reason: str) -> str:
        """Mark this rank as one that knows the verdict; the rank hosting the store then lingers."""
        if self._store_lost:
            return reason
        try:
            self.store.add(f"seen/{self.rank}", 1)
            if self.rank == self.store_host:
                self._linger()
        except RuntimeError:
            pass
        return reason

    def _linger(self) -> None:
        """Wait (a few ticks at most) until every live rank has read the verdict: the exit of the rank that
        hosts the store takes the store, and the verdict, along. A rank whose heartbeat stands still
        through a tick and a half is gone and never will read it."""
        others = [p for p in range(self.world) if p != self.rank]
        start = {p: int(self.store.add(self._hb(p), 0)) for p in others}
        t0 = self._clock()
        while (elapsed := self._clock() - t0) < max(1.0, 3 * self.interval_s):
            waiting = [p for p in others if not int(self.store.add(f"seen/{p}", 0))
                       and (elapsed < 1.5 * self.interval_s or int(self.store.add(self._hb(p), 0)) != start[p])]
            if not waiting:
                return
            self._sleep(self.interval_s / 4)

    # --- after a collective failed --------------------------------------------------------------------
    def diagnose(self, summary: str) -> str:
        """The verdict to report after a collective failed on a lost peer (``summary``: what the backend said).

        The backend names an address, not a rank; the heartbeats name the rank: every peer is watched for
        three ticks and the ones whose counters stand still (and are not done) are the culprits.
        """
        if not self._store_reachable():
            return self._store_gone()
        try:
            if self.store.check(["verdict"]):
                return self.store.get("verdict").decode()
            others = [p for p in range(self.world) if p != self.rank]
            first = {p: int(self.store.add(self._hb(p), 0)) for p in others}
            t0 = self._clock()
            still = set(others)
            while still and self._clock() - t0 < 3 * self.interval_s:
                self._sleep(self.interval_s / 4)
                if self.store.check(["verdict"]):  # another rank named the culprit meanwhile
                    return self.store.get("verdict").decode()
                still = {p for p in still if int(self.store.add(self._hb(p), 0)) == first[p]}
            dead = [(p, self._clock() - t0) for p in sorted(still) if not self._is_done(p)]
        except RuntimeError:
            return self._store_gone()
        return _stopped(dead) if dead else summary

    # --- a clean finish -------------------------------------------------------------------------------
    def finish(self, timeout_s: float) -> None:
        """Mark this rank done so nobody reports it dead, then stop watching.

        The rank that hosts the store keeps watching until every other rank has left it (at most
        ``timeout_s``): ending earlier would take the store away from ranks still finishing.
        """
        try:
            self.store.add(self._done(self.rank), 1)
            if self.rank == self.store_host:
                deadline = self._clock() + timeout_s
                while int(self.store.add("left", 0)) < self.world - 1 and self._clock() < deadline:
                    if self._thread is not None and not self._thread.is_alive():
                        break
                    self._sleep(self.interval_s / 4)
        except RuntimeError:
            pass
        self.stop()
        if self.rank != self.store_host:
            try:
                self.store.add("left", 1)
            except RuntimeError:
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, 4 * self.interval_s))


def _stopped(dead: list[tuple[int, float]]) -> str:
    ranks = ", ".join(str(p) for p, _ in dead)
    silent = min(s for _, s in dead)
    who = f"rank {ranks}" if len(dead) == 1 else f"ranks {ranks}"
    return f"{who} stopped responding (no heartbeat for {silent:.0f} s)"
