"""Fault injection: a flipped byte, a truncation or a full disk in any file the project writes ends in a clear
error or the clean result, never a silent wrong output; the files saved before stay intact.

Each file kind gets a seeded set of trials; a trial is "error" (the expected error kind, naming the file),
"correct" (output bit-equal to the clean reference) or "silent" (anything else), and no kind may have a
silent trial. ``test_summary`` prints the tally per fault kind.
"""

# Shapes: B batch, T time.

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.config import ConfigError
from engram.model import EngramLM
from engram.serve import export_tables, open_memory
from engram.serve.export import MANIFEST, co_access_layouts, layer_file
from engram.store import native_io
from engram.store.disk import DiskStore
from engram.store.format import StoreFormatError, read_header
from engram.train.checkpoint import CheckpointError, latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

IOS = ["mmap"] + (["direct"] if native_io.available() else [])
TRIALS = 10  # per file kind and fault


# ------------------------------------------------------------------------------------ tally

class Tally:
    """Outcomes per fault kind: ``trials``, ``error`` (detected), ``correct`` (clean result), ``silent``."""

    def __init__(self):
        self.kinds: dict[str, Counter] = {}

    def add(self, kind: str, outcome: str) -> str:
        assert outcome in ("error", "correct", "silent")
        c = self.kinds.setdefault(kind, Counter())
        c["trials"] += 1
        c[outcome] += 1
        return outcome

    def silent(self, kind: str) -> int:
        return self.kinds[kind]["silent"]

    def table(self) -> str:
        rows = [f"{'fault kind':<36} {'trials':>6} {'detected':>8} {'correct':>7} {'silent':>6}"]
        for k, c in self.kinds.items():
            rows.append(f"{k:<36} {c['trials']:>6} {c['error']:>8} {c['correct']:>7} {c['silent']:>6}")
        return "\n".join(rows)


TALLY = Tally()


def trial(kind: str, run, same, errors: tuple, names: str) -> str:
    """Run ``run()`` and record its outcome: an error of ``errors`` whose message contains ``names`` is
    "error"; a result for which ``same(result)`` holds is "correct"; anything else is "silent". An error of
    another kind propagates (a crash is no clear error)."""
    try:
        out = run()
    except errors as e:
        assert names in str(e), f"{kind}: the error does not name {names}: {e}"
        return TALLY.add(kind, "error")
    return TALLY.add(kind, "correct" if same(out) else "silent")


def flip(path: Path, off: int, rng, top: int = 256) -> None:
    """XOR a random nonzero byte below ``top`` into ``path`` at ``off`` (``top=128`` keeps ASCII text ASCII)."""
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ int(rng.integers(1, top))]))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def damaged_copy(src: Path, dest: Path, rel: str, t: int, rng, size: int, label: str) -> tuple[Path, str]:
    """Copy the directory ``src`` to ``dest`` and damage its file ``rel``: trial ``t`` odd truncates it at
    a random length, even flips a random byte; returns the copy and the fault kind ``"LABEL (flip)"``."""
    d = shutil.copytree(src, dest)
    if t % 2:
        truncate(d / rel, int(rng.integers(size)))
        return d, f"{label} (truncated)"
    flip(d / rel, int(rng.integers(size)), rng)
    return d, f"{label} (flip)"


def offsets(rng, lo: int, hi: int, n: int = TRIALS) -> list[int]:
    return sorted(int(o) for o in rng.choice(np.arange(lo, hi), size=min(n, hi - lo), replace=False))


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ stores

@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    s = tiny.Saved(tmp_path_factory.mktemp("faults"), "float32")
    s.layout_dir = export_tables(s.model_dir, s.model_dir.parent / "store-layout",
                                 layouts=co_access_layouts(s.model, s.profile_batches))
    return s


def _serve(saved, store, io):
    def run():
        with open_memory(saved.model_dir, "disk", store, io=io, prefetch=False) as lm, torch.no_grad():
            return lm(saved.idx).logits
    return run


def _same_logits(saved):
    return lambda out: torch.equal(out, saved.logits)


@pytest.mark.parametrize("io", IOS)
def test_row_flips_fail_the_read_of_that_row_or_serve_the_clean_result(saved, tmp_path, io):
    rng = np.random.default_rng(1)
    kind = f"store row data ({io})"
    for t in range(TRIALS):
        store = shutil.copytree(saved.store_dir, tmp_path / f"s{t}")
        lay = int(rng.choice([0, 2]))
        path = store / layer_file(lay)
        h = read_header(path)
        row = int(rng.integers(h.num_rows))
        flip(path, h.data_offset + row * h.row_bytes + int(rng.integers(h.row_bytes)), rng)
        with DiskStore(saved.store_dir / layer_file(lay), io=io) as clean:
            want = clean.gather(torch.tensor([row]))

        def read(path=path, row=row):
            with DiskStore(path, io=io) as s:
                return s.gather(torch.tensor([0, row, row]))[1:2]

        assert trial(kind, read, lambda out, w=want: torch.equal(out, w), (StoreFormatError,), path.name) == "error"
        trial(kind, _serve(saved, store, io), _same_logits(saved), (StoreFormatError,), path.name)
    assert TALLY.silent(kind) == 0


@pytest.mark.parametrize("io", IOS)
def test_header_flips_refuse_to_open(saved, tmp_path, io):
    rng = np.random.default_rng(2)
    kind = f"store header ({io})"
    path0 = saved.store_dir / layer_file(0)
    h = read_header(path0)
    json_end = 24 + len(path0.read_bytes()[24:h.sums_offset].rstrip(b"\0"))
    for t, off in enumerate(offsets(rng, 0, json_end)):
        store = shutil.copytree(saved.store_dir, tmp_path / f"s{t}")
        flip(store / layer_file(0), off, rng)
        trial(kind, _serve(saved, store, io), _same_logits(saved), (ValueError,), layer_file(0))
    assert TALLY.silent(kind) == 0


def test_checksum_region_and_manifest_flips(saved, tmp_path):
    rng = np.random.default_rng(3)
    path0 = saved.store_dir / layer_file(0)
    h = read_header(path0)
    for t, off in enumerate(offsets(rng, h.sums_offset, h.sums_offset + 4 * h.num_rows)):
        store = shutil.copytree(saved.store_dir, tmp_path / f"c{t}")
        flip(store / layer_file(0), off, rng)
        trial("store row checksums", _serve(saved, store, "mmap"), _same_logits(saved), (ValueError,),
              layer_file(0))
    size = (saved.store_dir / MANIFEST).stat().st_size
    for t, off in enumerate(offsets(rng, 0, size)):
        store = shutil.copytree(saved.store_dir, tmp_path / f"m{t}")
        flip(store / MANIFEST, off, rng)
        trial("store manifest.json", _serve(saved, store, "mmap"), _same_logits(saved), (ValueError,), "")
    assert TALLY.silent("store row checksums") == TALLY.silent("store manifest.json") == 0


def test_layout_sidecar_flips_and_truncations(saved, tmp_path):
    rng = np.random.default_rng(4)
    side = sorted(saved.layout_dir.glob("*.npy"))
    assert len(side) == 2
    for t in range(TRIALS):
        store = shutil.copytree(saved.layout_dir, tmp_path / f"s{t}")
        f = store / side[t % 2].name
        size = f.stat().st_size
        if t % 2:
            truncate(f, int(rng.integers(size)))
            kind = "layout sidecar (truncated)"
        else:
            flip(f, int(rng.integers(size)), rng)
            kind = "layout sidecar (flip)"
        trial(kind, _serve(saved, store, "mmap"), _same_logits(saved), (ValueError,), "layout")
    assert TALLY.silent("layout sidecar (flip)") == TALLY.silent("layout sidecar (truncated)") == 0


def test_store_truncations(saved, tmp_path):
    rng = np.random.default_rng(5)
    kind = "store layer file (truncated)"
    for t in range(TRIALS):
        store = shutil.copytree(saved.store_dir, tmp_path / f"s{t}")
        path = store / layer_file(int(rng.choice([0, 2])))
        truncate(path, int(rng.integers(path.stat().st_size)))
        trial(kind, _serve(saved, store, "mmap"), _same_logits(saved), (ValueError,), path.name)
    assert TALLY.silent(kind) == 0


# ------------------------------------------------------------------------------------ model directories

MODEL_FILES = ["model.safetensors", "config.json", "vocab.safetensors", "checksums.json"]


@pytest.mark.parametrize("rel", MODEL_FILES)
def test_model_directory_flips_and_truncations(saved, tmp_path, rel):
    rng = np.random.default_rng(6)
    size = (saved.model_dir / rel).stat().st_size
    for t in range(TRIALS):
        d, kind = damaged_copy(saved.model_dir, tmp_path / f"m{t}", rel, t, rng, size, f"model {rel}")

        def run(d=d):
            with torch.no_grad():
                return EngramLM.from_pretrained(d).eval()(saved.idx).logits

        trial(kind, run, _same_logits(saved), (ValueError,), rel if rel != "checksums.json" else "")
    assert TALLY.silent(f"model {rel} (flip)") == TALLY.silent(f"model {rel} (truncated)") == 0


# ------------------------------------------------------------------------------------ training runs

OVERRIDES = ["train.steps=16", "train.ckpt_every=8", "train.eval_every=8", "train.dtype='float32'",
             "train.threads=1", "data.vocab_size=512"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_corpus):
    """A finished 16-step run with checkpoints at steps 8 and 16, and its prepared data."""
    from engram.data import prepare_data
    from engram.train.config import apply_overrides, run_preset
    from engram.train.trainer import Trainer

    base = tmp_path_factory.mktemp("run")
    corpus = make_corpus(base / "corpus", n_files=20)
    data = prepare_data([str(corpus)], None, vocab_size=512, cache_dir=base / "cache", progress=False)
    cfg = apply_overrides(run_preset("debug"), OVERRIDES + [f"data.data={[str(corpus)]!r}"])
    Trainer(cfg, base / "run", data=data, progress=False).train()
    assert sorted(p.name for p in (base / "run" / "ckpt").glob("*.pt")) == ["step-0000008.pt", "step-0000016.pt"]
    return base / "run", data


def _resume(run_dir, data):
    from engram.train.trainer import Trainer

    return Trainer(None, run_dir, resume=True, data=data, progress=False)


def _state(tr) -> tuple:
    """What a resumed trainer continues from: its step, config and weights."""
    return tr.step, json.dumps(tr.cfg_dict, sort_keys=True), {k: v.clone() for k, v in tr.model.state_dict().items()}


def _same_state(want):
    def same(tr):
        got = _state(tr)
        return got[:2] == want[:2] and got[2].keys() == want[2].keys() and \
            all(torch.equal(got[2][k], want[2][k]) for k in want[2])
    return same


@pytest.fixture(scope="module")
def resumed(run):
    """The clean resume states: from step 16 (the latest), and from step 8 (the latest gone)."""
    run_dir, data = run
    latest = _state(_resume(run_dir, data))
    older = shutil.copytree(run_dir, run_dir.parent / "older")
    for p in (older / "ckpt").glob("step-0000016.*"):
        p.unlink()
    (older / "ckpt" / "latest.json").unlink()
    return latest, _state(_resume(older, data))


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(run, resumed, tmp_path):
    run_dir, data = run
    rng = np.random.default_rng(7)
    for rel in ("step-0000016.pt", "step-0000016.json"):
        size = (run_dir / "ckpt" / rel).stat().st_size
        for t in range(TRIALS // 2):
            d, kind = damaged_copy(run_dir, tmp_path / f"{rel}{t}", f"ckpt/{rel}", t, rng, size,
                                   f"checkpoint {Path(rel).suffix}")
            tr = _resume(d, data)
            if _same_state(resumed[0])(tr):  # the flip left the checkpoint as it was (JSON whitespace)
                TALLY.add(kind, "correct")
                continue
            # detected: a notice names the skipped file, and the run continues exactly from step 8
            named = any("step-0000016.pt" in n and "step-0000008" in n for n in tr.notices)
            TALLY.add(kind, "error" if named and _same_state(resumed[1])(tr) else "silent")
    for k in [k for k in TALLY.kinds if k.startswith("checkpoint")]:
        assert TALLY.silent(k) == 0, k


def test_a_damaged_only_checkpoint_is_an_error(run, resumed, tmp_path):
    run_dir, data = run
    rng = np.random.default_rng(8)
    kind = "only checkpoint .pt"
    for t in range(TRIALS // 2):
        d = shutil.copytree(run_dir, tmp_path / f"r{t}")
        for p in (d / "ckpt").glob("step-0000008.*"):
            p.unlink()
        pt = d / "ckpt" / "step-0000016.pt"
        if t % 2:
            truncate(pt, int(rng.integers(pt.stat().st_size)))
        else:
            flip(pt, int(rng.integers(pt.stat().st_size)), rng)
        assert trial(kind, lambda d=d: _resume(d, data), _same_state(resumed[0]), (CheckpointError,),
                     "step-0000016.pt") == "error"


def test_run_config_flips_and_truncations(run, resumed, tmp_path):
    run_dir, data = run
    rng = np.random.default_rng(9)
    for rel in ("config.json", "resolved.json"):
        size = (run_dir / rel).stat().st_size
        for t in range(TRIALS):
            d, kind = damaged_copy(run_dir, tmp_path / f"{rel}{t}", rel, t, rng, size, f"run {rel}")
            trial(kind, lambda d=d: _resume(d, data), _same_state(resumed[0]), (CheckpointError, ConfigError),
                  "")
    for k in [k for k in TALLY.kinds if k.startswith("run ")]:
        assert TALLY.silent(k) == 0, (k, TALLY.kinds[k])


def test_a_non_utf8_byte_in_the_latest_manifest_falls_back(run, resumed, tmp_path):
    run_dir, data = run
    d = shutil.copytree(run_dir, tmp_path / "r")
    man = d / "ckpt" / "step-0000016.json"
    man.write_bytes(man.read_bytes().replace(b'"format"', b'\xcbformat"'))
    tr = _resume(d, data)
    assert _same_state(resumed[1])(tr) and any("step-0000016.pt" in n for n in tr.notices)


# ------------------------------------------------------------------------------------ full disk

FULL_DISK = """
import json, resource, signal, sys, traceback
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-limit write then fails with EFBIG, as on a full disk
import torch
from engram.serve import export_tables
from engram.serve.export import co_access_layouts
from engram.model import EngramLM
from engram.train.checkpoint import save_checkpoint
args = json.loads(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
out = []
for limit, dest in zip(args["limits"], args["outs"]):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        if args["op"] == "export":
            m = EngramLM.from_pretrained(args["model"])
            export_tables(m, dest, layouts=co_access_layouts(m, [torch.tensor(args["batch"])]))
        else:
            save_checkpoint(dest, 24, {"model": {"w": torch.arange(args["numel"], dtype=torch.float32)}},
                            {"model": {}}, keep=2)
        err = None
    except OSError as e:
        err = f"{type(e).__name__}: {e}"
    except Exception:
        err = "CRASH " + traceback.format_exc()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    out.append(err)
print(json.dumps(out))
"""


def _full_disk(args: dict) -> list:
    r = subprocess.run([sys.executable, "-c", FULL_DISK, json.dumps(args)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _disk_trials(kind, tree, args, sizes, rng, intact):
    """Run the write into copies of ``tree`` under seeded file-size limits below the largest file it writes:
    each must fail with an OSError naming the file, and ``intact(before, copy)`` must hold after it."""
    before = tree_bytes(tree)
    args["limits"] = offsets(rng, 1, max(sizes), 6)
    args["outs"] = [str(shutil.copytree(tree, tree.parent / f"{tree.name}-{i}")) for i in range(6)]
    for limit, dest, err in zip(args["limits"], args["outs"], _full_disk(args), strict=True):
        assert err is not None and not err.startswith("CRASH"), (limit, err)
        assert "File too large" in err and Path(dest).name in err, err  # (an export names its staging copy)
        TALLY.add(kind, "error" if intact(before, Path(dest)) else "silent")
    assert tree_bytes(tree) == before
    assert TALLY.silent(kind) == 0, f"{kind}: an interrupted write left files that serve something else"


def test_a_full_disk_during_export_keeps_the_earlier_store(saved, tmp_path, tiny):
    """Exporting over a store writes the new one next to it and swaps it in at the end: a failed export
    leaves the earlier store byte-identical and no staging directory behind."""
    other = tiny.model(seed=1).save_pretrained(tmp_path / "other")
    store = shutil.copytree(saved.layout_dir, tmp_path / "store")

    def intact(before, dest):
        staging = list(Path(dest).parent.glob(f".{Path(dest).name}.export-*"))
        return tree_bytes(dest) == before and not staging

    _disk_trials("full disk: export", store, {"op": "export", "model": str(other),
                                              "batch": saved.profile_batches[0].tolist()},
                 [p.stat().st_size for p in store.iterdir()], np.random.default_rng(10), intact)
    with open_memory(saved.model_dir, "disk", store) as lm, torch.no_grad():
        assert torch.equal(lm(saved.idx).logits, saved.logits)


def test_a_full_disk_during_checkpoint_save_keeps_the_earlier_checkpoints(run, tmp_path):
    run_dir, _ = run
    ckpt = shutil.copytree(run_dir / "ckpt", tmp_path / "ckpt")
    numel = 200_000

    def intact(before, dest):
        return tree_bytes(dest) == before and latest_checkpoint(dest).name == "step-0000016.json"

    _disk_trials("full disk: checkpoint save", ckpt, {"op": "ckpt", "numel": numel}, [4 * numel],
                 np.random.default_rng(11), intact)



@pytest.mark.parametrize("key", ['"lr": ', '"batch_size": '])
def test_a_changed_train_value_in_the_run_config_is_refused(run, resumed, tmp_path, key):
    run_dir, data = run
    text = (run_dir / "config.json").read_text()
    j = text.index(key) + len(key)
    d = shutil.copytree(run_dir, tmp_path / "r")
    (d / "config.json").write_text(text[:j] + "7" + text[j + 1:])  # one byte: a digit
    try:
        tr = _resume(d, data)
    except (CheckpointError, ConfigError) as e:
        assert "config" in str(e)
        return
    name = key.strip(": ").strip('"')
    assert _same_state(resumed[0])(tr), f"resumed with {name}={tr.cfg_dict['train'][name]}"


def test_summary(saved, run, resumed, tiny, tmp_path_factory):
    """The tally of every fault kind; run alone (``pytest -s -k summary``) it runs the trials first."""
    if not TALLY.kinds:
        tmp = tmp_path_factory.mktemp
        for io in IOS:
            test_row_flips_fail_the_read_of_that_row_or_serve_the_clean_result(saved, tmp("rows"), io)
            test_header_flips_refuse_to_open(saved, tmp("header"), io)
        test_checksum_region_and_manifest_flips(saved, tmp("sums"))
        test_layout_sidecar_flips_and_truncations(saved, tmp("layout"))
        test_store_truncations(saved, tmp("trunc"))
        for rel in MODEL_FILES:
            test_model_directory_flips_and_truncations(saved, tmp("model"), rel)
        test_a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(run, resumed, tmp("ckpt"))
        test_a_damaged_only_checkpoint_is_an_error(run, resumed, tmp("only"))
        test_run_config_flips_and_truncations(run, resumed, tmp("cfg"))
        test_a_full_disk_during_export_keeps_the_earlier_store(saved, tmp("fd"), tiny)
        test_a_full_disk_during_checkpoint_save_keeps_the_earlier_checkpoints(run, tmp("fdc"))
    print("\n" + TALLY.table())
    assert len(TALLY.kinds) >= 20 and all(c["silent"] == 0 for c in TALLY.kinds.values())
