"""MFU's peak rates: the GPU table looked up by device name (fake names, no CUDA needed), the refusal to
guess for a GPU it does not know, and the trainer reporting MFU from it."""

import json

import pytest
import torch

import engram.train.loop as loop_mod
from engram.train.config import apply_overrides, run_preset
from engram.train.mfu import _GPUS, PeakRate, device_peak, gpu_peak, mfu
from engram.train.run import read_metrics
from engram.train.trainer import Trainer

# What torch.cuda.get_device_name() reports on each card -> the table's name for it.
KNOWN = {
    "NVIDIA H100 80GB HBM3": "NVIDIA H100 SXM",
    "NVIDIA H100 PCIe": "NVIDIA H100 PCIe",
    "NVIDIA H100 NVL": "NVIDIA H100 NVL",
    "NVIDIA H200": "NVIDIA H200 SXM",
    "NVIDIA H200 NVL": "NVIDIA H200 NVL",
    "NVIDIA H800": "NVIDIA H800 SXM",
    "NVIDIA H800 PCIe": "NVIDIA H800 PCIe",
    "NVIDIA GH200 480GB": "NVIDIA GH200",
    "NVIDIA A100-SXM4-80GB": "NVIDIA A100",
    "NVIDIA A100-SXM4-40GB": "NVIDIA A100",
    "NVIDIA A100-PCIE-40GB": "NVIDIA A100",
    "NVIDIA A100 80GB PCIe": "NVIDIA A100",
    "NVIDIA A800-SXM4-80GB": "NVIDIA A800",
    "NVIDIA L40S": "NVIDIA L40S",
    "NVIDIA L40": "NVIDIA L40",
    "NVIDIA L4": "NVIDIA L4",
    "NVIDIA A10": "NVIDIA A10",
    "NVIDIA GeForce RTX 4090": "NVIDIA GeForce RTX 4090",
    "NVIDIA GeForce RTX 3090": "NVIDIA GeForce RTX 3090",
}
# Cut-down or different cards whose names contain a known one: no MFU rather than a neighbour's peak.
UNKNOWN = ["NVIDIA A10G", "NVIDIA GeForce RTX 4090 D", "NVIDIA GeForce RTX 4090 Laptop GPU",
           "NVIDIA GeForce RTX 3090 Ti", "NVIDIA H100", "NVIDIA H20", "Tesla V100-SXM2-16GB", "AMD Instinct MI300X", ""]


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_gpus_get_their_dense_peak(name):
    bf16, tf32, fp32 = gpu_peak(name, "bfloat16"), gpu_peak(name, "float32", tf32=True), gpu_peak(name, "float32")
    label = KNOWN[name]
    assert all(r.basis.startswith(f"{label} dense") for r in (bf16, tf32, fp32))
    assert "bf16" in bf16.basis and "tf32" in tf32.basis and "fp32" in fp32.basis
    # Tensor-core bf16 is twice TF32 on every card in the table, and never below plain FP32.
    assert bf16.flops == pytest.approx(2 * tf32.flops, rel=0.02) and tf32.flops >= fp32.flops > 0
    # The lookup ignores case and runs of spaces, as driver versions spell names differently.
    assert gpu_peak(f"  {name.lower().replace(' ', '  ')} ", "bfloat16") == bf16


def test_table_figures():
    """A few rates checked against the datasheets by hand (dense: half the quoted sparse figure)."""
    assert gpu_peak("NVIDIA H100 80GB HBM3", "bfloat16").flops == 989.5e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "bfloat16").flops == 312e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "float32").flops == 19.5e12
    assert gpu_peak("NVIDIA L40S", "float32", tf32=True).flops == 183e12
    assert len({g[1] for g in _GPUS}) == len(_GPUS)  # one row per card


@pytest.mark.parametrize("name", UNKNOWN)
def test_unknown_gpus_get_no_peak_and_say_why(name):
    for dtype in ("bfloat16", "float32"):
        peak = gpu_peak(name, dtype)
        assert peak.flops is None and "not in engram.train.mfu's table" in peak.basis and repr(name) in peak.basis
        assert mfu(1e9, 1e3, peak) is None


def test_unknown_dtype_gets_no_peak():
    assert gpu_peak("NVIDIA H100 80GB HBM3", "float16").flops is None


def test_device_peak_on_cuda_reads_the_name_and_float32_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-40GB")
    cuda = torch.device("cuda", 0)
    assert device_peak(cuda, "bfloat16").flops == 312e12
    assert device_peak(cuda, "float32").flops == 19.5e12  # torch's default: full-precision fp32 matmuls
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert device_peak(cuda, "float32").flops == 156e12
    assert device_peak("meta", "float32").flops is None


def test_mfu_is_the_share_of_the_peak():
    assert mfu(6e9, 1e4, PeakRate(1.2e14, "x")) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_corpus):
    base = tmp_path_factory.mktemp("mfu")
    from engram.data import prepare_data

    path = make_corpus(base / "corpus")
    return path, prepare_data([str(path)], None, vocab_size=512, cache_dir=base / "cache", progress=False)


@pytest.mark.parametrize("gpu", ["NVIDIA H100 80GB HBM3", "NVIDIA Mystery Card"])
def test_trainer_reports_mfu_from_the_table(corpus, tmp_path, monkeypatch, gpu):
    """The trainer's MFU on a (faked) CUDA card: the table's peak, in the eval records and the result;
    for a card the table lacks, None everywhere and the reason in the summary and the notices."""
    path, data = corpus
    monkeypatch.setattr(loop_mod, "device_peak", lambda device, dtype: gpu_peak(gpu, dtype))
    cfg = apply_overrides(run_preset("debug"), ["train.dtype='float32'", "train.threads=1", "data.vocab_size=512",
                                                "train.steps=4", "train.eval_every=2", "train.ckpt_every=4",
                                                f"data.data={[str(path)]!r}"])
    tr = Trainer(cfg, tmp_path / "run", data=data, progress=False)
    res = tr.train()
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["step"] for r in evals] == [2, 4] and evals[-1]["tokens_per_s"] == pytest.approx(res.tokens_per_s)
    assert summary["mfu"] == res.mfu and summary["mfu_basis"] == res.mfu_basis
    if gpu.startswith("NVIDIA H100"):
        assert res.mfu is not None and 0 < res.mfu < 1e-3  # a tiny model on a CPU, measured against an H100
        assert evals[-1]["mfu"] == pytest.approx(res.mfu) and "H100 SXM dense fp32" in res.mfu_basis
        assert not any("MFU" in n for n in tr.notices)
    else:
        assert res.mfu is None and all(r["mfu"] is None for r in evals)
        assert "'NVIDIA Mystery Card' is not in" in res.mfu_basis
        assert any(n.startswith("MFU not reported:") for n in tr.notices)
