"""Prefetcher: bit-identical rows, errors surfacing in the caller, bounded in-flight work, shutdown that never hangs."""

# Shapes: B batch, T time, H hash heads, d row width, R table rows, N flat row ids.

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.store.base import RamStore
from engram.store.prefetch import CancelledError, Pending, Prefetcher


class GatedStore:
    """A RowStore-like table whose gathers wait for `gate` (and count how many are waiting)."""

    def __init__(self, table_Rd: torch.Tensor, gate: threading.Event | None = None, fail: Exception | None = None):
        self.table, self.gate, self.fail = table_Rd, gate, fail
        self.entered = threading.Semaphore(0)
        self.calls = self.finished = 0

    num_rows = property(lambda self: self.table.shape[0])
    dim = property(lambda self: self.table.shape[1])
    dtype = property(lambda self: self.table.dtype)

    def gather(self, rows_N, out_Nd=None):
        self.calls += 1
        self.entered.release()
        if self.gate is not None:
            self.gate.wait()
        self.finished += 1
        if self.fail is not None:
            raise self.fail
        rows = self.table[rows_N]
        if out_Nd is None:
            return rows
        return out_Nd.copy_(rows)

    def stats(self):
        return {"fake": {}}

    def reset_stats(self):
        pass

    def close(self):
        pass


def signal_when_blocked(pf: Prefetcher, thread_name: str) -> threading.Event:
    """An Event set once the thread called `thread_name` waits on the prefetcher's condition (a full queue).

    The thread holds the condition's lock until it waits, so a caller that sees the Event set and then
    takes the lock (close(), a completing read) knows that the thread is blocked in submit()."""
    blocked, wait = threading.Event(), pf._cv.wait

    def watched_wait(timeout=None):
        if threading.current_thread().name == thread_name:
            blocked.set()
        return wait(timeout)

    pf._cv.wait = watched_wait
    return blocked


def table(R=50, d=4, dtype=torch.float32, seed=0):
    return torch.randn(R, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def rows_for(R, shape, seed=1):
    return torch.randint(0, R, shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 7), H=st.integers(1, 4), seed=st.integers(0, 2**16),
       bf16=st.booleans(), workers=st.integers(1, 3))
def test_results_equal_in_ram_gather(B, T, H, seed, bf16, workers):
    dtype = torch.bfloat16 if bf16 else torch.float32
    tables = {0: table(37, 4, dtype, seed), 3: table(61, 4, dtype, seed + 1)}
    rows = {lay: rows_for(t.shape[0], (B, T, H), seed + lay) for lay, t in tables.items()}
    with Prefetcher({lay: RamStore(t) for lay, t in tables.items()}, workers=workers, max_pending=2) as pf:
        handles = [pf.submit(rows) for _ in range(3)]
        for h in handles:
            for lay, p in h.items():
                got = p.result(timeout=10)
                assert got.shape == (B, T, H, 4) and got.dtype == dtype
                assert torch.equal(got.view(torch.int16 if bf16 else torch.int32),
                                   tables[lay][rows[lay]].view(torch.int16 if bf16 else torch.int32))
                assert p.result() is got  # resolving twice gives the same tensor


def test_store_exception_surfaces_in_caller_and_other_layers_still_work():
    good = RamStore(table())
    bad = GatedStore(table(), fail=OSError(5, "simulated read error"))
    with Prefetcher({1: good, 2: bad}, workers=2) as pf:
        h = pf.submit({1: rows_for(50, (2, 3, 2)), 2: rows_for(50, (2, 3, 2))})
        assert torch.equal(h[1].result(timeout=10), table()[rows_for(50, (2, 3, 2))])
        with pytest.raises(OSError, match="simulated read error") as ei:
            h[2].result(timeout=10)
        assert any("layer 2" in n for n in getattr(ei.value, "__notes__", []))
        # The prefetcher survives a failed fetch.
        h2 = pf.submit({1: rows_for(50, (1, 2, 2), seed=3)})
        assert h2[1].result(timeout=10).shape == (1, 2, 2, 4)


def test_out_of_range_ids_are_reported_through_result():
    with Prefetcher({0: RamStore(table(10))}) as pf:
        h = pf.submit({0: torch.tensor([[[3, 10]]])})
        with pytest.raises(ValueError, match="out of range"):
            h[0].result(timeout=10)


def test_bad_submissions_raise_at_once():
    with Prefetcher({0: RamStore(table())}) as pf:
        with pytest.raises(ValueError, match="no store for Engram layer"):
            pf.submit({5: torch.zeros(1, 1, 1, dtype=torch.int64)})
        with pytest.raises(ValueError, match="integer tensor"):
            pf.submit({0: torch.zeros(1, 1, 1)})
        with pytest.raises(ValueError, match="dict"):
            pf.submit([torch.zeros(1, dtype=torch.int64)])
        assert pf.submit({}) == {}
    with pytest.raises(ValueError, match="workers"):
        Prefetcher({0: RamStore(table())}, workers=0)
    with pytest.raises(ValueError, match="max_pending"):
        Prefetcher({0: RamStore(table())}, max_pending=0)
    with pytest.raises(ValueError, match="RowStore"):
        Prefetcher({0: object()})
    with pytest.raises(ValueError, match="non-empty"):
        Prefetcher({})


@pytest.mark.timeout(30)
def test_each_layer_waits_only_for_its_own_rows():
    """Layer 0's rows are ready while layer 2's read is still blocked: the model can run layer 0."""
    gate = threading.Event()
    slow = GatedStore(table(seed=2), gate)
    try:
        with Prefetcher({0: RamStore(table()), 2: slow}, workers=2) as pf:
            h = pf.submit({0: rows_for(50, (1, 4, 2)), 2: rows_for(50, (1, 4, 2))})
            assert h[0].result(timeout=10).shape == (1, 4, 2, 4)
            assert slow.entered.acquire(timeout=10)  # layer 2's read has started and is blocked
            assert not h[2].done()
            with pytest.raises(TimeoutError, match="layer 2"):
                h[2].result(timeout=0.05)
            gate.set()
            assert torch.equal(h[2].result(timeout=10), table(seed=2)[rows_for(50, (1, 4, 2))])
    finally:
        gate.set()


@pytest.mark.timeout(30)
def test_workers_fetch_in_parallel():
    """Two workers read two layers at the same time (each read waits for the other to start)."""
    barrier = threading.Barrier(2, timeout=10)

    class BarrierStore(GatedStore):
        def gather(self, rows_N, out_Nd=None):
            barrier.wait()
            return super().gather(rows_N, out_Nd)

    with Prefetcher({0: BarrierStore(table()), 1: BarrierStore(table())}, workers=2) as pf:
        h = pf.submit({0: rows_for(50, (1, 2, 2)), 1: rows_for(50, (1, 2, 2))})
        h[0].result(timeout=10)
        h[1].result(timeout=10)


@pytest.mark.timeout(30)
def test_at_most_max_pending_submissions_in_flight():
    gate = threading.Event()
    slow = GatedStore(table(), gate)
    try:
        with Prefetcher({0: slow}, workers=1, max_pending=2) as pf:
            first = [pf.submit({0: rows_for(50, (1, 1, 2), seed=s)}) for s in range(2)]
            assert pf.in_flight == 2
            with pytest.raises(TimeoutError, match="in flight"):
                pf.submit({0: rows_for(50, (1, 1, 2))}, timeout=0.1)
            blocked = signal_when_blocked(pf, "submitter")
            box = {}

            def blocked_submit():
                box["h"] = pf.submit({0: rows_for(50, (1, 1, 2), seed=7)})
                box["reads_done_before"] = slow.finished

            t = threading.Thread(target=blocked_submit, name="submitter", daemon=True)
            t.start()
            assert blocked.wait(10)  # the third submit waits: the queue is full
            assert pf.in_flight == 2 and "h" not in box
            gate.set()  # reads complete, slots free up
            t.join(10)
            assert not t.is_alive()
            assert box["reads_done_before"] >= 1  # it returned only once a read had completed
            for h in [*first, box["h"]]:
                assert h[0].result(timeout=10).shape == (1, 1, 2, 4)
            assert pf.in_flight == 0
    finally:
        gate.set()


@pytest.mark.timeout(30)
def test_close_while_a_read_is_blocked_never_hangs():
    gate = threading.Event()  # never set before close(): the read stays blocked
    slow = GatedStore(table(), gate)
    try:
        pf = Prefetcher({0: slow}, workers=1, max_pending=3, join_timeout=0.1)
        running = pf.submit({0: rows_for(50, (1, 2, 2))})
        queued = pf.submit({0: rows_for(50, (1, 2, 2), seed=4)})
        assert slow.entered.acquire(timeout=10)
        pf.close()  # returns although the read is still blocked: its worker is left behind
        assert pf._threads[0].is_alive() and slow.finished == 0
        for h in (running, queued):
            with pytest.raises(CancelledError):
                h[0].result(timeout=1)
        with pytest.raises(RuntimeError, match="closed"):
            pf.submit({0: rows_for(50, (1, 1, 2))})
        pf.close()  # idempotent
    finally:
        gate.set()  # let the left-behind worker finish; its late result is ignored
    assert isinstance(running[0], Pending) and running[0].done()


@pytest.mark.timeout(30)
def test_close_releases_a_submitter_blocked_on_a_full_queue():
    gate = threading.Event()
    slow = GatedStore(table(), gate)
    try:
        pf = Prefetcher({0: slow}, workers=1, max_pending=1, join_timeout=0.1)
        pf.submit({0: rows_for(50, (1, 1, 2))})
        blocked = signal_when_blocked(pf, "submitter")
        box = {}

        def blocked_submit():
            try:
                pf.submit({0: rows_for(50, (1, 1, 2))})
            except RuntimeError as e:
                box["error"] = e

        t = threading.Thread(target=blocked_submit, name="submitter", daemon=True)
        t.start()
        assert blocked.wait(10)  # the submitter waits for a free slot
        pf.close()
        t.join(5)
        assert not t.is_alive() and "closed" in str(box["error"])
    finally:
        gate.set()


@pytest.mark.timeout(30)
def test_idle_close_joins_workers():
    """Idle workers wake up and exit on close(): none is left behind, however long close() may wait."""
    pf = Prefetcher({0: RamStore(table())}, workers=3, join_timeout=600)
    threads = list(pf._threads)
    pf.close()
    assert not any(t.is_alive() for t in threads)


@pytest.mark.timeout(30)
def test_reads_overlap_with_the_callers_work():
    """A read that releases the GIL runs while the caller works: here the read starts on its own and
    completes only when the caller's work (e.g. the blocks before the Engram layer) lets it."""
    gate = threading.Event()
    store = GatedStore(table(), gate)
    try:
        with Prefetcher({0: store}) as pf:
            h = pf.submit({0: rows_for(50, (1, 3, 2))})
            assert store.entered.acquire(timeout=10)  # the read is under way while the caller runs on
            assert not h[0].done()
            gate.set()  # the caller's work is done
            assert torch.equal(h[0].result(timeout=10), table()[rows_for(50, (1, 3, 2))])
    finally:
        gate.set()


def test_cpu_seconds_counts_the_workers_cpu_not_their_waiting():
    """A fetch that computes for 0.1 s of CPU adds about that much; one that waits while the caller computes
    0.2 s of CPU (so at least 0.2 s of wall time pass) adds almost none."""

    def spin(cpu_s):  # burn this thread's CPU clock, which only runs while the thread computes
        t0 = time.thread_time()
        while time.thread_time() - t0 < cpu_s:
            pass

    class BusyStore(GatedStore):
        def gather(self, rows_N, out_Nd=None):
            spin(0.1)
            return super().gather(rows_N, out_Nd)

    gate = threading.Event()
    waiting = GatedStore(table(), gate)
    try:
        with Prefetcher({0: BusyStore(table()), 1: waiting}, workers=1) as pf:
            assert pf.cpu_seconds == 0.0
            pf.submit({0: rows_for(50, (2, 3))})[0].result(timeout=10)
            busy = pf.cpu_seconds
            assert 0.1 <= busy < 0.5
            h = pf.submit({1: rows_for(50, (2, 3))})
            assert waiting.entered.acquire(timeout=10)
            spin(0.2)  # the worker waits all along
            gate.set()
            h[1].result(timeout=10)
            assert busy <= pf.cpu_seconds < busy + 0.05
    finally:
        gate.set()
