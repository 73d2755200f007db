"""The paper's experiments as grids of training runs: which models, which seeds, which data.

Each experiment (``alloc``, ``scaling``, ``layers``, ``ablations``, ``tokens``) at a preset (``quick``: small
models, few points, minutes; ``full``: models no smaller than the demo's, three seeds or more) expands to a
list of `RunSpec`: a complete `RunConfig` plus the point it measures (``rho``, ``slots``, ``layer``, ...).
Two specs with the same config train the same run, so sweeps that share a point (the allocation sweep's
rho = 0.8 and the ablations' reference, say) share its directory (see `engram.science.sweep`).

Allocation ratio (the paper's rho): the share of the *inactive* sparse budget spent on routed experts,
``rho = (E_left - k) / (E - k)`` for ``E`` routed experts of which ``k`` are active; the rest becomes memory,
sized so total and activated parameters both match the MoE baseline (`iso_engram_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from engram.config import ConfigError, EngramConfig
from engram.train.config import DataConfig, ModelConfig, RunConfig, TrainConfig, apply_overrides

# Config fields added after sweep results were first recorded: left out of a run's id while they hold their
# default, so adding a field to the config never renames (and so retrains) a finished run.
LATER_FIELDS: dict[tuple[str, ...], object] = {("train", "init_from"): None, ("model", "engram", "flavour"): "demo",
                                               ("model", "embed_init_std"): 0.02}

EXPERIMENTS = ("alloc", "scaling", "layers", "ablations", "tokens")
PRESETS = ("quick", "full")
# Thread count of every sweep run: fixed, so a figure never depends on how many runs shared the machine
# (intra-op parallelism changes the order of floating-point sums).
SWEEP_THREADS = 1


@dataclass
class RunSpec:
    """One training run of a sweep: ``point`` holds the experiment's coordinates (JSON values)."""

    experiment: str
    name: str  # unique within the sweep, e.g. "rho0.80-seed1"
    point: dict
    seed: int
    config: RunConfig
    corpus: str = "default"  # "default" or "prose" (the `tokens` experiment runs both)
    keep_model: bool = False  # keep the trained model directory (seed 0 runs, for the probes)

    @property
    def run_id(self) -> str:
        """Name of the run's directory: a readable tag + a hash of everything that decides its result."""
        d = self.config.to_dict()
        for path, default in LATER_FIELDS.items():
            node = d
            for key in path[:-1]:
                node = node.get(key) or {}
            if path[-1] in node and node[path[-1]] == default:
                del node[path[-1]]
        blob = json.dumps(d, sort_keys=True)
        return f"{self.config.preset or 'run'}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@dataclass
class Scale:
    """The model family and budget a preset runs at."""

    base: RunConfig  # the MoE baseline, with the Engram layout template in model.engram
    rhos: list[float]
    slot_sizes: list[int]  # per-head table target sizes of the scaling experiment (geometric)
    layers: list[list[int]]
    token_mults: list[float]  # token budgets as multiples of base.train.steps
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    token_seeds: list[int] | None = None  # the tokens experiment's seeds (None: `seeds`)
    ablation_rho: float = 0.8


def _quick_base() -> RunConfig:
    # 22 routed experts, 2 active: (E - k) = 20 makes every rho in steps of 0.1 a whole number of experts.
    eng = EngramConfig(engram_vocab_size=[20011, 20011], n_embed_per_ngram=128, n_head_per_ngram=4,
                       layer_ids=[1], conv_init="zero", init_std=0.1)
    model = ModelConfig(vocab_size=8192, d_model=128, n_layers=4, n_heads=4, mlp_hidden=384, max_seq_len=128,
                        n_routed_experts=22, n_shared_experts=1, moe_top_k=2, expert_hidden=128,
                        first_dense_layers=1, engram=eng)
    # 32 x 128 tokens a step: with 16 the seeds' losses still spread by ~0.2 nats at the end (noisy plateau).
    train = TrainConfig(steps=120, batch_size=32, seq_len=128, lr=3e-3, warmup_steps=20, eval_every=60,
                        eval_tokens=32768, ckpt_every=60, log_every=10, dtype="float32", compile_engram=False,
                        threads=SWEEP_THREADS)
    return RunConfig(model=model, train=train, preset="sci-quick")


def _full_base() -> RunConfig:
    # The demo's model (d=256, 4 layers, 3 MoE layers) with 32 routed experts, 2 active: (E - k) = 30.
    from engram.train.config import run_preset

    cfg = run_preset("demo")
    cfg.train.threads = SWEEP_THREADS
    cfg.preset = "sci-full"
    return cfg


def _tiny_base() -> RunConfig:
    # For the test suite: seconds per run. 6 routed experts, 2 active: rho in steps of 0.25.
    eng = EngramConfig(engram_vocab_size=[503, 503], n_embed_per_ngram=32, n_head_per_ngram=2, layer_ids=[1],
                       conv_init="zero", init_std=0.1)
    model = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=32,
                        n_routed_experts=6, n_shared_experts=1, moe_top_k=2, expert_hidden=96, first_dense_layers=1,
                        engram=eng)
    train = TrainConfig(steps=6, batch_size=2, seq_len=32, warmup_steps=2, eval_every=3, eval_tokens=256,
                        ckpt_every=3, log_every=3, dtype="float32", compile_engram=False, threads=SWEEP_THREADS)
    return RunConfig(model=model, train=train, data=DataConfig(vocab_size=512), preset="sci-tiny")


def scale(preset: str) -> Scale:
    """The model family, points and seeds of ``preset`` ("quick" or "full"; "tiny" is the test suite's)."""
    if preset == "tiny":
        return Scale(base=_tiny_base(), rhos=[1.0, 0.5], slot_sizes=[101, 401], layers=[[0], [1], [0, 1]],
                     token_mults=[0.5, 1.0], seeds=[0, 1], ablation_rho=0.5)
    if preset == "quick":
        return Scale(base=_quick_base(), rhos=[1.0, 0.8, 0.6, 0.4, 0.2], slot_sizes=[1009, 4001, 16001, 64007],
                     layers=[[0], [1], [2], [3], [1, 3]], token_mults=[0.25, 0.5, 1.0, 2.0], seeds=[0, 1],
                     token_seeds=[0])
    if preset == "full":
        return Scale(base=_full_base(), rhos=[1.0, 0.9, 0.8, 0.7, 0.6, 0.4, 0.2],
                     slot_sizes=[1567, 6257, 25013, 100003, 400009], layers=[[0], [1], [2], [3], [1, 3]],
                     token_mults=[0.25, 0.5, 1.0, 2.0], seeds=[0, 1, 2])
    raise ConfigError(f"unknown sweep preset {preset!r}; valid: {', '.join(PRESETS)}")


# ------------------------------------------------------------------------------ the iso-parameter pair

def experts_left(moe: ModelConfig, rho: float) -> int:
    """Routed experts kept at allocation ratio ``rho``; refuses a rho that is not a whole number of experts."""
    E, k = moe.n_routed_experts, moe.moe_top_k
    exact = k + rho * (E - k)
    left = round(exact)
    if not 0 <= rho <= 1 or abs(exact - left) > 1e-6:
        raise ConfigError(f"rho={rho} is not (E_left - k) / (E - k) for a whole E_left with E={E}, k={k}")
    return left


def moe_model(base: RunConfig) -> ModelConfig:
    m = copy.deepcopy(base.model)
    m.engram = None
    return m


def engram_model(base: RunConfig, rho: float, **template_changes) -> ModelConfig:
    """The iso-parameter Engram variant of ``base``'s MoE at ``rho`` (total and activated within 0.5%)."""
    from engram.model.params import iso_engram_config

    moe = moe_model(base)
    tmpl = dataclasses.replace(base.model.engram, **template_changes)
    moved = moe.n_routed_experts - experts_left(moe, rho)
    try:
        return iso_engram_config(moe, moved, tmpl, match_total=True, match_activated=True)
    except ValueError as e:
        raise ConfigError(f"no iso-parameter Engram variant at rho={rho}: {e}") from e


def _run(base: RunConfig, model: ModelConfig, seed: int, *, steps: int | None = None,
         data: DataConfig | None = None) -> RunConfig:
    cfg = copy.deepcopy(base)
    cfg.model = copy.deepcopy(model)
    cfg.train.seed = seed
    if data is not None:
        cfg.data = copy.deepcopy(data)
    if steps is not None:
        tc = cfg.train
        tc.steps = steps
        tc.warmup_steps = max(1, min(tc.warmup_steps, steps // 5))
        tc.eval_every = tc.ckpt_every = max(1, steps // 3)
        tc.log_every = max(1, min(tc.log_every, steps // 10))
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------------------ the experiments

def _alloc(sc: Scale, data: DataConfig) -> list[RunSpec]:
    out = []
    for rho in sc.rhos:
        model = moe_model(sc.base) if rho == 1 else engram_model(sc.base, rho)
        for s in sc.seeds:
            out.append(RunSpec("alloc", f"rho{rho:.2f}-seed{s}", {"rho": rho, "model": "moe" if rho == 1 else "engram"},
                               s, _run(sc.base, model, s, data=data), keep_model=s == sc.seeds[0]))
    return out


def _scaling(sc: Scale, data: DataConfig) -> list[RunSpec]:
    # The paper's "infinite memory" regime: the whole MoE backbone kept, memory added on top of it.
    out = []
    backbone = moe_model(sc.base)
    for s in sc.seeds:
        out.append(RunSpec("scaling", f"slots0-seed{s}", {"slots": 0, "model": "moe"}, s,
                           _run(sc.base, backbone, s, data=data)))
    for size in sc.slot_sizes:
        eng = sc.base.model.engram
        tmpl = dataclasses.replace(eng, engram_vocab_size=[size] * (eng.max_ngram_size - 1))
        model = dataclasses.replace(backbone, engram=tmpl)
        slots = _slots(model)
        for s in sc.seeds:
            out.append(RunSpec("scaling", f"size{size}-seed{s}", {"slots": slots, "size": size, "model": "engram"},
                               s, _run(sc.base, model, s, data=data)))
    return out


def _slots(model: ModelConfig) -> int:
    from engram.model.params import count_params

    return count_params(model)["memory"] // (model.engram.n_embed_per_ngram // model.engram.n_head_per_ngram)


def _layers(sc: Scale, data: DataConfig) -> list[RunSpec]:
    out = []
    for ids in sc.layers:
        model = engram_model(sc.base, sc.ablation_rho, layer_ids=list(ids))
        tag = "+".join(map(str, ids))
        for s in sc.seeds:
            out.append(RunSpec("layers", f"layer{tag}-seed{s}", {"layers": tag, "n_modules": len(ids)}, s,
                               _run(sc.base, model, s, data=data)))
    return out


# name -> (template changes, re-sized at the same budget) or (switches on the reference, same tables)
ABLATIONS: dict[str, tuple[str, dict]] = {
    "reference": ("switch", {}),
    "no-compression": ("switch", {"compress": False}),
    "gate-fixed-1": ("switch", {"gate": "fixed"}),
    "no-short-conv": ("switch", {"short_conv": False}),
    "2-grams-only": ("layout", {"max_ngram_size": 2}),
    "up-to-4-grams": ("layout", {"max_ngram_size": 4}),
    "one-head-per-order": ("layout", {"n_head_per_ngram": 1}),
    "bf16-table": ("switch", {"table_dtype": "bfloat16"}),
    "hc4-per-branch": ("branches", {}),
    "hc4-shared-gate": ("branches", {"branch_gates": "shared"}),
}
HC_BRANCHES = 4  # the paper's M


def ablation_model(sc: Scale, name: str) -> ModelConfig:
    """The reference Engram variant (rho = sc.ablation_rho) with one thing changed (see `ABLATIONS`).

    A switch (compression, gate, conv, table dtype) changes only that component of the reference, tables
    and backbone as they are; a layout change (orders, heads) re-sizes the tables to the same memory
    budget; the hyper-connection pair runs the reference with ``hc_mult`` = 4 branches, per-branch or one
    shared gate (so the branch ablation is judged against its own 4-branch reference).
    """
    kind, changes = ABLATIONS[name]
    eng = sc.base.model.engram
    if kind == "layout":
        changes = dict(changes)
        n = changes.get("max_ngram_size", eng.max_ngram_size)
        changes["engram_vocab_size"] = [eng.engram_vocab_size[0]] * (n - 1)
        return engram_model(sc.base, sc.ablation_rho, **changes)
    model = engram_model(sc.base, sc.ablation_rho)
    model.engram = EngramConfig.from_dict({**model.engram.to_dict(), **changes})
    if kind == "branches":
        model.hc_mult = HC_BRANCHES
    return model


def _ablations(sc: Scale, data: DataConfig) -> list[RunSpec]:
    out = []
    for name in ABLATIONS:
        model = ablation_model(sc, name)
        for s in sc.seeds:
            out.append(RunSpec("ablations", f"{name}-seed{s}", {"ablation": name}, s,
                               _run(sc.base, model, s, data=data)))
    return out


def _tokens(sc: Scale, data: DataConfig, prose: DataConfig | None) -> list[RunSpec]:
    if prose is None:
        raise ConfigError("the tokens experiment needs a prose corpus (--prose DIR, or let the sweep build one "
                          "from this machine's manual pages)")
    out = []
    models = {"moe": moe_model(sc.base), "engram": engram_model(sc.base, sc.ablation_rho)}
    for corpus, dc in (("default", data), ("prose", prose)):
        for mult in sc.token_mults:
            steps = max(2, round(sc.base.train.steps * mult))
            for kind, model in models.items():
                for s in sc.token_seeds or sc.seeds:
                    cfg = _run(sc.base, model, s, steps=None if mult == 1 else steps, data=dc)
                    out.append(RunSpec("tokens", f"{corpus}-x{mult:g}-{kind}-seed{s}",
                                       {"corpus": corpus, "token_mult": mult,
                                        "tokens": steps * sc.base.train.tokens_per_step,
                                        "model": kind}, s, cfg, corpus=corpus))
    return out


def sweep_overrides(base: RunConfig, overrides) -> RunConfig:
    """``base`` with ``overrides`` applied. The data and the thread count are the sweep's own (``--data``,
    ``--prose``, `SWEEP_THREADS`): overriding them would be silently undone, so it is refused."""
    for ov in overrides:
        key = ov.split("=", 1)[0].strip()
        if key == "data" or key.startswith("data.") or key == "train.threads":
            raise ConfigError(f"sweep override {ov!r}: a sweep sets {key} itself (use --data / --prose for the "
                              f"corpus; every run trains on {SWEEP_THREADS} thread(s))")
    return apply_overrides(base, list(overrides))


def build_grid(experiment: str, preset: str, *, seeds: list[int] | None = None, data: list[str] | None = None,
               prose: list[str] | None = None, vocab_size: int | None = None,
               overrides: list[str] | tuple[str, ...] = ()) -> list[RunSpec]:
    """Every run of ``experiment`` at ``preset``; ``seeds`` replaces the preset's, ``data`` the default corpus
    (the Python standard library), ``prose`` the tokens experiment's second corpus. ``overrides``
    (``section.field=value``) change the preset's base config before any point is derived from it, so every
    run of the grid carries them (e.g. ``model.head_bias=log_prior`` for both models of every pair)."""
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {experiment!r}; valid: {', '.join(EXPERIMENTS)}")
    sc = scale(preset)
    if overrides:
        sc.base = sweep_overrides(sc.base, overrides)
    if seeds is not None:
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ConfigError(f"--seeds must be distinct non-negative integers, got {seeds}")
        sc.seeds, sc.token_seeds = list(seeds), None
    vs = vocab_size or sc.base.data.vocab_size
    dc = DataConfig(data=list(data) if data else None, vocab_size=vs)
    pc = DataConfig(data=list(prose), vocab_size=vs) if prose else None
    if experiment == "tokens":
        return _tokens(sc, dc, pc)
    return {"alloc": _alloc, "scaling": _scaling, "layers": _layers, "ablations": _ablations}[experiment](sc, dc)
