"""Every GPU check in one short run: what a briefly lent GPU machine executes, one JSON file back.

    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu_check.json            # the GPU machine
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --tiny --out F     # a dry run on the CPU

A lent machine comes with its own PyTorch (maybe older than the project's pin) and few other
packages, for minutes: so the checks build on the project's APIs alone, import what they need
lazily, and run independently (one that fails records its traceback and the rest go on). The file
(``machine`` + a ``checks`` list of ``{name, status, seconds, error, ...figures}``) is rewritten
after every check, and a check about to start is recorded as ``running``: a run killed by its time
limit still leaves the finished checks and names the one it was in.

Checks (``--only NAME ...`` picks some):
  train_demo / train_d768: the demo preset's MoE baseline and its iso-parameter Engram variant
      (`engram.train.compare.variants`) trained on the device with bf16 autocast where supported;
      tokens/s of each, the Engram/MoE ratio (target >= 0.95); then at d=768 x 8 layers
      (`gpu_check_train`);
  hashing: `NgramHasher` on the device equals its numpy form bit for bit; time per [64, 4096] batch;
  offload: prefill and greedy decode with the tables in (pinned) host memory and on disk behind a
      10% cache vs all tables on the device: equal outputs, throughput ratios (target >= 0.97) for a
      table of `--table-gb` (`gpu_check_offload`);
  generate: greedy `generate` on the device equals `generate` on the CPU (small model, fp32);
  syncs: the host syncs left in a training step with deferred reads, by site and count per step, and a
      step's time with vs without deferred reads (`gpu_check_syncs`; skipped on a CPU after running
      the step path);
  nccl_smoke: a one-process NCCL group (gloo on a CPU) running the row-sharded exchange of a small
      table, equal to the unsharded lookup (`gpu_check_nccl`).

Performance targets are recorded (``meets_target``), not enforced: a check fails when something is
wrong (outputs differ, an exception), not when it is slow. ``--tiny`` shrinks every check to seconds
on a CPU, to test the script itself. Data are synthetic (Zipf-distributed token ids): a lent
machine has no corpus, no tokenizer training time and perhaps no ``tokenizers`` package, and
throughput does not depend on what the tokens mean.

Device-specific on purpose, behind ``device.type == "cuda"``: waiting for queued work before a clock
is read (`synchronize`; on another accelerator type the timings would miss queued work), pinned host
tables (`RamStore` ignores ``pin`` without CUDA), the free device memory checked before the offload
check, the TF32 switches turned off for the fp32 comparison, and the peak device memory recorded.

Legend: B batch, T time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

# The script's sibling modules, when it is run as a file from elsewhere.
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET_TRAIN_RATIO = 0.95
TARGET_OFFLOAD_RATIO = 0.97
OPTIONAL = ("numpy", "safetensors", "tqdm", "matplotlib", "tokenizers", "transformers", "google_crc32c",
            "sympy", "hypothesis")


class Skip(Exception):
    """Raised by a check that cannot run here (not enough memory or disk): recorded as ``skipped``."""


def resolve_device(name: str):
    """``auto``: the first CUDA device when there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"gpu_check: --device {name}, but this torch ({torch.__version__}) sees no CUDA device")
    return dev


def synchronize(device) -> None:
    """Wait for the device's queued work, so a wall-clock interval covers it (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_memory() -> dict:
    """Total and available host memory in bytes (from /proc/meminfo; None where there is none)."""
    out = {"total": None, "available": None}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                out["total" if key == "MemTotal" else "available"] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def machine_info(device) -> dict:
    """What the figures were measured on: torch and CUDA versions, the device, host memory, packages."""
    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "device": str(device),
            "host_memory_bytes": host_memory()["total"], "packages": {}}
    for name in OPTIONAL:
        try:
            info["packages"][name] = getattr(importlib.import_module(name), "__version__", "present")
        except Exception:  # a package that is absent or broken here: recorded, never fatal
            info["packages"][name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    else:
        info.update(device_name=platform.processor() or "cpu", device_memory_bytes=info["host_memory_bytes"])
    return info


class Report:
    """The JSON file: ``machine`` and one record per check, rewritten atomically after every change."""

    def __init__(self, out: Path, machine: dict, args: dict) -> None:
        self.out, self.data = out, {"machine": machine, "args": args, "checks": []}
        self.write()

    def write(self) -> None:
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.out)  # a reader (or a kill) never sees half a file

    def run(self, name: str, fn, ctx) -> dict:
        rec = {"name": name, "status": "running", "seconds": None, "error": None}
        self.data["checks"].append(rec)
        self.write()
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            fn(ctx, rec)  # fills rec with its figures as it goes: a failure keeps those measured so far
            rec["status"] = "ok"
        except Skip as e:
            rec["status"], rec["reason"] = "skipped", str(e)
        except Exception:
            rec["status"], rec["error"] = "failed", traceback.format_exc()
        finally:
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            self.write()
        print(f"[gpu_check] {name}: {rec['status']} ({rec['seconds']:.1f} s)", file=sys.stderr, flush=True)
        if rec["error"]:
            print(rec["error"], file=sys.stderr, flush=True)
        return rec


class Context:
    """What every check gets: the device, the size switch and a scratch directory of its own."""

    def __init__(self, device, tiny: bool, workdir: Path, table_gb: float) -> None:
        self.device, self.tiny, self.workdir, self.table_gb = device, tiny, workdir, table_gb

    def scratch(self, name: str) -> Path:
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        return d


# ------------------------------------------------------------------------------------ small checks

def check_hashing(ctx: Context, rec: dict) -> None:
    """The torch hash on the device equals the numpy hash bit for bit; time per [64, 4096] batch."""
    import numpy as np
    import torch

    from engram.hashing import NgramHasher
    from engram.train.config import run_preset

    eng = run_preset("demo").model.engram
    V = 8192
    hasher = NgramHasher(V, eng.engram_vocab_size, eng.max_ngram_size, eng.n_head_per_ngram, [1, 7], pad_id=2,
                         seed=eng.seed)
    B, T = (4, 256) if ctx.tiny else (64, 4096)
    ids_BT = np.random.default_rng(0).integers(0, V, (B, T), dtype=np.int64)
    ids_dev = torch.from_numpy(ids_BT).to(ctx.device)
    want = hasher.hash(ids_BT)
    got = hasher.hash(ids_dev)
    rec.update(batch=[B, T], layers=len(want))
    for lay, rows in want.items():
        dev_rows = got[lay]
        if dev_rows.device.type != ctx.device.type:
            raise AssertionError(f"layer {lay}: rows came back on {dev_rows.device}, not {ctx.device}")
        if not np.array_equal(dev_rows.cpu().numpy(), rows):
            bad = int((dev_rows.cpu().numpy() != rows).sum())
            raise AssertionError(f"layer {lay}: {bad} of {rows.size} row ids differ from the numpy hash")
    rec["bit_equal"] = True

    def per_batch(fn, reps: int) -> float:
        fn()
        synchronize(ctx.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        synchronize(ctx.device)
        return (time.perf_counter() - t0) / reps

    reps = 2 if ctx.tiny else 20
    rec["device_ms_per_batch"] = 1e3 * per_batch(lambda: hasher.hash(ids_dev, validate=False), reps)
    rec["device_validated_ms_per_batch"] = 1e3 * per_batch(lambda: hasher.hash(ids_dev), reps)
    rec["numpy_ms_per_batch"] = 1e3 * per_batch(lambda: hasher.hash(ids_BT, validate=False), 1 if ctx.tiny else 3)


def check_generate(ctx: Context, rec: dict) -> None:
    """Greedy decoding on the device gives the CPU's tokens (small model, fp32)."""
    import copy

    import numpy as np
    import torch

    from engram.config import EngramConfig, ModelConfig
    from engram.model import EngramLM
    from engram.model.generation import generate
    from engram.tokenizer import CompressedVocab

    V = 512
    eng = EngramConfig(engram_vocab_size=[1009, 1013], n_embed_per_ngram=32, n_head_per_ngram=4, layer_ids=[0, 2],
                       pad_id=0, conv_init="default", kernel_size=3)
    cfg = ModelConfig(vocab_size=V, d_model=64, n_layers=3, n_heads=4, mlp_hidden=128, max_seq_len=128, engram=eng)
    torch.manual_seed(0)
    vocab = CompressedVocab(np.concatenate([np.arange(V - 64), np.arange(64)]))  # a real compression: 64 merged
    cpu_model = EngramLM(cfg, vocab).eval()
    with torch.no_grad():  # away from the symmetric init, so every path (norms, conv, gate) matters
        for name, p in cpu_model.named_parameters():
            if "norm" in name or "conv" in name:
                p.add_(0.1 * torch.randn_like(p))
    dev_model = copy.deepcopy(cpu_model).to(ctx.device)
    prompt_BT = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(1))
    n_new = 16 if ctx.tiny else 64
    # fp32 means fp32: CUDA convolutions (the ShortConv) default to TF32, which rounds inputs to 10 bits.
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        want = generate(cpu_model, prompt_BT, n_new, temperature=0)
        got = generate(dev_model, prompt_BT.to(ctx.device), n_new, temperature=0).cpu()
        with torch.no_grad():
            full = want[:, :-1]
            diff = (cpu_model(full).logits - dev_model(full.to(ctx.device)).logits.cpu()).abs().max()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    same = want == got
    rec.update(prompt=list(prompt_BT.shape), new_tokens=n_new, tokens_equal=bool(same.all()),
               first_difference=None if same.all() else int((~same).any(0).nonzero()[0]),
               max_logit_diff=float(diff))
    if not same.all():
        raise AssertionError(f"greedy tokens differ from the CPU's from position {rec['first_difference']} "
                             f"(max logit difference {rec['max_logit_diff']:.3g})")


# ------------------------------------------------------------------------------------------- main

def checks() -> dict:
    from gpu_check_nccl import check_nccl_smoke
    from gpu_check_offload import check_offload
    from gpu_check_syncs import check_syncs
    from gpu_check_train import check_train_d768, check_train_demo

    return {"train_demo": check_train_demo, "train_d768": check_train_d768, "hashing": check_hashing,
            "offload": check_offload, "generate": check_generate, "syncs": check_syncs,
            "nccl_smoke": check_nccl_smoke}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    ap.add_argument("--tiny", action="store_true", help="every check shrunk to seconds (a dry run of the script)")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON file, rewritten after every check")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these checks only (default: all)")
    ap.add_argument("--table-gb", type=float, default=None,
                    help="offload check's table size in GB (default 10; --tiny: 0.004)")
    ap.add_argument("--workdir", default=None, help="scratch space for run dirs and the store (default: a temp dir)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    table = {name: fn for name, fn in checks().items() if not args.only or name in args.only}
    unknown = sorted(set(args.only or ()) - set(checks()))
    if unknown:
        ap.error(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(checks())}")
    table_gb = args.table_gb if args.table_gb is not None else (0.004 if args.tiny else 10.0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=args.workdir))
    report = Report(out, machine_info(device), {"device": str(device), "tiny": args.tiny, "table_gb": table_gb,
                                                "workdir": str(workdir)})
    ctx = Context(device, args.tiny, workdir, table_gb)
    try:
        for name, fn in table.items():
            report.run(name, fn, ctx)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = [c["name"] for c in report.data["checks"] if c["status"] == "failed"]
    print(f"[gpu_check] wrote {out}; failed: {', '.join(failed) or 'none'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    # The check modules import `gpu_check` (Skip, synchronize): let that be this very module, or a
    # Skip they raise would be another class than the one `Report.run` catches.
    sys.modules.setdefault("gpu_check", sys.modules[__name__])
    sys.exit(main())
