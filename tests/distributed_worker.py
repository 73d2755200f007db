"""One rank of the multi-process checks of tests/test_distributed.py (run as a script by every rank, or in
the test process itself for a world of one).

``provider OUT``: the sharded provider against the single-process model (forward, gradients, optimizer
steps, duplicate ids, a rank asked for nothing, an empty batch, a rank owning no rows; both exchanges).
``serve OUT MODEL_DIR STORE_DIR``: :func:`engram.distributed.serve.load_sharded` from the model directory
and from the store, then logits, greedy and sampled generation and the evaluation loss.
Each rank writes ``OUT/<mode>-rank<r>.json`` (and rank 0 the serving outputs as a torch file): numbers
only; the test asserts on them.

Legend: B batch, T time, H hash heads, d row width, R table rows, S rows of one shard.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from engram.distributed import ShardedMemory, row_bounds
from engram.distributed.exchange import _world
from engram.distributed.launch import init_distributed, shutdown
from engram.distributed.serve import load_sharded
from engram.model import EngramLM
from engram.optim.sparse_adam import SparseRowAdam


def _tests_conftest():
    """tests/conftest.py by its path (another conftest may hold the name ``conftest`` in a whole-suite run)."""
    import importlib.util

    name = "engram_tests_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "conftest.py")
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


Tiny = _tests_conftest().Tiny
EXCHANGES = ("all_to_all", "masked")
B = 6  # divisible by 1, 2 and 3: every rank an equal slice, so the full-batch mean is the mean of the ranks'


def uneven_model(dtype: str = "float32", seed: int = 0) -> EngramLM:
    """Tiny's model with tables of 250 and 296 rows (neither a multiple of 3: uneven shards on 3 ranks)."""
    cfg = Tiny.cfg(dtype)
    cfg = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, engram_vocab_size=[53, 67]))
    torch.manual_seed(seed)
    model = EngramLM(cfg, Tiny.vocab())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _dense(g: torch.Tensor | None, shape) -> torch.Tensor:
    if g is None:
        return torch.zeros(shape)
    return (g.to_dense() if g.is_sparse else g).float()


def _gather_rows(local_Sd: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded table, concatenated in rank order with every rank's (the full table)."""
    W, _ = _world(None)
    if W == 1:
        return local_Sd
    parts = [None] * W
    dist.all_gather_object(parts, local_Sd.detach())
    return torch.cat(parts)


def _all_sum(grads: list[torch.Tensor]) -> None:
    if _world(None)[0] > 1:
        for g in grads:
            dist.all_reduce(g)


def _slice(x: torch.Tensor, W: int, r: int) -> torch.Tensor:
    n = x.shape[0] // W
    return x[r * n:(r + 1) * n]


def model_checks(ex: str) -> dict:
    """Forward, backward and three optimizer steps of the sharded model vs the single-process one."""
    W, r = _world(None)
    out = {}
    for dtype in ("float32", "bfloat16"):
        ref, shd = uneven_model(dtype).eval(), uneven_model(dtype).eval()
        mem = ShardedMemory.from_model(shd, exchange=ex)
        x = Tiny.ids(B, 12, seed=5)
        with torch.no_grad():
            out[f"logits_equal_{dtype}"] = bool(torch.equal(ref(x).logits, shd(x).logits))
            # A rank with no batch joins through idle(); the others' logits are unchanged by it.
            if W > 1 and r == W - 1:
                mem.idle()
                out[f"idle_logits_equal_{dtype}"] = True
            else:
                part = _slice(x, max(1, W - 1), r)
                out[f"idle_logits_equal_{dtype}"] = bool(torch.equal(ref(part).logits, shd(part).logits))

    ref, shd = uneven_model().train(), uneven_model().train()
    mem = ShardedMemory.from_model(shd, exchange=ex)
    out["shard_rows"] = {str(lay): [s.start, s.end] for lay, s in mem.spec.items()}
    ref_opt = [SparseRowAdam(ref.engram_parameters(), lr=1e-2), torch.optim.AdamW(ref.backbone_parameters(), lr=1e-3)]
    shd_opt = [SparseRowAdam(list(mem.shards.values()), lr=1e-2),
               torch.optim.AdamW(shd.backbone_parameters(), lr=1e-3)]
    ref_tables = dict(zip(mem.spec, ref.engram_parameters(), strict=True))
    for step in range(3):
        x, y = Tiny.ids(B, 12, seed=10 + step), Tiny.ids(B, 12, seed=20 + step)
        for o in (*ref_opt, *shd_opt):
            o.zero_grad(set_to_none=True)
        ref(x, y).loss.backward()
        # Split batches: rank r's slice, loss scaled by 1/W so the gradients add up to the full batch's.
        (shd(_slice(x, W, r), _slice(y, W, r)).loss / W).backward()
        _all_sum([p.grad for p in shd.backbone_parameters() if p.grad is not None])
        if step == 0:
            bb = [(p.grad, q.grad) for p, q in zip(ref.backbone_parameters(), shd.backbone_parameters(), strict=True)]
            out["grad_backbone_max_diff"] = max(_max_diff(a, b) for a, b in bb)
            out["grad_backbone_max_abs"] = max(float(a.abs().max()) for a, _ in bb)
            diffs, mags = [], []
            for lay, t in ref_tables.items():
                full = _gather_rows(_dense(mem.shard(lay).grad, mem.shard(lay).shape))
                want = _dense(t.grad, t.shape)
                diffs.append(_max_diff(full, want) if full.shape == want.shape else float("inf"))
                mags.append(float(want.abs().max()))
            out["grad_table_max_diff"], out["grad_table_max_abs"] = max(diffs), max(mags)
        for o in (*ref_opt, *shd_opt):
            o.step()
    out["param_backbone_max_diff"] = max(_max_diff(p, q) for p, q in
                                         zip(ref.backbone_parameters(), shd.backbone_parameters(), strict=True))
    out["param_table_max_diff"] = max(_max_diff(_gather_rows(mem.shard(lay).data), t.data)
                                      for lay, t in ref_tables.items())
    out["param_table_moved"] = max(_max_diff(t.data, u.data) for t, u in
                                   zip(ref_tables.values(), uneven_model().engram_parameters(), strict=True))
    return out


def provider_checks(ex: str) -> dict:
    """The provider alone over a known one-head table: exact rows and exact (fp32-summed) gradients."""
    W, r = _world(None)

    def draw(case: str, q: int, R: int) -> torch.Tensor:  # rank q's ids: every rank can redraw any rank's
        g = torch.Generator().manual_seed(100 + q)
        if case == "duplicates":  # 5 distinct rows, each asked many times by every rank
            return torch.randint(0, 5, (24,), generator=g) * (R // 5)
        if case == "one_owner":  # only rank 0's rows: every other rank is asked for nothing
            return torch.randint(0, row_bounds(R, W)[1], (24,), generator=g)
        if case == "empty_on_last":  # the last rank has an empty batch
            return torch.randint(0, R, (0 if q == W - 1 else 24,), generator=g)
        return torch.randint(0, R, (24,), generator=g)

    out = {}
    for case, R in (("duplicates", 107), ("one_owner", 107), ("empty_on_last", 107), ("owner_of_nothing", 4)):
        d = 6
        for dtype in (torch.float32, torch.bfloat16):
            full_Rd = torch.randn(R, d, generator=torch.Generator().manual_seed(1)).to(dtype)
            full_Rd[0, 0] = -0.0  # a negative zero must arrive as one
            lo, hi = row_bounds(R, W)[r], row_bounds(R, W)[r + 1]
            mem = ShardedMemory({0: (R,)}, d, dtype, shards={0: full_Rd[lo:hi].clone()}, exchange=ex)
            want_grad = torch.zeros(R, d, dtype=torch.float64)
            for q in range(W):
                ids = draw(case, q, R)
                w = torch.randn(ids.numel(), d, generator=torch.Generator().manual_seed(200 + q))
                want_grad.index_add_(0, ids, w.double())
            ids = draw(case, r, R)
            w = torch.randn(ids.numel(), d, generator=torch.Generator().manual_seed(200 + r))
            got = mem.rows(0, ids.reshape(1, -1, 1))
            bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
            key = f"{case}_{str(dtype).removeprefix('torch.')}"
            out[f"{key}_rows_equal"] = bool(torch.equal(got.reshape(-1, d).view(bits), full_Rd[ids].view(bits)))
            (got.reshape(-1, d).float() * w).sum().backward()
            if dtype == torch.float32:
                out[f"{key}_grad_max_diff"] = _max_diff(_dense(mem.shard(0).grad, (hi - lo, d)), want_grad[lo:hi])
            out[f"{key}_owned_rows"] = hi - lo
    return out


def run_provider(outdir: Path) -> None:
    W, r = _world(None)
    res = {"world": W, "rank": r}
    for ex in EXCHANGES:
        res[ex] = {**model_checks(ex), **provider_checks(ex)}
    (outdir / f"provider-rank{r}.json").write_text(json.dumps(res, indent=1))


def run_serve(outdir: Path, model_dir: str, store_dir: str) -> None:
    W, r = _world(None)
    saved = {}
    for source, store in (("weights", None), ("store", store_dir)):
        for ex in EXCHANGES:
            lm = load_sharded(model_dir, store, exchange=ex)
            idx, prompt = Tiny.ids(), Tiny.ids(2, 5, seed=3)
            batches = [(Tiny.ids(3, 10, seed=s), Tiny.ids(3, 10, seed=s + 100)) for s in range(4)]
            batches[1][1][0, :3] = -100
            saved[f"{source}-{ex}"] = {
                "logits": lm(idx).logits,
                "greedy": lm.generate(prompt, 8, temperature=0),
                "sampled": lm.generate(prompt, 8, temperature=0.9, top_k=10,
                                       generator=torch.Generator().manual_seed(7)),
                "loss": lm.evaluate(batches),
                "nbytes": lm.memory.nbytes,
            }
    if r == 0:
        torch.save(saved, outdir / "serve.pt")
    (outdir / f"serve-rank{r}.json").write_text(json.dumps({"rank": r, "world": W, "ok": True}))


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed()
    outdir = Path(argv[1])
    if argv[0] == "provider":
        run_provider(outdir)
    else:
        run_serve(outdir, argv[2], argv[3])
    shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1:])
