"""Huge-page advice for large tables: applied where the kernel allows it, harmless elsewhere."""

import sys
from pathlib import Path

import pytest
import torch

from engram.memory import MultiHeadTable
from engram.memory.hugepages import advise_hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    if not sys.platform.startswith("linux") or not THP.is_file():
        return None
    text = THP.read_text()
    return text[text.index("[") + 1 : text.index("]")]


def test_small_and_non_cpu_tensors_are_left_alone():
    assert advise_hugepages(torch.empty(1024, 16)) == 0
    assert advise_hugepages(torch.empty(1 << 20, 32)[:, :8]) == 0  # not contiguous


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="transparent huge pages disabled")
def test_large_table_is_advised_and_gathers_unchanged():
    torch.manual_seed(0)
    t = MultiHeadTable([1 << 20, (1 << 20) + 7], 32)  # 256 MiB fp32
    advised = t.hugepage_bytes
    assert advised > 0 and advised % (2 << 20) == 0
    assert advised >= t.nbytes - 2 * (2 << 20)  # all but the unaligned ends
    rows = torch.randint(0, 1 << 20, (64, 2))
    assert torch.equal(t(rows), t.weight[rows + t.offsets])
