"""Shared test pieces: one-thread fixture body, the tiny compressed vocabulary, a tiny Engram model and its
saved reference (offloaded inference)."""

# Shapes: B batch, T time, H hash heads, d row width, V vocabulary, R table rows.

import numpy as np
import torch

from engram.config import EngramConfig, ModelConfig
from engram.model import EngramLM, generate
from engram.serve import export_tables
from engram.tokenizer.compression import CompressedVocab

V = 48


def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_vocab() -> CompressedVocab:
    return CompressedVocab(np.concatenate([np.arange(30), np.arange(18)]))


def make_cfg(table_dtype="float32", **kw) -> ModelConfig:
    eng = EngramConfig(engram_vocab_size=[53, 59], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[0, 2],
                       pad_id=0, conv_init="default", kernel_size=3, table_dtype=table_dtype)
    return ModelConfig(**{**dict(vocab_size=V, d_model=32, n_layers=3, n_heads=4, mlp_hidden=48, max_seq_len=40,
                                 engram=eng), **kw})


def make_model(table_dtype="float32", seed=0, **kw) -> EngramLM:
    torch.manual_seed(seed)
    model = EngramLM(make_cfg(table_dtype, **kw), tiny_vocab()).eval()
    with torch.no_grad():  # off the symmetric init, so every path matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ids(B=2, T=12, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def table_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.engram_parameters())


class Saved:
    """A saved tiny model, its exported store and the all-in-RAM reference outputs."""

    def __init__(self, root, table_dtype):
        self.model = make_model(table_dtype)
        self.model_dir = self.model.save_pretrained(root / "model")
        self.store_dir = export_tables(self.model_dir, root / "store")
        self.idx = ids()
        self.prompt = ids(2, 5, seed=3)
        self.batches = [(ids(3, 10, seed=s), ids(3, 10, seed=s + 100)) for s in range(4)]
        self.batches[1][1][0, :3] = -100  # ignored targets
        self.profile_batches = [ids(4, 16, seed=50 + s) for s in range(3)]
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
