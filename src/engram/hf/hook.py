"""Register the engram classes with ``transformers``' auto classes without importing ``transformers``.

Importing ``transformers``' model machinery takes seconds, ``import engram`` must not. So
:func:`install` (run by ``import engram``) registers at once only when ``transformers`` has already loaded
its auto-config module; otherwise it puts a finder on ``sys.meta_path`` that runs the registration right
after ``transformers.models.auto.configuration_auto`` is executed, i.e. before any ``AutoConfig`` /
``AutoModelForCausalLM`` / ``pipeline`` call can look for ``"engram"``.
The config is registered then; the model class when the first :class:`EngramHFConfig` is built (every
``AutoModelForCausalLM`` path builds the config first), so the hook itself never imports the heavy
modelling modules in the middle of another import.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

_TARGET = "transformers.models.auto.configuration_auto"
_state = {"config": False, "model": False}


def register_config() -> None:
    """``AutoConfig.register("engram", EngramHFConfig)``, once."""
    if _state["config"]:
        return
    from transformers import AutoConfig

    from engram.hf.configuration import EngramHFConfig

    AutoConfig.register(EngramHFConfig.model_type, EngramHFConfig, exist_ok=True)
    _state["config"] = True


def register_model() -> None:
    """``AutoModelForCausalLM.register(EngramHFConfig, EngramForCausalLM)``, once."""
    if _state["model"]:
        return
    _state["model"] = True  # before the import: a config built inside it must not recurse
    try:
        from transformers import AutoModelForCausalLM

        from engram.hf.configuration import EngramHFConfig
        from engram.hf.modeling import EngramForCausalLM

        AutoModelForCausalLM.register(EngramHFConfig, EngramForCausalLM, exist_ok=True)
    except BaseException:
        _state["model"] = False
        raise


def register() -> None:
    """Register the config and the model with ``transformers`` now (importing it); idempotent."""
    register_config()
    register_model()


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the registration."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        _uninstall()
        try:
            register_config()
        except Exception as e:  # never break transformers' own import; say why engram is missing
            warnings.warn(f"engram: could not register with transformers' AutoConfig ({e!r})", stacklevel=2)

    def __getattr__(self, name):  # get_source, is_package, ... as the wrapped loader answers them
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


_FINDER = _Finder()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Arrange for the registration (see the module docstring); cheap, idempotent."""
    if _state["config"] or _FINDER in sys.meta_path:
        return
    if _TARGET in sys.modules:
        register_config()
    else:
        sys.meta_path.insert(0, _FINDER)
