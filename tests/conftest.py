"""Shared fixtures of the test suite.

* ``one_thread``: run on one torch thread (bit-exact comparisons, no oversubscription), then restore.
  A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
* ``tiny``: the tiny Engram model kit (vocabulary, config, model, token ids, a saved model and its
  exported store with all-in-RAM reference outputs), see :class:`Tiny`.
* ``make_corpus``: writes the deterministic pseudo-code corpus the training tests learn from.
* ``tekken``: the bundled Mistral Tekken vocabulary, compressed (loaded once: it takes seconds).
* ``golden``: reads a file of ``tests/golden/``; ``--update-golden`` rewrites it from the run instead.
* Every test starts from the same global RNG state, and Hypothesis draws the same examples on every run
  (``HYPOTHESIS_PROFILE=explore`` draws fresh ones, for a search away from CI).
"""

# Shapes: B batch, T time, V vocabulary.

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

from engram.config import EngramConfig, ModelConfig
from engram.model import EngramLM, generate
from engram.serve import export_tables
from engram.tokenizer.compression import CompressedVocab

GOLDEN = Path(__file__).parent / "golden"

settings.register_profile("deterministic", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite the tests/golden/ files from this run instead of comparing against them")


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Draws from the global RNGs (``torch.randn`` without a generator, ``random``) repeat on every run,
    whichever tests run before."""
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def golden(request):
    """``golden(name, produced)`` returns the stored content of ``tests/golden/<name>`` (JSON); with
    ``--update-golden`` it first writes ``produced`` there. Regeneration commands: tests/golden/README.md."""

    def read(name: str, produced: dict) -> dict:
        path = GOLDEN / name
        if request.config.getoption("--update-golden"):
            path.write_text(json.dumps(produced, indent=1) + "\n")
        return json.loads(path.read_text())

    return read


@pytest.fixture(scope="session")
def tekken() -> CompressedVocab:
    """The bundled Tekken vocabulary (131,072 tokens, mistral-common's tekken_240911.json), compressed."""
    return CompressedVocab.from_pretrained("mistral-tekken")


# ------------------------------------------------------------------------------------ training corpus

WORDS = ("def class return self import from for while if else elif try except with as lambda yield "
         "value index count total items result data node tree list dict open read write close print "
         "the a of to and in is it for not on with").split()


def write_corpus(root: Path, n_files: int = 40, seed: int = 0) -> Path:
    """Deterministic pseudo-code text: numpy's Generator streams are stable across versions."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = []
        for _ in range(60):
            n = int(rng.integers(3, 10))
            indent = "    " * int(rng.integers(0, 3))
            lines.append(indent + " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), n)))
        (root / f"doc{i:03d}.py").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def make_corpus():
    """``make_corpus(root, n_files=40, seed=0)`` writes the corpus under ``root`` and returns ``root``."""
    return write_corpus


# ------------------------------------------------------------------------------------ tiny Engram model

class Saved:
    """A saved tiny model, its exported store and the all-in-RAM reference outputs."""

    def __init__(self, root: Path, table_dtype: str):
        self.model = Tiny.model(table_dtype)
        self.model_dir = self.model.save_pretrained(root / "model")
        self.store_dir = export_tables(self.model_dir, root / "store")
        self.idx = Tiny.ids()
        self.prompt = Tiny.ids(2, 5, seed=3)
        self.batches = [(Tiny.ids(3, 10, seed=s), Tiny.ids(3, 10, seed=s + 100)) for s in range(4)]
        self.batches[1][1][0, :3] = -100  # ignored targets
        self.profile_batches = [Tiny.ids(4, 16, seed=50 + s) for s in range(3)]
        m = self.model
        with torch.no_grad():
            self.logits = m(self.idx).logits
            self.greedy = generate(m, self.prompt, 8, temperature=0)
            self.sampled = generate(m, self.prompt, 8, temperature=0.9, top_k=10,
                                    generator=torch.Generator().manual_seed(7))
            total = n = 0
            for x, y in self.batches:
                k = int((y != -100).sum())
                total += float(m(x, y).loss) * k
                n += k
            self.loss = total / n


class Tiny:
    """A 3-layer model over a V=48 vocabulary compressed to 30 ids, Engram at layers 0 and 2."""

    V = 48
    Saved = Saved

    @staticmethod
    def vocab() -> CompressedVocab:
        return CompressedVocab(np.concatenate([np.arange(30), np.arange(18)]))

    @staticmethod
    def cfg(table_dtype: str = "float32", **kw) -> ModelConfig:
        eng = EngramConfig(engram_vocab_size=[53, 59], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[0, 2],
                           pad_id=0, conv_init="default", kernel_size=3, table_dtype=table_dtype)
        return ModelConfig(**{**dict(vocab_size=Tiny.V, d_model=32, n_layers=3, n_heads=4, mlp_hidden=48,
                                     max_seq_len=40, engram=eng), **kw})

    @staticmethod
    def model(table_dtype: str = "float32", seed: int = 0, **kw) -> EngramLM:
        torch.manual_seed(seed)
        model = EngramLM(Tiny.cfg(table_dtype, **kw), Tiny.vocab()).eval()
        with torch.no_grad():  # off the symmetric init, so every path matters
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        return model

    @staticmethod
    def ids(B: int = 2, T: int = 12, seed: int = 1) -> torch.Tensor:
        return torch.randint(0, Tiny.V, (B, T), generator=torch.Generator().manual_seed(seed))

    @staticmethod
    def table_bytes(model: EngramLM) -> int:
        return sum(p.numel() * p.element_size() for p in model.engram_parameters())


@pytest.fixture(scope="session")
def tiny() -> type[Tiny]:
    return Tiny
