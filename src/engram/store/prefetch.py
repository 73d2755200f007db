"""Asynchronous row fetches: gather every Engram layer's rows in worker threads while the model computes.

Row ids depend only on token ids, so they are known before the forward pass starts. :class:`Prefetcher`
takes them per layer (:meth:`Prefetcher.submit`), gathers them from each layer's :class:`RowStore` in a
small pool of threads and hands back one :class:`Pending` per layer; the model resolves a layer's handle
right before that layer runs, so early layers compute while later layers' rows are still being read.
Store reads (``index_select``, numpy copies, page faults on a mapping) release the GIL, so a worker
thread really runs alongside the main thread's compute.

* Order: jobs run first in, first out, and within a submission by ascending layer (the order the model
  needs them). De-duplicating and sorting the ids of one read is the store's job (a disk store reads each
  distinct row once, in file order); the prefetcher passes the ids through unchanged, which keeps the
  stores' ``requested`` / ``unique`` statistics meaningful.
* Errors: an exception raised by a store is re-raised in the caller by :meth:`Pending.result`.
* Memory: at most ``max_pending`` submissions are in flight (queued or being read); :meth:`submit` blocks
  until one completes. Results the caller holds are the caller's.
* Shutdown: :meth:`Prefetcher.close` cancels queued work, fails every unfinished handle with
  ``CancelledError`` and joins the workers with a bounded timeout. A worker stuck in a read that never
  returns is left behind (workers are daemon threads, so it cannot keep the process alive); it never
  makes ``close`` or interpreter exit hang.
* CUDA (``device="cuda"``, when available): rows are gathered into pinned host buffers and copied on a
  side stream; :meth:`Pending.result` makes the current stream wait for that copy.
"""

# Shapes: B batch, T time, H hash heads, d row width, N = B*T*H flat row ids of one layer.

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import CancelledError
from dataclasses import dataclass

import torch

__all__ = ["CancelledError", "Pending", "Prefetcher"]

log = logging.getLogger(__name__)


class Pending:
    """Handle on one layer's rows being fetched; :meth:`result` waits for them.

    Attributes:
        layer: the Engram layer the rows belong to.
        shape: the ``[B, T, H]`` shape of the submitted row ids (the result is ``[*shape, d]``).
    """

    __slots__ = ("layer", "shape", "_done", "_lock", "_value", "_error", "_ready", "_synced")

    def __init__(self, layer: int, shape: tuple[int, ...]) -> None:
        self.layer = layer
        self.shape = shape
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._value: torch.Tensor | None = None
        self._error: BaseException | None = None
        self._ready = None  # a torch.cuda.Event when the rows were copied on a side stream
        self._synced = False

    def done(self) -> bool:
        """True once the rows are available, or the fetch failed or was cancelled."""
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> torch.Tensor:
        """The ``[B, T, H, d]`` rows (store dtype), waiting up to ``timeout`` seconds (None: no limit).

        Re-raises the exception the fetch raised (the original exception, with a note naming the
        layer), ``CancelledError`` if the prefetcher was closed first, and ``TimeoutError`` if the
        rows did not arrive in time.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"rows of Engram layer {self.layer} were not fetched within {timeout} s")
        if self._error is not None:
            raise self._error
        if self._ready is not None and not self._synced:
            stream = torch.cuda.current_stream(self._value.device)
            stream.wait_event(self._ready)
            self._value.record_stream(stream)  # allocated on the side stream, used on this one
            self._synced = True
        return self._value

    def _set(self, value: torch.Tensor | None = None, error: BaseException | None = None, ready=None) -> bool:
        """Complete the handle once; later calls are ignored (a cancelled fetch may still finish)."""
        with self._lock:
            if self._done.is_set():
                return False
            self._value, self._error, self._ready = value, error, ready
            self._done.set()
            return True

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._error is not None else "done")
        return f"Pending(layer={self.layer}, shape={list(self.shape)}, {state})"


class _Submission:
    """Counts a submission's unfinished layer jobs; the submission's slot frees when it reaches 0."""

    __slots__ = ("remaining",)

    def __init__(self, n: int) -> None:
        self.remaining = n


@dataclass
class _Job:
    layer: int
    rows_N: torch.Tensor
    pending: Pending
    submission: _Submission


class Prefetcher:
    """Fetch per-layer rows from row stores in ``workers`` background threads (see the module docstring).

    Args:
        stores: ``{layer: RowStore}``; each store serves flat row ids of its layer's table. The
            prefetcher does not own them (closing it leaves them open).
        workers: number of fetch threads.
        max_pending: most submissions in flight at once; :meth:`submit` blocks beyond that.
        device: where results go: CPU (default) or a CUDA device (pinned buffers + a side stream).
        join_timeout: seconds :meth:`close` waits in total for the workers to exit.

    A context manager: leaving the ``with`` block closes it. Close it (or use ``with``): the idle
    workers otherwise wait for work until the process exits.
    """

    def __init__(self, stores: dict, *, workers: int = 2, max_pending: int = 4,
                 device: str | torch.device | None = None, join_timeout: float = 5.0) -> None:
        if not isinstance(stores, dict) or not stores:
            raise ValueError("stores must be a non-empty dict {layer: RowStore}")
        for layer, store in stores.items():
            if not all(hasattr(store, a) for a in ("gather", "dim", "dtype", "num_rows")):
                raise ValueError(f"stores[{layer!r}] is a {type(store).__name__}, not a RowStore "
                                 f"(needs gather, num_rows, dim, dtype)")
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if int(max_pending) < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if join_timeout < 0:
            raise ValueError(f"join_timeout must be >= 0, got {join_timeout}")
        self.stores = dict(stores)
        self.max_pending = int(max_pending)
        self.join_timeout = float(join_timeout)
        self.device = torch.device("cpu" if device is None else device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} requested but CUDA is not available")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device}")
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None

        self._cv = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._running_jobs: dict[int, _Job] = {}  # jobs being read, to cancel their handles on close
        self._in_flight = 0  # submissions with unfinished jobs
        self._cpu_s = 0.0  # CPU the workers spent in fetches
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"engram-prefetch-{i}", daemon=True)
                         for i in range(int(workers))]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ public API
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_flight(self) -> int:
        """Submissions queued or being read right now."""
        with self._cv:
            return self._in_flight

    @property
    def cpu_seconds(self) -> float:
        """CPU time the workers have spent fetching so far (their threads' CPU clocks, not wall time):
        on a machine whose cores also run the model, this is what the fetches take from it."""
        with self._cv:
            return self._cpu_s

    def submit(self, rows: dict, timeout: float | None = None) -> dict[int, Pending]:
        """Start fetching ``{layer: flat row ids [B, T, H]}``; returns ``{layer: Pending}`` at once.

        Ids are flat ids into each layer's store (int64 or any integer dtype, any shape; the result
        has that shape plus ``d``). Blocks while ``max_pending`` submissions are in flight (up to
        ``timeout`` seconds, then TimeoutError). Do not modify the id tensors until the handles resolve.
        Raises RuntimeError once closed and ValueError for an unknown layer or non-integer ids;
        out-of-range ids are reported by the store, through :meth:`Pending.result`.
        """
        if not isinstance(rows, dict):
            raise ValueError(f"rows must be a dict {{layer: row ids}}, got {type(rows).__name__}")
        unknown = sorted(set(rows) - set(self.stores), key=repr)
        if unknown:
            raise ValueError(f"no store for Engram layer(s) {unknown}; stores hold layers {sorted(self.stores)}")
        jobs_rows = {}
        for layer, r in rows.items():
            if not isinstance(r, torch.Tensor) or r.dtype.is_floating_point or r.dtype.is_complex \
                    or r.dtype == torch.bool:
                what = r.dtype if isinstance(r, torch.Tensor) else type(r).__name__
                raise ValueError(f"rows[{layer}] must be an integer tensor of flat row ids, got {what}")
            jobs_rows[layer] = (tuple(r.shape), r.detach().reshape(-1).to("cpu", torch.int64))
        if not jobs_rows:
            return {}
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while not self._closed and self._in_flight >= self.max_pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"prefetch queue full ({self.max_pending} submissions in flight) "
                                       f"for {timeout} s")
                self._cv.wait(left)
            if self._closed:
                raise RuntimeError("Prefetcher is closed")
            self._in_flight += 1
            sub = _Submission(len(jobs_rows))
            handles = {}
            for layer in sorted(jobs_rows):
                shape, rows_N = jobs_rows[layer]
                handles[layer] = Pending(layer, shape)
                self._queue.append(_Job(layer, rows_N, handles[layer], sub))
            self._cv.notify_all()
        return handles

    def close(self) -> None:
        """Cancel queued and unfinished fetches, stop the workers (bounded wait); idempotent, never hangs."""
        with self._cv:
            first = not self._closed
            self._closed = True
            cancelled = list(self._queue)
            self._queue.clear()
            running = list(self._running_jobs.values())
            self._cv.notify_all()
        for job in cancelled:
            job.pending._set(error=CancelledError(f"prefetch of Engram layer {job.layer} cancelled: "
                                                  f"the prefetcher was closed"))
            self._finish(job)
        for job in running:  # a consumer waiting on a read that is stuck must not wait forever
            job.pending._set(error=CancelledError(f"prefetch of Engram layer {job.layer} cancelled while "
                                                  f"reading: the prefetcher was closed"))
        deadline = time.monotonic() + self.join_timeout
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck and first:
            log.warning("prefetch workers %s still blocked in a store read after %.1f s; left behind "
                        "(daemon threads)", stuck, self.join_timeout)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ workers
    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return  # close() has taken whatever was queued
                job = self._queue.popleft()
                self._running_jobs[id(job)] = job
            c0 = time.thread_time()
            try:
                value, ready = self._fetch(job)
                job.pending._set(value=value, ready=ready)
            except BaseException as e:  # surfaced in the caller by Pending.result()
                e.add_note(f"(raised while prefetching the rows of Engram layer {job.layer})")
                job.pending._set(error=e)
            finally:
                with self._cv:
                    self._running_jobs.pop(id(job), None)
                    self._cpu_s += time.thread_time() - c0
                self._finish(job)

    def _finish(self, job: _Job) -> None:
        with self._cv:
            job.submission.remaining -= 1
            if job.submission.remaining == 0:
                self._in_flight -= 1
                self._cv.notify_all()

    def _fetch(self, job: _Job):
        store = self.stores[job.layer]
        n, d = job.rows_N.numel(), store.dim
        if not self._cuda:
            out_Nd = store.gather(job.rows_N)
            return out_Nd.view(*job.pending.shape, d), None
        # Pinned host buffer (the caching host allocator recycles it) -> async copy on the side stream.
        host_Nd = torch.empty((n, d), dtype=store.dtype, pin_memory=True)
        store.gather(job.rows_N, out_Nd=host_Nd)
        with torch.cuda.stream(self._stream):
            dev_Nd = host_Nd.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return dev_Nd.view(*job.pending.shape, d), ready

    def __repr__(self) -> str:
        return (f"Prefetcher(layers={sorted(self.stores)}, workers={len(self._threads)}, "
                f"max_pending={self.max_pending}, device={self.device}, closed={self._closed})")
