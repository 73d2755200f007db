"""Backbone data parallelism: DDP and FSDP2 on gloo train the sharded-table model to the same parameters,
and both match one process on the whole batch (global-norm clipping included)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from engram.distributed import ShardedMemory
    from engram.distributed.parallel import clip_global_grad_norm_, wrap_backbone
    from engram.optim import SparseRowAdam
    from engram.optim.sparse_adam import clip_grad_norm_
    from engram.model import EngramLM
    from engram.tokenizer import CompressedVocab
    sys.path.insert(0, sys.argv[3])
    from helpers_dist import debug_cfg
    mode, out = sys.argv[1], sys.argv[2]
    single = mode == "single"
    if not single:
        dist.init_process_group("gloo")
    W, rank = (1, 0) if single else (dist.get_world_size(), dist.get_rank())
    cfg, vocab = debug_cfg()
    torch.manual_seed(0)
    model = EngramLM(cfg, vocab)
    if single:
        tables, net = model.engram_parameters(), model
    else:
        mem = ShardedMemory.from_model(model, group=dist.new_group())
        mem.grad_scale = 1.0 / W  # each rank's loss is the mean over its half of the batch
        tables, net = list(mem.shards.values()), wrap_backbone(model, mode)
    backbone = [p for p in model.parameters() if all(p is not t for t in tables)]
    opt = torch.optim.AdamW(backbone, lr=1e-3)
    topt = SparseRowAdam(tables, lr=5e-3)
    g = torch.Generator().manual_seed(0)
    b = 4 // W
    for step in range(3):
        x = torch.randint(0, cfg.vocab_size, (4, 17), generator=g)[rank * b:(rank + 1) * b]
        out_ = net(x[:, :-1], x[:, 1:])
        out_.loss.backward()
        if single:
            clip_grad_norm_(backbone + tables, 1.0)
        else:
            clip_global_grad_norm_(backbone, tables, 1.0, sharded_backbone=mode == "fsdp")
        opt.step(); topt.step(); opt.zero_grad()
        for p in tables:
            p.grad = None
    sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in model.state_dict().items()
          if ".engram.table." not in k}
    if not single:
        parts = [None] * W
        dist.all_gather_object(parts, {k: v.detach().clone() for k, v in mem.shards.items()})
        for layer in parts[0]:
            sd[f"table.{layer}"] = torch.cat([p[layer] for p in parts])
        dist.barrier()  # gloo aborts a rank whose peers tear the group down under it
        dist.destroy_process_group()
    else:
        for layer, t in zip(cfg.engram.layer_ids, tables, strict=True):
            sd[f"table.{layer}"] = t.detach().clone()
    if rank == 0:
        torch.save(sd, out)
''')

HELPERS = textwrap.dedent('''
    from engram.config import EngramConfig, ModelConfig
    from engram.tokenizer import CompressedVocab

    def debug_cfg():
        """A tiny MoE + Engram model whose table sizes divide by neither 2 nor 3."""
        import numpy as np
        V = 256
        vocab = CompressedVocab(np.arange(V) // 2)
        eng = EngramConfig(engram_vocab_size=[101, 103], n_embed_per_ngram=16, n_head_per_ngram=2,
                           layer_ids=[0], pad_id=0)
        cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=32,
                          n_routed_experts=4, n_shared_experts=1, moe_top_k=2, expert_hidden=32,
                          first_dense_layers=1, engram=eng)
        return cfg, vocab
''')


def _run(tmp_path: Path, mode: str, world: int) -> dict:
    out = tmp_path / f"{mode}.pt"
    script = tmp_path / "train3.py"
    script.write_text(SCRIPT)
    (tmp_path / "helpers_dist.py").write_text(HELPERS)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    launcher = [] if mode == "single" else ["-m", "torch.distributed.run", "--standalone",
                                            f"--nproc_per_node={world}"]
    res = subprocess.run([sys.executable, *launcher, str(script), mode, str(out), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
def test_ddp_fsdp_and_one_process_agree(tmp_path):
    single = _run(tmp_path, "single", 1)
    ddp = _run(tmp_path, "ddp", 2)
    fsdp = _run(tmp_path, "fsdp", 2)
    assert single.keys() == ddp.keys() == fsdp.keys()
    for k in single:
        # DDP and FSDP2 do the same arithmetic here (gloo sums two ranks in the same order).
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=0, atol=0, msg=k)
        # One process sums the whole batch's gradient in another order: equal to rounding.
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    moved = max(float((ddp[k] - single[k]).abs().max()) for k in single)
    assert moved < 1e-5
