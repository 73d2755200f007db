"""Hugging Face integration (engram.hf): the directory `engram train` writes loads through the auto classes,
with the native model's logits and greedy decode, and survives a save_pretrained / from_pretrained round trip."""

import json
import subprocess
import sys

import pytest
import torch

from engram.model import EngramLM, generate
from engram.train.config import apply_overrides, run_preset
from engram.train.trainer import Trainer

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

from engram.hf import EngramCache, EngramForCausalLM, EngramHFConfig  # noqa: E402

OVERRIDES = ["train.dtype='float32'", "train.threads=1", "data.vocab_size=512", "train.steps=2",
             "train.eval_every=2", "train.ckpt_every=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_corpus):
    """The model directory of a two-step debug run (Engram at layer 0, a BPE tokenizer saved with it)."""
    base = tmp_path_factory.mktemp("hf")
    corpus = make_corpus(base / "corpus")
    cfg = apply_overrides(run_preset("debug"), OVERRIDES + [f"data.data={[str(corpus)]!r}"])
    Trainer(cfg, base / "run", progress=False).train()
    return base / "run" / "model"


@pytest.fixture(scope="module")
def models(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir), EngramLM.from_pretrained(model_dir).eval()


def ids(B: int, T: int, V: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


REGISTERED = ("from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
              "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING as M\n"
              "cfg = CONFIG_MAPPING['engram']\nprint(cfg.__name__, M[cfg].__name__)")


@pytest.mark.parametrize("first", [
    "import sys, engram\nassert 'transformers' not in sys.modules\nfrom transformers import AutoConfig\n",
    pytest.param("from transformers import AutoConfig\nimport engram\n", marks=pytest.mark.slow),  # registered at once
], ids=["engram-first", "transformers-first"])
def test_import_engram_registers_the_auto_classes(first):
    code = first + "engram.hf.EngramHFConfig()\n" + REGISTERED  # a config registers the model class
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["EngramHFConfig", "EngramForCausalLM"]


def test_auto_classes_load_the_trained_directory(model_dir, models):
    hf, native = models
    cfg = AutoConfig.from_pretrained(model_dir)
    assert isinstance(cfg, EngramHFConfig) and cfg.model_type == "engram"
    assert cfg.to_model_config() == native.cfg
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (native.cfg.d_model, native.cfg.n_layers)
    assert isinstance(hf, EngramForCausalLM) and not hf.training
    assert isinstance(AutoTokenizer.from_pretrained(model_dir), transformers.PreTrainedTokenizerBase)


@pytest.mark.parametrize("B,T,seed", [(1, 1, 0), (2, 17, 1), (3, 64, 2)])
def test_logits_equal_the_native_model(models, B, T, seed):
    hf, native = models
    x = ids(B, T, native.cfg.vocab_size, seed)
    with torch.no_grad():
        out, ref = hf(x), native(x)
    assert torch.equal(out.logits, ref.logits)
    assert out.past_key_values is None  # a plain forward keeps no decode state
    with torch.no_grad():
        assert torch.equal(hf(x, logits_to_keep=1).logits, ref.logits[:, -1:])


def test_labels_follow_the_hf_shift(models):
    hf, native = models
    x = ids(2, 20, native.cfg.vocab_size, 3)
    labels = x.clone()
    labels[0, 5:9] = -100
    with torch.no_grad():
        loss = hf(x, labels=labels).loss
        # ours: targets are the next tokens; HF's labels are the inputs, shifted inside the model
        ref = native(x[:, :-1], labels[:, 1:]).loss
    assert torch.allclose(loss, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("B", [1, 3])
def test_greedy_generate_equals_native_generate(models, B):
    hf, native = models
    x = ids(B, 9, native.cfg.vocab_size, 10 + B)
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)
    assert torch.equal(out, generate(native, x, 12, temperature=0))
    # the decode state (KV cache + hashing window + conv history) changes nothing: a full forward per step agrees
    assert torch.equal(out, hf.generate(x, max_new_tokens=12, do_sample=False, use_cache=False))


def test_sampling_with_a_seed_is_reproducible(models):
    hf, native = models
    x = ids(2, 5, native.cfg.vocab_size, 4)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(hf.generate(x, max_new_tokens=10, do_sample=True, top_k=20, temperature=0.9))
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape == (2, 15) and torch.equal(runs[0][:, :5], x)
    assert int(runs[0].min()) >= 0 and int(runs[0].max()) < native.cfg.vocab_size


def test_beam_search_reorders_the_decode_state(models):
    hf, native = models
    x = ids(2, 6, native.cfg.vocab_size, 5)
    cached = hf.generate(x, max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(cached, hf.generate(x, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False))


def test_left_padding_gives_each_prompt_its_own_logits(models):
    """Padding is a token mask (tests/test_padding.py has the full story); here on the trained model."""
    hf, native = models
    x = ids(2, 6, native.cfg.vocab_size, 6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    with torch.no_grad():
        out = hf(x, attention_mask=mask).logits
        for row, alone in ((out[0], native(x[:1]).logits[0]), (out[1, 2:], native(x[1:, 2:]).logits[0])):
            torch.testing.assert_close(row, alone, atol=1e-5, rtol=1e-5)


def test_the_cache_is_our_decode_state(models):
    hf, native = models
    x = ids(1, 7, native.cfg.vocab_size, 7)
    with torch.no_grad():
        out = hf(x, use_cache=True)
        assert isinstance(out.past_key_values, EngramCache) and out.past_key_values.get_seq_length() == 7
        step = hf(x[:, -1:], past_key_values=out.past_key_values, use_cache=True)
        full = native(torch.cat([x, x[:, -1:]], dim=1)).logits[:, -1]
    assert step.past_key_values.get_seq_length() == 8
    assert torch.allclose(step.logits[:, -1], full, atol=1e-5, rtol=1e-5)


def test_save_pretrained_keeps_each_table_in_its_own_file(models, tmp_path):
    from safetensors import safe_open

    hf, native = models
    hf.save_pretrained(tmp_path / "saved")
    d = tmp_path / "saved"
    layers = native.cfg.engram.layer_ids
    shards = sorted(p.name for p in (d / "tables").iterdir())
    assert [s.split(".")[0] for s in shards] == [f"layer_{i}" for i in layers]  # one file per table
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert not any(".engram.table." in k for k in f.keys())  # the backbone file holds no table
    assert json.loads((d / "config.json").read_text())["model_type"] == "engram"
    x = ids(2, 11, native.cfg.vocab_size, 8)
    with torch.no_grad():
        ref = native(x).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(d)(x).logits, ref)
        assert torch.equal(EngramLM.from_pretrained(d)(x).logits, ref)
    # the tokenizer travelled with it, and the checksums cover the tables
    assert AutoTokenizer.from_pretrained(d).get_vocab() == AutoTokenizer.from_pretrained(hf._source_dir).get_vocab()
    shard = d / "tables" / shards[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="layer_"):
        AutoModelForCausalLM.from_pretrained(d)


def test_pipeline_text_generation(model_dir):
    gen = pipeline("text-generation", model=str(model_dir))
    (out,) = gen("def main(", max_new_tokens=6, do_sample=False)
    assert out["generated_text"].startswith("def main(") and len(out["generated_text"]) > len("def main(")


def test_a_directory_without_model_type(model_dir, tmp_path):
    """Written before config.json named its model type: the native loader and EngramForCausalLM still read it."""
    import shutil

    from engram.model import checksums

    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["model_type"], cfg["architectures"]
    (old / "config.json").write_text(json.dumps(cfg))
    checksums.seal(old)
    native = EngramLM.from_pretrained(old)
    x = ids(1, 5, native.cfg.vocab_size, 9)
    with torch.no_grad():
        assert torch.equal(EngramForCausalLM.from_pretrained(old)(x).logits, native(x).logits)
    with pytest.raises(ValueError, match="model_type"):
        AutoConfig.from_pretrained(old)


def test_a_config_of_another_model_is_refused(model_dir, tmp_path):
    from engram.model.persistence import load_config

    cfg = json.loads((model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' model"):
        load_config(tmp_path)


@pytest.mark.slow
def test_the_cli_run_directory_loads_with_the_auto_classes(tmp_path):
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "engram", "train", "--preset", "debug", "--run-dir", str(run),
                    "--no-progress"], check=True, capture_output=True, timeout=600)
    hf, native = AutoModelForCausalLM.from_pretrained(run / "model"), EngramLM.from_pretrained(run / "model")
    x = ids(2, 8, native.cfg.vocab_size, 11)
    assert torch.equal(hf.generate(x, max_new_tokens=6, do_sample=False), generate(native, x, 6, temperature=0))
    (out,) = pipeline("text-generation", model=str(run / "model"))("def", max_new_tokens=4, do_sample=False)
    assert out["generated_text"].startswith("def")
