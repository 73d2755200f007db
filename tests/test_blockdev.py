"""The block device's I/O scheduler: parsing sysfs, finding a file's device, setting and restoring it.

A fake sysfs tree stands in for /sys/dev/block (the real one is machine state that tests must not change).
"""

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engram.store import blockdev


@given(st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,11}", fullmatch=True), min_size=1, max_size=5, unique=True),
       st.data())
def test_parse_scheduler_round_trips(names, data):
    k = data.draw(st.integers(0, len(names) - 1))
    text = " ".join(f"[{n}]" if i == k else n for i, n in enumerate(names)) + " \n"
    assert blockdev.parse_scheduler(text) == (names[k], names)


@pytest.mark.parametrize("text", ["none mq-deadline", "[none] [kyber]", ""])
def test_parse_scheduler_needs_exactly_one_active(text):
    with pytest.raises(ValueError, match="active I/O scheduler"):
        blockdev.parse_scheduler(text)


def _fake_sysfs(tmp_path, monkeypatch, target, *, partition: bool, active="mq-deadline"):
    """A sysfs tree in which ``target``'s device is ``vdz`` (or its partition ``vdz1``)."""
    st_dev = os.stat(target).st_dev
    disk = tmp_path / "devices" / "vdz"
    (disk / "queue").mkdir(parents=True)
    names = ["none", "mq-deadline", "kyber"]
    sched = disk / "queue" / "scheduler"
    sched.write_text(" ".join(f"[{n}]" if n == active else n for n in names) + "\n")
    node = disk / "vdz1" if partition else disk
    node.mkdir(exist_ok=True)
    root = tmp_path / "dev-block"
    root.mkdir()
    (root / f"{os.major(st_dev)}:{os.minor(st_dev)}").symlink_to(node)
    monkeypatch.setattr(blockdev, "SYSFS", root)
    writes = []

    def write(file, name):  # what the kernel does: select `name`, show it in brackets
        assert name in names
        writes.append(name)
        file.write_text(" ".join(f"[{n}]" if n == name else n for n in names) + "\n")

    monkeypatch.setattr(blockdev, "_write", write)
    return sched, writes


@pytest.mark.parametrize("partition", [False, True])
def test_finds_the_device_and_its_scheduler(tmp_path, monkeypatch, partition):
    f = tmp_path / "store.engram"
    f.write_bytes(b"x")
    sched, _ = _fake_sysfs(tmp_path, monkeypatch, f, partition=partition)
    assert blockdev.queue_dir(f) == sched.parent.resolve()
    assert blockdev.io_scheduler(f) == {"device": "vdz", "active": "mq-deadline",
                                        "available": ["none", "mq-deadline", "kyber"]}


def test_no_device_gives_none(tmp_path, monkeypatch):
    monkeypatch.setattr(blockdev, "SYSFS", tmp_path / "empty")
    f = tmp_path / "a"
    f.write_bytes(b"x")
    assert blockdev.queue_dir(f) is None and blockdev.io_scheduler(f) is None
    assert blockdev.io_scheduler(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="not on a block device"):
        blockdev.set_io_scheduler(f, "none")
    with blockdev.scheduler_set(f, None) as info:  # leaving it alone works anywhere
        assert info is None


def test_scheduler_set_restores_the_previous_one(tmp_path, monkeypatch):
    f = tmp_path / "store.engram"
    f.write_bytes(b"x")
    sched, writes = _fake_sysfs(tmp_path, monkeypatch, f, partition=False)
    with blockdev.scheduler_set(f, "none") as info:
        assert info == {"device": "vdz", "before": "mq-deadline", "during": "none"}
        assert blockdev.io_scheduler(f)["active"] == "none"
    assert blockdev.io_scheduler(f)["active"] == "mq-deadline"
    with pytest.raises(RuntimeError, match="boom"), blockdev.scheduler_set(f, "kyber"):
        assert blockdev.io_scheduler(f)["active"] == "kyber"
        raise RuntimeError("boom")
    assert blockdev.io_scheduler(f)["active"] == "mq-deadline"
    assert writes == ["none", "mq-deadline", "kyber", "mq-deadline"]
    with blockdev.scheduler_set(f, "mq-deadline") as info:  # already active: nothing written
        assert info["before"] == info["during"] == "mq-deadline"
    with blockdev.scheduler_set(f, None) as info:
        assert info == {"device": "vdz", "before": "mq-deadline", "during": "mq-deadline"}
    assert len(writes) == 4


def test_set_rejects_unknown_schedulers_and_explains_permissions(tmp_path, monkeypatch):
    f = tmp_path / "store.engram"
    f.write_bytes(b"x")
    sched, writes = _fake_sysfs(tmp_path, monkeypatch, f, partition=True)
    with pytest.raises(ValueError, match=r"offers the I/O schedulers \['none', 'mq-deadline', 'kyber'\], not 'bfq'"):
        blockdev.set_io_scheduler(f, "bfq")

    def denied(file, name):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(blockdev, "_write", denied)
    with pytest.raises(PermissionError, match="needs root"):
        blockdev.set_io_scheduler(f, "none")
    assert blockdev.io_scheduler(f)["active"] == "mq-deadline" and writes == []
