"""Native kernels: the C sources shipped as package data (``*.c`` beside this file) and one loader.

Each kernel is compiled on first use with the system C compiler and cached (:mod:`engram.native.build`);
the Python wrapper that uses it lives with its concern (:mod:`engram.memory.native_gather`,
:mod:`engram.optim.native_adam`, :mod:`engram.store.native_cache`, :mod:`engram.store.native_io`) and
falls back to a pure torch/numpy path where no compiler works.
"""

from __future__ import annotations

from importlib import resources

from engram.native.build import NativeLibrary, build_and_load, compiler

__all__ = ["NativeLibrary", "build_and_load", "compiler", "native_source"]


def native_source(name: str) -> str:
    """The text of the C source ``name`` shipped in this package (e.g. ``"gather.c"``)."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
