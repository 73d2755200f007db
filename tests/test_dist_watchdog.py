"""The heartbeat watchdog's judgement, the reading of backend errors, and rank-tagged output, in one process.

Several `Watchdog`s share an in-memory c10d store and a fake clock, and the test drives their ticks: who
is judged dead, when, and what every rank prints, without processes or wall-clock waits.
"""

import io
import re
import sys

import pytest
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from engram.distributed.output import RankPrefixed, rank_zero_output
from engram.distributed.watchdog import Watchdog, collective_error_summary, is_peer_loss


class FakeTime:
    """A clock that only moves when told (or slept on); ``on_sleep`` runs on every sleep (the peers' beats)."""

    def __init__(self):
        self.t, self.on_sleep = 0.0, None

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt
        if self.on_sleep:
            self.on_sleep()


def make_dogs(world, dead_after=5.0, interval=1.0):
    store, clock, ended = dist.HashStore(), FakeTime(), {}
    dogs = [Watchdog(store, r, world, dead_after_s=dead_after, store_host=0, interval_s=interval, clock=clock,
                     sleep=clock.sleep, exit=lambda code, r=r: ended.setdefault(r, (code, clock.t)))
            for r in range(world)]
    return dogs, clock, ended


def run(dogs, clock, seconds, live, step=1.0):
    """Tick the ``live`` ranks once per ``step`` for ``seconds``; stop at the first rank that ends."""
    end = clock.t + seconds
    while clock.t < end:
        for d in dogs:
            if d.rank in live and d.verdict is None:
                d.tick()
        clock.t += step


@given(world=st.integers(2, 5), victim=st.integers(0, 4), dead_after=st.sampled_from([2.0, 5.0, 30.0]),
       stop_at=st.integers(0, 20))
def test_a_silent_rank_is_judged_dead_after_dead_after_s_and_every_live_rank_names_it(world, victim, dead_after,
                                                                                      stop_at):
    victim %= world
    dogs, clock, ended = make_dogs(world, dead_after)
    run(dogs, clock, stop_at, live=set(range(world)))
    assert not ended  # all beating: nobody judged
    t_stop = clock.t
    run(dogs, clock, dead_after, live=set(range(world)) - {victim})
    assert not ended, "judged before dead_after_s of silence"
    run(dogs, clock, dead_after + 3, live=set(range(world)) - {victim})
    live = set(range(world)) - {victim}
    assert set(ended) == live and all(code == 1 for code, _ in ended.values())
    # judged within a tick or two, plus the store host's linger
    assert max(t for _, t in ended.values()) - t_stop <= dead_after + 2 + 3
    verdicts = {dogs[r].verdict for r in live}
    assert len(verdicts) == 1
    (v,) = verdicts
    m = re.fullmatch(rf"rank {victim} stopped responding \(no heartbeat for (\d+) s\)", v)
    assert m and dead_after < int(m.group(1)) <= dead_after + 2


def test_a_rank_that_finished_is_never_reported():
    dogs, clock, ended = make_dogs(3, dead_after=2.0)
    run(dogs, clock, 3, live={0, 1, 2})
    dogs[2].finish(timeout_s=1.0)  # not the store host: marks itself done and leaves at once
    run(dogs, clock, 60, live={0, 1})
    assert not ended


def test_a_stalled_watcher_blames_nobody_for_its_own_stall():
    dogs, clock, ended = make_dogs(2, dead_after=5.0)
    run(dogs, clock, 3, live={0, 1})
    clock.t += 100  # this whole process was frozen (swapped out, stopped): its peers were not silent
    run(dogs, clock, 4, live={0, 1})
    assert not ended


def test_a_verdict_is_written_once_and_the_first_one_stands():
    dogs, _, _ = make_dogs(3)
    assert dogs[1].publish("rank 2 stopped responding (no heartbeat for 31 s)").startswith("rank 2")
    assert dogs[2].publish("rank 1 failed (ValueError: x)").startswith("rank 2 stopped")


def test_the_store_host_lingers_until_the_live_ranks_have_read_the_verdict():
    dogs, clock, ended = make_dogs(3)
    run(dogs, clock, 2, live={0, 1, 2})
    dogs[0].end("rank 2 failed (ValueError: x)")  # rank 2 beats on but never reads: rank 0 waits it out
    assert ended == {0: (1, clock.t)} and clock.t >= 3.0
    dogs2, clock2, ended2 = make_dogs(3)
    run(dogs2, clock2, 2, live={0, 1, 2})
    for d in dogs2[1:]:
        d.store.add(f"seen/{d.rank}", 1)
    t0 = clock2.t
    dogs2[0].end("rank 2 failed (ValueError: x)")  # everyone has read it: no wait
    assert ended2 == {0: (1, t0)}


def test_after_a_failed_collective_the_heartbeats_name_the_lost_peer():
    dogs, clock, _ = make_dogs(3, dead_after=30.0)
    run(dogs, clock, 2, live={0, 1, 2})
    clock.on_sleep = lambda: dogs[2].store.add("hb/2", 1)  # rank 2 is alive, rank 1 is not
    reason = dogs[0].diagnose("a collective failed because a peer closed its connection (...)")
    assert reason == "rank 1 stopped responding (no heartbeat for 3 s)"
    clock.on_sleep = lambda: [dogs[r].store.add(f"hb/{r}", 1) for r in (1, 2)]
    assert dogs[0].diagnose("what gloo said") == "what gloo said"  # nobody silent: the backend's words


GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[127.0.0.1]:48790. This is typically caused by a remote worker crashing. Check the logs of the "
               "remote worker before reporting an error. GLHF!")
GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
              "[127.0.0.1]:2283: Connection reset by peer. This is typically caused by a remote worker hanging")
GLOO_TIMEOUT = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv " \
               "operation to complete"


@pytest.mark.parametrize("text, keeps", [
    (GLOO_CLOSED, "Connection closed by peer [127.0.0.1]:48790"),
    (GLOO_RESET, "Read error [127.0.0.1]:2283: Connection reset by peer"),
    (GLOO_TIMEOUT, "Timed out waiting 5000ms for recv operation to complete"),
    ("NCCL error in: ProcessGroupNCCL.cpp:1234, remote process exited or there was a network error",
     "remote process exited"),
])
def test_a_lost_peer_error_becomes_one_line_with_the_backend_s_own_words(text, keeps):
    line = collective_error_summary(RuntimeError(text))
    assert keeps in line and "\n" not in line and "pair.cc" not in line and "GLHF" not in line
    assert is_peer_loss(RuntimeError(text))


def test_only_collective_failures_are_read_as_a_lost_peer():
    assert collective_error_summary(RuntimeError("shape mismatch")) is None
    assert collective_error_summary(ValueError(GLOO_CLOSED)) is None  # not what a backend raises
    try:
        try:
            raise RuntimeError(GLOO_CLOSED)
        except RuntimeError as e:
            raise KeyError("wrapped") from e
    except KeyError as wrapped:
        assert "48790" in collective_error_summary(wrapped)


@given(st.lists(st.text(alphabet="ab \n\r", max_size=12), max_size=8))
def test_every_line_is_tagged_once_whatever_the_chunking(chunks):
    whole, parts = io.StringIO(), io.StringIO()
    RankPrefixed(whole, "[rank 3] ").write("".join(chunks))
    tagged = RankPrefixed(parts, "[rank 3] ")
    for c in chunks:
        tagged.write(c)
    assert parts.getvalue() == whole.getvalue()
    out = whole.getvalue()
    assert out.replace("[rank 3] ", "") == "".join(chunks)
    for line in out.replace("\r", "\n").split("\n"):
        assert line == "" or line.startswith("[rank 3] ") and not line[9:].startswith("[rank")


class Ctx:
    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_zero_output_silences_stdout_and_bars_off_rank_zero_and_tags_stderr(rank, capsys):
    from tqdm import tqdm

    with rank_zero_output(Ctx(rank, 2)):
        print("to stdout")
        print("to stderr", file=sys.stderr)
        for _ in tqdm(range(3), disable=False, file=sys.stderr, desc="bar"):
            pass
    out, err = capsys.readouterr()
    assert ("to stdout" in out) == (rank == 0)
    assert f"[rank {rank}] to stderr" in err
    assert ("bar: 100%" in err) == (rank == 0)
    print("after")
    for _ in tqdm(range(2), disable=False, file=sys.stderr, desc="later"):
        pass
    out, err = capsys.readouterr()
    assert out == "after\n" and "later: 100%" in err and "[rank" not in err  # all restored


def test_a_world_of_one_prints_as_usual(capsys):
    with rank_zero_output(Ctx(0, 1)):
        print("plain")
        print("err", file=sys.stderr)
    assert capsys.readouterr() == ("plain\n", "err\n")
