"""Fixtures of the benchmark tests. The benchmark scripts are top-level modules of benchmarks/ (``common``,
``pool_offload``, ...); pytest puts benchmarks/ on the import path (``pythonpath`` in pyproject.toml)."""

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def benchmarks_dir() -> Path:
    """The benchmarks/ folder: the scripts and RESULTS.md."""
    return BENCHMARKS


@pytest.fixture(scope="session")
def results_dir() -> Path:
    """benchmarks/results: the committed benchmark runs that RESULTS.md's tables come from."""
    return BENCHMARKS / "results"
