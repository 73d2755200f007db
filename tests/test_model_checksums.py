"""Model directories are checksummed: any changed byte of any file is refused on load, naming the file."""

import json
import shutil
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from engram.model import EngramLM
from engram.model.checksums import MANIFEST_FILE, TensorDigest, read_manifest
from engram.model.persistence import engram_table_key

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("ck") / "model"
    model = tiny.model("bfloat16")
    model.save_pretrained(d, extra_files={"tokenizer/tokenizer.json": b'{"version": "1.0"}',
                                          "tokenizer.txt": b"mistral-sp\n"})
    return d, model


def _copy(saved, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(saved[0], d)
    return d


def _flip(path, pos, n=1):
    data = bytearray(path.read_bytes())
    for i in range(pos, min(pos + n, len(data))):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _tensor_range(path, key):
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    a, b = json.loads(path.read_bytes()[8:8 + n])[key]["data_offsets"]
    return 8 + n + a, 8 + n + b


def test_manifest_covers_every_file_and_every_byte_of_the_weights(saved):
    d, model = saved
    m = read_manifest(d)
    assert sorted(m["files"]) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer.txt",
                                  "tokenizer/tokenizer.json", "vocab.safetensors"]  # tokenizer.json: for AutoTokenizer
    w = m["files"]["model.safetensors"]
    pieces = w["pieces"]
    assert pieces[0]["start"] == 0 and pieces[-1]["end"] == w["size"] == (d / "model.safetensors").stat().st_size
    assert all(a["end"] == b["start"] for a, b in zip(pieces, pieces[1:], strict=False))  # a tiling, no holes
    assert {p["name"] for p in pieces} - {"header", "gap"} == set(model.state_dict()) - {"lm_head.weight"}
    loaded = EngramLM.from_pretrained(d)
    x = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x).logits, model(x).logits)


@given(frac=st.floats(0, 1, exclude_max=True), n=st.sampled_from([1, 4]))
def test_any_changed_bytes_of_the_weights_are_refused(saved, tmp_path_factory, frac, n):
    d = _copy(saved, tmp_path_factory.mktemp("flip"))
    w = d / "model.safetensors"
    _flip(w, int(frac * w.stat().st_size), n)
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupted"):
        EngramLM.from_pretrained(d)


def test_four_bytes_in_a_weight_name_the_tensor(saved, tmp_path):
    d = _copy(saved, tmp_path)
    w = d / "model.safetensors"
    a, _ = _tensor_range(w, "tok_emb.weight")
    _flip(w, a + 8, 4)
    with pytest.raises(ValueError, match="tensor 'tok_emb.weight' does not match"):
        EngramLM.from_pretrained(d)
    with pytest.raises(ValueError, match="tok_emb.weight"):  # read by a tables=False load too
        EngramLM.from_pretrained(d, tables=False)


def test_tables_left_on_disk_are_checked_by_their_reader(saved, tmp_path):
    """A tables=False load does not read the tables, so cannot check them; TensorDigest does it while streaming."""
    d = _copy(saved, tmp_path)
    w = d / "model.safetensors"
    key = engram_table_key(2)
    a, b = _tensor_range(w, key)
    from safetensors import safe_open

    def streamed_ok() -> bool:
        dig = TensorDigest(d, key)
        with safe_open(str(w), framework="pt") as f:
            sl = f.get_slice(key)
            rows = sl.get_shape()[0]
            for i in range(0, rows, 7):
                dig.update(sl[i:min(i + 7, rows)])
        try:
            dig.check()
            return True
        except ValueError:
            return False

    assert streamed_ok()
    _flip(w, (a + b) // 2, 2)
    assert EngramLM.from_pretrained(d, tables=False).cfg == saved[1].cfg
    assert not streamed_ok()
    with pytest.raises(ValueError, match=f"tensor '{key}'"):
        EngramLM.from_pretrained(d)


@pytest.mark.parametrize("rel", ["config.json", "vocab.safetensors", "tokenizer/tokenizer.json", "tokenizer.txt"])
def test_the_other_files_are_verified_too(saved, tmp_path, rel):
    d = _copy(saved, tmp_path)
    _flip(d / rel, 2)
    with pytest.raises(ValueError, match=f"{rel} is corrupted"):
        EngramLM.from_pretrained(d)
    with pytest.raises(ValueError, match=f"{rel} is corrupted"):
        EngramLM.from_pretrained(d, tables=False)


def test_files_added_after_the_save_and_missing_manifest(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "tokenizer" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer_config.json is not covered"):
        EngramLM.from_pretrained(d)
    (d / "tokenizer" / "tokenizer_config.json").unlink()
    (d / "NOTES.md").write_text("files loaders never read are not the model's business")
    EngramLM.from_pretrained(d)
    # No manifest (a save that did not finish, or an older engram): refused, with the way out.
    (d / MANIFEST_FILE).unlink()
    with pytest.raises(ValueError, match="no checksums.json.*re-save"):
        EngramLM.from_pretrained(d)
    EngramLM.from_pretrained(d, verify=False).save_pretrained(d)
    EngramLM.from_pretrained(d)


def test_an_interrupted_save_leaves_a_directory_that_does_not_load(saved, tmp_path, monkeypatch):
    d = _copy(saved, tmp_path)
    import safetensors.torch

    def crash(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="No space"):
        saved[1].save_pretrained(d)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="no checksums.json"):
        EngramLM.from_pretrained(d)


def test_serving_checks_the_tables_it_reads(saved, tmp_path):
    """Export and RAM serving read the tables that their tables=False load left unverified: a changed byte
    in one is refused, and the export leaves no store that opens."""
    from engram.serve import export_tables, open_memory

    d = _copy(saved, tmp_path)
    w = d / "model.safetensors"
    a, b = _tensor_range(w, engram_table_key(0))
    _flip(w, a + (b - a) // 3)
    with pytest.raises(ValueError, match=f"tensor '{engram_table_key(0)}' does not match"):
        export_tables(d, tmp_path / "store")
    assert not (tmp_path / "store" / "manifest.json").exists()
    with pytest.raises(ValueError, match=f"tensor '{engram_table_key(0)}' does not match"):
        open_memory(d, "ram")
    lm = open_memory(saved[0], "ram")  # the intact directory serves
    lm.close()
