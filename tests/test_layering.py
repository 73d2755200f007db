"""The package map, read from the imports: each folder of `engram` imports only from lower layers.

A layer may import from strictly lower layers and from itself; folders of the same layer know nothing
of each other (the model, the stores and the optimizer are siblings). Every import counts, the ones
inside functions included: a lazy import is still a dependency.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import engram

SRC = Path(engram.__file__).parent

# the layer of each top-level module or folder of `engram` (lower imports from nothing above it)
LAYER = {
    "atomic": 0, "config": 0, "native": 0, "figures": 1,
    "tokenizer": 1, "hashing": 1,
    "data": 2, "memory": 2,
    "v41": 2,
    "model": 3, "optim": 3, "store": 3,
    "serve": 4, "train": 4, "hf": 4,
    "distributed": 5, "demo": 5, "science": 5, "probes": 5,
    "cli": 6, "__main__": 7,
}


def _imports(path: Path) -> set[str]:
    """The `engram` folders/modules that one source file imports, at any nesting level."""
    own = path.relative_to(SRC).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's own package
                base = list(own[:-1])[: len(own) - 1 - (node.level - 1)]
                names = [".".join(["engram", *base, *(node.module or "").split(".")]).rstrip(".")]
            else:
                names = [node.module or ""]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] == "engram" and len(parts) > 1:
                found.add(parts[1])
    return found


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for f in sorted(SRC.rglob("*.py")):
        top = f.relative_to(SRC).parts[0].removesuffix(".py")
        if top == "__init__":
            continue  # the package's own front door re-exports the public names (checked below)
        edges.setdefault(top, set()).update(_imports(f) - {top})
    return edges


def test_every_module_has_a_layer():
    missing = sorted(set(_graph()) - set(LAYER))
    assert not missing, f"give these a layer in LAYER: {missing}"


def test_no_import_from_a_lower_layer_to_a_higher_or_a_sibling():
    bad = [f"{a} (layer {LAYER[a]}) imports {b} (layer {LAYER[b]})"
           for a, deps in _graph().items() for b in sorted(deps) if LAYER[b] >= LAYER[a]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["model", "memory", "hashing", "tokenizer"])
def test_the_model_side_never_imports_infrastructure(folder):
    deps = _graph()[folder]
    assert not deps & {"store", "serve", "train", "distributed", "cli"}, deps


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The test above is only as good as `_imports`: it must see an import inside a function."""
    f = SRC / "model" / "transformer.py"
    assert "memory" in _imports(f)
    src = "def f():\n    from engram.store import disk\n    import engram.serve.offload\n"
    p = SRC / "model" / "_probe_layering.py"
    try:
        p.write_text(src)
        assert _imports(p) == {"store", "serve"}
    finally:
        p.unlink()


def test_importing_the_model_loads_no_store_serve_train_or_io_code():
    code = ("import json, sys\nimport engram.model, engram.memory, engram.hashing, engram.tokenizer\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('engram'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(out.stdout)
    assert "engram.model.transformer" in loaded  # the probe really imported the model
    infra = {"store", "serve", "train", "distributed", "cli", "optim"}
    banned = [m for m in loaded if (m + ".x").split(".")[1] in infra
              or any(w in m for w in ("prefetch", "native_io", "readahead", "blockdev", "uring"))]
    assert not banned, banned
