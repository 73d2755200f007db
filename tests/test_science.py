"""The experiments' machinery: grids and their iso-parameter accounting, a resumable sweep, the report."""

import gzip
import json
import math
import shutil

import numpy as np
import pytest

from engram.config import ConfigError
from engram.model.params import count_params
from engram.science import grids, report, verdicts
from engram.science.sweep import execute, plan, status
from engram.science.worker import RESULT

# ------------------------------------------------------------------------------------------------ grids


@pytest.mark.parametrize("preset", ["quick", "full"])
def test_alloc_grid_is_iso_parameter(preset):
    specs = grids.build_grid("alloc", preset)
    sc = grids.scale(preset)
    assert sorted({s.point["rho"] for s in specs}) == sorted(sc.rhos)
    assert {s.seed for s in specs} == set(sc.seeds)
    moe = count_params(grids.moe_model(sc.base))
    for s in specs:
        p = count_params(s.config.model)
        assert abs(p["total"] - moe["total"]) / moe["total"] < 0.005, s.name
        assert abs(p["activated_per_token"] - moe["activated_per_token"]) / moe["activated_per_token"] < 0.005, s.name
        m = s.config.model
        if s.point["rho"] < 1:  # rho is the share of the inactive expert budget kept in experts
            E, k = sc.base.model.n_routed_experts, m.moe_top_k
            assert (m.n_routed_experts - k) / (E - k) == pytest.approx(s.point["rho"])
            assert p["memory"] > 0
        assert s.config.train.threads == grids.SWEEP_THREADS
    if preset == "full":  # no smaller than the demo's model, 3 seeds, 7 points
        from engram.train.config import run_preset

        assert len(sc.rhos) >= 7 and len(sc.seeds) >= 3
        assert moe["total"] == count_params(grids.moe_model(run_preset("demo")))["total"]


def test_runs_are_named_by_config_and_shared_between_experiments():
    ids = {e: {s.name: s.run_id for s in grids.build_grid(e, "full", prose=["p"])} for e in grids.EXPERIMENTS}
    for e, named in ids.items():
        assert len(set(named.values())) == len(named), e  # every point of a sweep is its own run
    # rho = 0.8 at layer 1 is the ablations' reference, the layer sweep's layer 1, the tokens' 1x point
    assert ids["alloc"]["rho0.80-seed1"] == ids["ablations"]["reference-seed1"] == ids["layers"]["layer1-seed1"]
    assert ids["tokens"]["default-x1-engram-seed2"] == ids["alloc"]["rho0.80-seed2"]
    assert ids["tokens"]["default-x1-moe-seed0"] == ids["alloc"]["rho1.00-seed0"]
    assert ids["tokens"]["prose-x1-moe-seed0"] != ids["alloc"]["rho1.00-seed0"]  # another corpus


def test_scaling_grid_spans_64x_on_a_fixed_backbone():
    specs = grids.build_grid("scaling", "full")
    slots = sorted({s.point["slots"] for s in specs if s.point["model"] == "engram"})
    assert len(slots) >= 5 and slots[-1] / slots[0] >= 64
    backbones = {json.dumps({**s.config.model.to_dict(), "engram": None}, sort_keys=True) for s in specs}
    assert len(backbones) == 1  # only the memory changes


def test_ablations_change_one_thing():
    sc = grids.scale("full")
    ref = grids.ablation_model(sc, "reference")
    for name, (kind, changes) in grids.ABLATIONS.items():
        m = grids.ablation_model(sc, name)
        if kind == "switch":
            assert {k: v for k, v in m.engram.to_dict().items() if ref.engram.to_dict()[k] != v} == changes, name
            assert {**m.to_dict(), "engram": None} == {**ref.to_dict(), "engram": None}, name
        elif kind == "layout":
            for k, v in changes.items():
                assert getattr(m.engram, k) == v
            mem_ref, mem = count_params(ref)["memory"], count_params(m)["memory"]
            assert abs(mem - mem_ref) / mem_ref < 0.01, name  # the same memory budget
        else:
            assert m.hc_mult == grids.HC_BRANCHES
    assert grids.ablation_model(sc, "hc4-shared-gate").engram.branch_gates == "shared"


def test_grid_errors():
    with pytest.raises(ConfigError, match="unknown experiment"):
        grids.build_grid("nope", "quick")
    with pytest.raises(ConfigError, match="unknown sweep preset"):
        grids.build_grid("alloc", "huge")
    with pytest.raises(ConfigError, match="prose corpus"):
        grids.build_grid("tokens", "quick")
    with pytest.raises(ConfigError, match="whole"):
        grids.experts_left(grids.scale("full").base.model, 0.85)


# ------------------------------------------------------------------------------------------- the sweep

def test_a_sweep_plans_the_same_run_ids_in_every_clone(tmp_path, make_corpus, monkeypatch):
    """Corpus paths inside the current directory are recorded relative to it: two clones at different
    places plan the same run ids and write no path of the machine into the records they commit."""
    ids = []
    for clone in ("a", "deeper/b"):
        root = tmp_path / clone
        make_corpus(root / "corpus", n_files=3)
        monkeypatch.chdir(root)
        sweep_dir, specs = plan("sci", "alloc", "tiny", seeds=[0], data=["corpus"], out=lambda *_: None)
        rec = json.loads((sweep_dir / "sweep.json").read_text())
        assert rec["data"] == ["corpus"] and str(tmp_path) not in (sweep_dir / "sweep.json").read_text()
        spec = json.loads((root / "sci" / "runs" / specs[0].run_id / "spec.json").read_text())
        assert spec["config"]["data"]["data"] == ["corpus"]
        ids.append([s.run_id for s in specs])
    assert ids[0] == ids[1]
    outside = tmp_path / "elsewhere"
    make_corpus(outside, n_files=3)
    _, specs = plan("sci", "alloc", "tiny", seeds=[0], data=[str(outside)], out=lambda *_: None)
    assert specs[0].config.data.data == [str(outside.resolve())]  # outside the clone: absolute


def test_dry_run_and_status_change_no_file(tmp_path, make_corpus, monkeypatch, capsys):
    from engram.cli import main

    monkeypatch.chdir(tmp_path)
    make_corpus(tmp_path / "corpus", n_files=3)
    base = ["sweep", "alloc", "--preset", "quick", "--data", "corpus", "--out", "sci"]
    assert main([*base, "--dry-run"]) == 0 and not (tmp_path / "sci").exists()
    assert "rho1.00-seed0" in capsys.readouterr().out
    assert main([*base, "--status"]) == 0 and "not planned yet" in capsys.readouterr().out
    plan("sci", "alloc", "quick", data=["corpus"], out=lambda *_: None)
    files = sorted((tmp_path / "sci").rglob("*.json"))
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    assert main([*base, "--status"]) == 0
    assert sorted((tmp_path / "sci").rglob("*.json")) == files
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before
    assert capsys.readouterr().out.startswith("done: 0")


def test_a_sweep_on_another_corpus_gets_its_own_folder(tmp_path, make_corpus, monkeypatch, capsys):
    """`--data` plans into ``<experiment>-<preset>-<corpus>-<hash>``: the default corpus's record is left as it
    was, two corpora named alike stay apart, and a folder holding another corpus's sweep is refused."""
    from engram.cli import main
    from engram.config import UserError
    from engram.science.sweep import sweep_name

    monkeypatch.chdir(tmp_path)
    for d in ("prose", "other/prose"):
        make_corpus(tmp_path / d, n_files=3)
    quiet = lambda *_: None  # noqa: E731
    default_dir, _ = plan("sci", "alloc", "tiny", seeds=[0], out=quiet)
    before = (default_dir / "sweep.json").read_bytes()
    prose_dir, _ = plan("sci", "alloc", "tiny", seeds=[0], data=["prose"], out=quiet)
    other_dir, _ = plan("sci", "alloc", "tiny", seeds=[0], data=["other/prose"], out=quiet)
    assert default_dir.name == "alloc-tiny" and prose_dir.name.startswith("alloc-tiny-prose-")
    assert len({default_dir, prose_dir, other_dir}) == 3
    assert (default_dir / "sweep.json").read_bytes() == before
    assert json.loads((prose_dir / "sweep.json").read_text())["data"] == ["prose"]
    assert sweep_name("alloc", "tiny", [str(tmp_path / "prose")]) == prose_dir.name  # absolute or relative alike
    assert main(["sweep", "alloc", "--preset", "quick", "--data", "prose", "--out", "sci", "--status"]) == 0
    assert "not planned yet" in capsys.readouterr().out  # the quick preset's own folder, not the tiny one's
    # a run another sweep planned first keeps its spec as written (a shared run is not renamed)
    spec = default_dir.parent / "runs" / json.loads(before)["runs"][0]["run"].split("/")[-1] / "spec.json"
    spec.write_text(spec.read_text().replace('"name": "', '"name": "first-'))
    kept = spec.read_bytes()
    plan("sci", "alloc", "tiny", seeds=[0], out=quiet)
    assert spec.read_bytes() == kept
    rec = json.loads((prose_dir / "sweep.json").read_text())
    rec["data"] = ["elsewhere"]
    (prose_dir / "sweep.json").write_text(json.dumps(rec))
    with pytest.raises(UserError, match="holds a sweep on data"):
        plan("sci", "alloc", "tiny", seeds=[0], data=["prose"], out=quiet)


def test_sweep_overrides_reach_every_run_and_get_their_own_folder(tmp_path, monkeypatch, capsys):
    """``--set`` changes every run of the grid (both models of each pair) and nothing else, plans into a folder
    of its own (the plain sweep's record untouched), and refuses the settings a sweep fixes itself."""
    from engram.cli import main
    from engram.config import UserError
    from engram.science.sweep import sweep_name

    monkeypatch.chdir(tmp_path)
    quiet = lambda *_: None  # noqa: E731
    plain_dir, plain = plan("sci", "alloc", "tiny", seeds=[0], out=quiet)
    before = (plain_dir / "sweep.json").read_bytes()
    sets = ["model.head_bias=log_prior", "train.lr=0.002"]
    set_dir, changed = plan("sci", "alloc", "tiny", seeds=[0], overrides=sets, out=quiet)
    assert set_dir != plain_dir and set_dir.name.startswith("alloc-tiny-set-head_bias-log_prior-lr-0.002-")
    assert set_dir.name == sweep_name("alloc", "tiny", None, sets)
    assert (plain_dir / "sweep.json").read_bytes() == before
    assert json.loads((set_dir / "sweep.json").read_text())["overrides"] == sets
    assert [s.name for s in changed] == [s.name for s in plain]
    for a, b in zip(plain, changed, strict=True):
        assert a.run_id != b.run_id
        assert b.config.model.head_bias == "log_prior" and b.config.train.lr == 0.002
        da, db = a.config.to_dict(), b.config.to_dict()
        da["model"]["head_bias"], da["train"]["lr"], da["preset"] = "log_prior", 0.002, db["preset"]
        assert da == db  # nothing else moved
    assert count_params(changed[0].config.model)["total"] - count_params(plain[0].config.model)["total"] == \
        plain[0].config.model.vocab_size
    for bad in ("train.threads=2", "data.vocab_size=256", "data.data=['x']"):
        with pytest.raises(ConfigError, match="a sweep sets"):
            plan("sci", "alloc", "tiny", seeds=[0], overrides=[bad], out=quiet)
    with pytest.raises(ConfigError, match="no config field"):
        plan("sci", "alloc", "tiny", seeds=[0], overrides=["model.head_biass=zero"], out=quiet)
    rec = json.loads((set_dir / "sweep.json").read_text())
    rec["overrides"] = ["model.head_bias=zero"]
    (set_dir / "sweep.json").write_text(json.dumps(rec))
    with pytest.raises(UserError, match="with the settings"):
        plan("sci", "alloc", "tiny", seeds=[0], overrides=sets, out=quiet)
    quick_dir, quick = plan("sci", "alloc", "quick", seeds=[0], overrides=["model.head_bias=zero"], out=quiet)
    assert main(["sweep", "alloc", "--preset", "quick", "--out", "sci", "--set", "model.head_bias=zero",
                 "--status"]) == 0  # reads the folder of the sweep with these settings
    assert f"pending: {len(quick)}" in capsys.readouterr().out


def test_a_sweep_planned_again_with_other_seeds_keeps_every_run_it_had(tmp_path, monkeypatch):
    """``--seeds 1`` after ``--seeds 0`` adds seed 1 to the record and drops nothing; the command shown is
    one that plans every run."""
    monkeypatch.chdir(tmp_path)
    quiet = lambda *_: None  # noqa: E731
    d, s0 = plan("sci", "alloc", "tiny", seeds=[0], command="engram sweep alloc --seeds 0", out=quiet)
    _, s1 = plan("sci", "alloc", "tiny", seeds=[1], command="engram sweep alloc --seeds 1", out=quiet)
    rec = json.loads((d / "sweep.json").read_text())
    assert sorted(r["run"].split("/")[-1] for r in rec["runs"]) == sorted(s.run_id for s in s0 + s1)
    assert rec["seeds"] == [0, 1] and rec["command"] == "engram sweep alloc --seeds 0"
    assert rec["commands"] == ["engram sweep alloc --seeds 0", "engram sweep alloc --seeds 1"]
    _, s01 = plan("sci", "alloc", "tiny", seeds=[0, 1], command="engram sweep alloc --seeds 0 1", out=quiet)
    rec = json.loads((d / "sweep.json").read_text())
    assert len(rec["runs"]) == len(s01) and rec["command"] == "engram sweep alloc --seeds 0 1"
    assert {r["name"] for r in rec["runs"]} == {s.name for s in s01}


@pytest.mark.slow
def test_sweep_skips_done_and_resumes_interrupted_runs(tmp_path, make_corpus, monkeypatch):
    from engram.train.config import RunConfig
    from engram.train.trainer import Trainer

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    corpus = make_corpus(tmp_path / "corpus", n_files=20)
    sweep_dir, specs = plan(tmp_path / "sci", "alloc", "tiny", seeds=[0], data=[str(corpus)], out=lambda *_: None)
    rec = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["name"] for r in rec["runs"]] == ["rho1.00-seed0", "rho0.50-seed0"] and rec["git_sha"] is not None
    run_b = sweep_dir / rec["runs"][1]["run"]

    # Interrupt run B after 3 of its 6 steps, as Ctrl-C would (it checkpoints and stops).
    cfg = RunConfig.from_dict(json.loads((run_b / "spec.json").read_text())["config"])
    tr = Trainer(cfg, run_b, progress=False)
    nxt = tr.sampler.next

    def stop_after_three():
        if tr.sampler.step == 3:
            tr._stop = True
        return nxt()

    tr.sampler.next = stop_after_three
    assert tr.train().status == "interrupted"
    assert status(sweep_dir) == {"done": [], "started": ["rho0.50-seed0"], "pending": ["rho1.00-seed0"]}

    lines = []
    assert execute(sweep_dir, jobs=2, out=lines.append) == 0
    assert status(sweep_dir)["done"] == ["rho1.00-seed0", "rho0.50-seed0"]
    res_b = json.loads((run_b / RESULT).read_text())
    assert res_b["threads"] == grids.SWEEP_THREADS and not (run_b / "ckpt").exists()
    assert res_b["table_usage"]["rows_touched_per_step"] > 0 and res_b["gates"]
    assert 0 < res_b["cpu_s"] and 0 < res_b["wall_s"]
    assert 0 < res_b["start_step"] == tr.step < 6  # its times cover the resumed attempt only, and it says so

    # The resumed run ends where an uninterrupted one does.
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(run_b / "spec.json", clean / "spec.json")
    from engram.science.worker import run as run_one

    assert run_one(clean)["val_loss"] == res_b["val_loss"]
    # A second sweep command trains nothing.
    lines.clear()
    assert execute(sweep_dir, out=lines.append) == 0
    assert "0 to train" in lines[0]


def test_a_sweep_trains_started_runs_first_then_seed_by_seed(tmp_path):
    """A sweep stopped part-way leaves whole seeds (each Engram run with its MoE pair), and a resumed one
    finishes what it began before starting anything new."""
    from engram.science.sweep import queue

    d = tmp_path / "tokens-x"
    d.mkdir()
    names = [f"x{b}-{m}-seed{s}" for b in (1, 2) for m in ("moe", "engram") for s in (0, 1, 2)]
    runs = [{"name": n, "seed": int(n[-1]), "run": f"../runs/{n}"} for n in names]
    (d / "sweep.json").write_text(json.dumps({"runs": runs}))
    for n in names:
        (tmp_path / "runs" / n).mkdir(parents=True)
    (tmp_path / "runs" / "x1-moe-seed0" / RESULT).write_text("{}")  # done
    (tmp_path / "runs" / "x2-engram-seed2" / "config.json").write_text("{}")  # started
    order = [n for n, _ in queue(d)]
    assert order == ["x2-engram-seed2", "x1-engram-seed0", "x2-moe-seed0", "x2-engram-seed0",
                     "x1-moe-seed1", "x1-engram-seed1", "x2-moe-seed1", "x2-engram-seed1",
                     "x1-moe-seed2", "x1-engram-seed2", "x2-moe-seed2"]


# ------------------------------------------------------------------------------------------- the report

def _fake_sweep(root, experiment, runs, seeds=(0, 1, 2), folder=None, data=None):
    d = root / (folder or f"{experiment}-fake")
    d.mkdir(parents=True)
    entries = []
    for i, (name, point, seed, loss, extra) in enumerate(runs):
        rd = root / "runs" / f"r{d.name}{i}"
        rd.mkdir(parents=True)
        res = {"val_loss": loss, "tokens": point.get("tokens", 1000), "tokens_per_s": 1.0, "params": {
            "total": 100, "activated_per_token": 10, "memory": 5}, **extra}
        (rd / RESULT).write_text(json.dumps(res))
        entries.append({"name": name, "point": point, "seed": seed, "corpus": point.get("corpus", "default"),
                        "run": f"../runs/r{d.name}{i}"})
    entries.append({"name": "unfinished", "point": dict(runs[0][1]), "seed": 9, "run": "../runs/none"})
    (d / "sweep.json").write_text(json.dumps({"experiment": experiment, "preset": "fake", "git_sha": "abc",
                                              "command": f"engram sweep {experiment}", "data": data,
                                              "seeds": list(seeds), "runs": entries}))
    return d


def test_report_from_a_fake_sweep(tmp_path):
    rng = np.random.default_rng(0)
    noise = lambda: float(rng.normal(0, 0.002))  # noqa: E731
    alloc = [(f"rho{r}-s{s}", {"rho": r, "model": "moe" if r == 1 else "engram"}, s, 3 + (r - 0.7) ** 2 + noise(), {})
             for r in (1.0, 0.9, 0.8, 0.7, 0.6, 0.4, 0.2) for s in range(3)]
    scaling = [(f"n{n}-s{s}", {"slots": n, "model": "engram"}, s, 5 - 0.05 * math.log(n) + noise(), {})
               for n in (1000, 4000, 16000, 64000, 256000) for s in range(3)]
    layers = [(f"l{k}-s{s}", {"layers": k, "n_modules": k.count("+") + 1}, s, 3 + 0.01 * len(k) + noise(), {})
              for k in ("0", "1", "2", "1+3") for s in range(3)]
    abl = [(f"{a}-s{s}", {"ablation": a}, s, 3 + d + noise(), {}) for a, d in
           (("reference", 0), ("gate-fixed-1", 0.1), ("no-short-conv", 0.0005), ("hc4-per-branch", -0.01),
            ("hc4-shared-gate", 0.05)) for s in range(3)]
    def usage(t):  # the rows a step touches are fixed; the updates per row grow with the budget
        return {"table_usage": {"rows_touched_per_step": 5000.0, "updates_per_touched_row_median": 2.0 * t / 1000,
                                "rows_ever_touched_frac": 0.3}, "gates": {"1": {"mean": 0.4, "frac_above_half": 0.2}}}
    tok = [(f"{c}-{t}-{m}-s{s}", {"corpus": c, "tokens": t, "model": m}, s,
            3 - (0.02 * math.log2(t / 1000) if m == "engram" else 0) + noise(), usage(t) if m == "engram" else {})
           for c in ("default", "prose") for t in (1000, 2000, 4000, 8000) for m in ("moe", "engram") for s in range(3)]
    dirs = [_fake_sweep(tmp_path, e, r) for e, r in
            (("alloc", alloc), ("scaling", scaling), ("layers", layers), ("ablations", abl), ("tokens", tok))]
    out = tmp_path / "report"
    md = report.build_report(dirs, out, out=lambda *_: None).read_text()
    for title in report.TITLES.values():
        assert title in md
    for d in dirs:
        name = d.name
        assert (out / f"{name}.png").stat().st_size > 5000
        finished = len(json.loads((d / "sweep.json").read_text())["runs"]) - 1
        assert len((out / f"{name}.csv").read_text().splitlines()) == 1 + finished
    assert "1 unfinished (left out): unfinished" in md and "`engram sweep alloc`" in md and "`abc`" in md
    assert "Lowest mean loss at rho = 0.70" in md and "a U-shape, resolved" in md
    assert "reproduced (falling, R² >= 0.9)" in md and "-0.050" in md.split("ln(slots)")[0][-8:]
    assert "| gate-fixed-1 | reference |" in md and "| hc4-shared-gate | hc4-per-branch |" in md
    assert "Resolved as hurting: gate-fixed-1, hc4-shared-gate" in md
    assert "no-short-conv" in md.split("Not resolved:")[1]
    mech = md.split("Mechanism (default): ")[1].split("\n")[0]
    assert mech.startswith("a step touches 5,000 rows at every budget")
    assert "updated 2 times at 1,000 tokens and 16 at 8,000" in mech
    assert "the mean gate goes 0.400 -> 0.400" in mech and "(more updates, more gain)" in mech
    assert "the gain widens with tokens" in md


def test_report_keeps_a_sweep_per_corpus_apart(tmp_path):
    """Two alloc sweeps, the default corpus and another: each its own CSV, plot and section."""
    runs = [(f"rho{r}-s{s}", {"rho": r, "model": "moe" if r == 1 else "engram"}, s, 3 + r + 0.01 * s, {})
            for r in (1.0, 0.8) for s in range(2)]
    a = _fake_sweep(tmp_path, "alloc", runs, seeds=(0, 1))
    b = _fake_sweep(tmp_path, "alloc", [(n, p, s, loss + 1, x) for n, p, s, loss, x in runs], seeds=(0, 1),
                    folder="alloc-fake-prose-abc123", data=["corpora/prose"])
    c = _fake_sweep(tmp_path, "alloc", [(n, p, s, loss - 1, x) for n, p, s, loss, x in runs], seeds=(0, 1),
                    folder="alloc-fake-set-head_bias-log_prior-def456")
    rec = json.loads((c / "sweep.json").read_text())
    (c / "sweep.json").write_text(json.dumps({**rec, "overrides": ["model.head_bias=log_prior"]}))
    md = report.build_report([a, b, c], tmp_path / "out", out=lambda *_: None).read_text()
    assert "(fake)\n" in md and "(fake, prose)\n" in md and "- data: corpora/prose" in md
    assert "(fake, model.head_bias=log_prior)\n" in md
    csv_a, csv_b = ((tmp_path / "out" / f"{d.name}.csv").read_text() for d in (a, b))
    assert csv_a != csv_b and (tmp_path / "out" / "alloc-fake-prose-abc123.png").is_file()


def test_verdicts_need_two_standard_errors():
    assert verdicts.judge(-0.01, 0.004) == "better"  # large samples: 2 standard errors
    assert verdicts.judge(-0.01, 0.006) == "not resolved at this scale"
    assert verdicts.judge(-0.01, 0.004, df=2) == "not resolved at this scale"  # 3 seeds: t = 4.30
    assert verdicts.judge(-0.01, 0.002, df=2) == "better"
    # one seed has no spread: never counted as resolved, however large the gap
    assert verdicts.judge(0.3, math.nan) == "not resolved, one seed: reads worse"
    assert verdicts.judge(-0.3, math.nan, None, "hurts", "helps").startswith("not resolved")
    # Seeds share their batches: a constant per-seed gap is resolved though the seeds spread widely.
    a = [{"seed": s, "val_loss": 3 + 0.3 * s} for s in range(3)]
    b = [{"seed": s, "val_loss": 3 + 0.3 * s + 0.01 + 0.001 * s} for s in range(3)]
    d, se, df = verdicts.diff(b, a)
    assert d == pytest.approx(0.011) and df == 2 and verdicts.judge(d, se, df) == "worse"
    d, se, df = verdicts.diff(b[:2], a)  # other seeds: a difference of means, not resolved
    assert df == 1 and verdicts.judge(d, se, df) == "not resolved at this scale"
    fit = verdicts.log_fit([{"slots": n, "seed": 0, "val_loss": 2 - 0.1 * math.log(n)} for n in (10, 100, 1000)])
    assert fit["slope"] == pytest.approx(-0.1) and fit["r2"] == pytest.approx(1.0)


def test_a_gain_trend_is_called_only_outside_its_interval():
    x = [0.0, 1.0, 2.0, 3.0]
    assert "the gain widens with tokens (-0.0500" in verdicts._trend(x, [-0.1, -0.15, -0.2, -0.25])
    assert "the gain narrows" in verdicts._trend(x, [-0.25, -0.2, -0.15, -0.1])
    # the token sweep's default corpus against the prior-started baseline: -0.001 nats per doubling is no trend
    assert "no trend with tokens resolved" in verdicts._trend(x, [-0.171, -0.134, -0.1625, -0.1651])
    assert "no trend judged" in verdicts._trend(x[:2], [-0.1, -0.2]) and verdicts._trend(x[:1], [-0.1]) == ""


def test_report_refuses_a_folder_that_is_not_a_sweep(tmp_path):
    from engram.config import UserError

    with pytest.raises(UserError, match="not a sweep directory"):
        report.build_report([tmp_path], tmp_path / "out")


def test_report_appends_probe_sections_with_links_relative_to_the_report(tmp_path):
    probe = tmp_path / "probes" / "lens"
    probe.mkdir(parents=True)
    (probe / "lens.png").write_bytes(b"png")
    (probe / "page.html").write_text("<html></html>")
    (probe / "REPORT.md").write_text("# Probes\n\n## Logit lens\n\n![Logit lens](lens.png)\n\n[page](page.html) "
                                     "[paper](https://arxiv.org/abs/2601.07372) [missing](gone.png)\n")
    out = tmp_path / "report"
    md = report.build_report([probe], out, out=lambda *_: None).read_text()
    assert "## Probes" in md and "### Logit lens (`../probes/lens`)" in md and "# Probes\n\n## Logit" not in md
    assert "![Logit lens](../probes/lens/lens.png)" in md and "[page](../probes/lens/page.html)" in md
    assert "(https://arxiv.org/abs/2601.07372)" in md and "[missing](gone.png)" in md  # left as they were
    assert (out / "../probes/lens/lens.png").resolve().is_file()


# ------------------------------------------------------------------------------------------ prose corpus

@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_man_corpus_renders_dedupes_and_caps_families(tmp_path):
    from engram.data import load_corpus
    from engram.data.manpages import MANIFEST, build_man_corpus

    page = (".TH {n} 1\n.SH NAME\n{n} \\- does things\n.SH DESCRIPTION\n"
            + "This tool reads {w} and writes them. " * 12 + "\n")
    man1 = tmp_path / "man" / "man1"
    man1.mkdir(parents=True)
    for n, w in (("alpha", "files"), ("beta", "lines"), ("gamma", "words")):
        (man1 / f"{n}.1.gz").write_bytes(gzip.compress(page.format(n=n, w=w).encode()))
    (man1 / "alias.1.gz").write_bytes(gzip.compress(b".so man1/alpha.1\n"))  # a redirect: skipped
    for i in range(5):  # a generated family: capped
        (man1 / f"sdk_cmd{i}.1").write_text(page.format(n=f"sdk_cmd{i}", w=f"tables{i}"))
    m = build_man_corpus(tmp_path / "corpus", root=tmp_path / "man", sections=("1",), max_per_family=2)
    assert m["pages_seen"] == 9 and m["pages"] == 3 + 2
    text = (tmp_path / "corpus" / "man1" / "beta.1.txt").read_text()
    assert "writes them" in text and "\\-" not in text and ".SH" not in text
    corpus = load_corpus([str(tmp_path / "corpus")])
    names = [d.name for d in corpus.documents]
    assert len(names) == 5 and not any(MANIFEST in n for n in names)
    assert build_man_corpus(tmp_path / "corpus", root=tmp_path / "none") == m  # a complete corpus is reused


def test_run_ids_survive_config_fields_added_later():
    spec = grids.build_grid("alloc", "quick")[1]
    before = spec.run_id
    spec.config.train.init_from = "somewhere/model"  # a later field set: another run
    assert spec.run_id != before
    spec.config.train.init_from = None  # at its default: left out of the id
    assert spec.run_id == before
    spec.config.model.embed_init_std = 0.1
    assert spec.run_id != before
    spec.config.model.embed_init_std = 0.02
    assert spec.run_id == before
