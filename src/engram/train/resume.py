"""What `--resume` continues: the run's own recorded config, a few settings that may change, and
the newest checkpoint that verifies.

A run directory records, at its first start, the config as asked for (``requested`` in
``resolved.json``), what was resolved from it (``config.json``: ``dtype="auto"`` made concrete, the
thread count, the vocabulary size and pad id the data decided) and the fingerprints of the data
(corpus split and tokenizer). Resuming reuses all of it, so a run continues bit-exactly however the
machine would probe today; a change to anything but the settings in `RESUMABLE` is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engram.config import ConfigError
from engram.train.checkpoint import CheckpointError, CheckpointMismatch, load_checkpoint
from engram.train.config import RunConfig

# Settings a resumed run may change: when it stops, what it reports and how its ranks hold the backbone
# (the checkpoints reshard either way), never what it computes up to the checkpoint. (``train.steps``
# moves the end of the cosine schedule, so the steps after the checkpoint follow the new schedule: that
# is what extending a run means.)
RESUMABLE = ("train.steps", "train.eval_every", "train.log_every", "train.ckpt_every", "train.backbone_parallel")
RESOLVED_FILE = "resolved.json"
# Data facts that must not change under a resumed run: the batches are a function of the tokens.
DATA_KEYS = ("corpus_fingerprint", "tokenizer_fingerprint", "vocab_size", "train_tokens", "val_tokens")


@dataclass
class RunRecord:
    """What a run directory says about its run (see the module docstring)."""

    run_dir: Path
    config: dict  # resolved: what the trainer runs
    requested: dict  # as asked for at the first start (equal to config for runs that predate the record)
    data: dict  # DATA_KEYS of the data it started with ({} when not recorded)


def load_run(run_dir: str | Path) -> RunRecord:
    """The run recorded in ``run_dir``; CheckpointError when there is none (nothing to resume)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        what = "does not exist" if not run_dir.exists() else "holds no run (no config.json)"
        raise CheckpointError(f"--resume: {run_dir} {what}: nothing to resume; start a run there without --resume")
    try:
        config = json.loads(cfg_path.read_text())
        extra = json.loads((run_dir / RESOLVED_FILE).read_text()) if (run_dir / RESOLVED_FILE).is_file() else {}
        # Through RunConfig: fields added to the config since the run started take their defaults.
        config = RunConfig.from_dict(config).to_dict()
        requested = RunConfig.from_dict(extra.get("requested", config)).to_dict()
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"--resume: the run record in {run_dir} is damaged ({e})") from None
    return RunRecord(run_dir, config, requested, extra.get("data", {}))


def data_facts(data) -> dict:
    """The `DATA_KEYS` of a prepared `DataBundle` (those it knows)."""
    return {k: data.meta[k] for k in DATA_KEYS if k in data.meta}


def check_same_data(record: RunRecord, data) -> None:
    """Refuse to resume on other data than the run started with (other corpus, split or tokenizer)."""
    now = data_facts(data)
    diffs = [f"{k} {record.data[k]!r} then, {now[k]!r} now" for k in DATA_KEYS
             if k in record.data and k in now and record.data[k] != now[k]]
    if diffs:
        raise ConfigError(f"--resume: the data differ from those the run in {record.run_dir} started with "
                          f"({'; '.join(diffs)}): a resumed run needs the same corpus and tokenizer")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _set(d: dict, key: str, value) -> None:
    *path, last = key.split(".")
    for p in path:
        d = d[p]
    d[last] = value


def resume_config(record: RunRecord, asked: RunConfig | None) -> tuple[RunConfig, dict, list[str]]:
    """``(config to run, requested config to record, changes)`` for resuming ``record`` with ``asked``.

    ``asked`` None means "as recorded". A field of ``asked`` equal to the run's requested or resolved
    value is no change (``train.dtype="auto"`` on a run that resolved it to float32 asks for nothing
    new); a change to a field in `RESUMABLE` is applied and listed in ``changes``; any other change
    is a ConfigError naming the field and the run's value.
    """
    config, requested = json.loads(json.dumps(record.config)), json.loads(json.dumps(record.requested))
    if asked is None:
        return RunConfig.from_dict(config), requested, []
    have, req = _flat(config), _flat(requested)
    changes, refused = [], []
    for key, val in sorted(_flat(asked.to_dict()).items()):
        if val == req.get(key, have.get(key)) or (key in have and val == have[key]):
            continue
        if key in RESUMABLE:
            changes.append(f"{key}: {have.get(key)!r} -> {val!r}")
            _set(config, key, val)
            _set(requested, key, val)
        else:
            run_val = have.get(key, req.get(key))
            resolved = f" (resolved from {req[key]!r} at its first start)" if key in req and req[key] != run_val else ""
            refused.append(f"{key} is {run_val!r} in the run{resolved}, asked {val!r}")
    if refused:
        raise ConfigError(f"--resume of {record.run_dir}: cannot change {'; '.join(refused)}. A resumed run keeps "
                          f"its own config; only {', '.join(RESUMABLE)} may change (start a new run for the rest)")
    cfg = RunConfig.from_dict(config)
    cfg.validate()
    return cfg, requested, changes


def _step_of(name: str) -> int:
    try:
        return int(name.removeprefix("step-"))
    except ValueError:
        return -1


def load_newest_good(ckpt_dir: Path, cfg_dict: dict) -> tuple[dict | None, Path | None, list[str]]:
    """``(state, manifest, skipped)`` of the newest checkpoint in ``ckpt_dir`` that verifies.

    Walks back from the newest: a damaged or unfinished checkpoint is skipped and described in
    ``skipped`` ("step-0000016.pt: corrupted: ..."); a checkpoint of another configuration stops the
    walk (CheckpointMismatch: an older one would not fit either). ``(None, None, skipped)`` when
    none verifies.
    """
    names = sorted({p.stem for p in ckpt_dir.glob("step-*.pt")} | {p.stem for p in ckpt_dir.glob("step-*.json")},
                   key=_step_of, reverse=True)
    skipped = []
    for name in names:
        manifest = ckpt_dir / f"{name}.json"
        if not manifest.is_file():
            skipped.append(f"{name}.pt: no manifest (a save that did not finish)")
            continue
        try:
            # train settings too: a run record edited by hand (or a flipped digit in it) must not resume
            # with another lr or batch size; the fields a resume may change are checked by resume_config
            state = load_checkpoint(manifest, cfg_dict, compare_keys=("model", "data", "train"), ignore=RESUMABLE)
            return state, manifest, skipped
        except CheckpointMismatch:
            raise
        except CheckpointError as e:
            skipped.append(f"{name}.pt: {e}")
    return None, None, skipped
