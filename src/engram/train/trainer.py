"""The trainer: AdamW for the backbone, a sparse-row optimizer for the memory tables.

Resumable to the bit: batches are a pure function of (seed, step), and a checkpoint carries
model, both optimizers, the sampler position and the RNG state, so a run killed at any step
and resumed from its last checkpoint logs exactly the losses of an uninterrupted run.

This module sets a run up (config, run directory, model, optimizers, resume) and keeps its state
(checkpoints, the error for a diverged run); the step loop is `engram.train.loop`.
"""

from __future__ import annotations

import copy
import sys
import time  # noqa: F401  (kept as engram.train.trainer.time: callers patch the clock the dtype probe reads)
from pathlib import Path

import torch

from engram.atomic import write_json_atomic
from engram.config import ConfigError
from engram.train.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from engram.train.config import RunConfig, check_init_from, saved_tokenizer
from engram.train.deferred import DeferredReads
from engram.train.loop import TrainLoop, TrainResult, lr_at
from engram.train.probe import resolve_dtype
from engram.train.resume import check_same_data, data_facts, load_newest_good, load_run, resume_config
from engram.train.run import MetricsLog, init_run_dir, record_start

__all__ = ["Trainer", "TrainingDiverged", "TrainResult", "lr_at", "prepare_run_data", "resolve_dtype"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _all_finite(p: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """``isfinite(p).all()`` in pieces: a memory table's mask would be a quarter of its size at once."""
    flat = p.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def prepare_run_data(cfg: RunConfig, cache_dir: str | None = None):
    """The `engram.data.DataBundle` that ``cfg.data`` names (tokenised once, then cached)."""
    from engram.data import prepare_data

    return prepare_data(cfg.data.data, cfg.data.tokenizer, vocab_size=cfg.data.vocab_size, cache_dir=cache_dir,
                        val_permille=cfg.data.val_permille)


class Trainer(TrainLoop, DeferredReads):
    """Train one model described by a `RunConfig` into `run_dir`.

    `data` is a prepared `engram.data.DataBundle` (built from `cfg.data` when None). What the
    data and the machine decide (vocabulary size, pad id, ``train.dtype="auto"``, ``train.threads=0``)
    is resolved into the trainer's own copy, ``self.cfg``, which the run directory records; the
    caller's ``cfg`` is never modified, so one config can start several runs.

    ``device`` (see `engram.train.probe.resolve_device`) is recorded with each start in ``meta.json``;
    it is not part of the config, so a resumed run may continue on another device. On a CUDA device
    a step reads nothing back to the host (``defer_reads``): its loss and gradient norm stay on the
    device and are read in one transfer on logging steps (every ``train.log_every`` steps, eval and
    checkpoint steps, the last step), and the finiteness check becomes a device-side flag checked there.

    ``resume=True`` continues the run recorded in `run_dir` with its own recorded config and
    resolved values (see `engram.train.resume`): ``cfg`` may be None ("as recorded") or ask for
    changes, of which only those in `RESUMABLE` are accepted (each reported); the newest checkpoint
    that verifies is loaded, a damaged newer one skipped with a notice. A run killed before its first
    checkpoint restarts from step 0 with the recorded config, which is where it would have been.
    Notices go to stderr and to ``self.notices``.
    """

    def __init__(self, cfg: RunConfig | None, run_dir: str | Path, *, resume: bool = False, data=None,
                 progress: bool = True, device: str | torch.device = "cpu", cache_dir: str | None = None):
        from engram.model import EngramLM
        from engram.model.vocab import model_vocab

        self.run_dir, self.progress, self.notices = Path(run_dir), progress, []
        self.device = torch.device(device)
        # On the CPU a read is free: check every step at once, as it is taken (the golden curve's path).
        self.defer_reads = self.device.type == "cuda"
        self._pending: list[dict] = []  # deferred steps' metrics, values still on the device
        self._finite: torch.Tensor | None = None  # deferred steps' loss and grad norm all finite (device bool)
        ckpt_dir = self.run_dir / "ckpt"
        changes: list[str] = []
        if resume:
            record = load_run(self.run_dir)
            cfg, requested, changes = resume_config(record, cfg)
            for c in changes:
                self.notice(f"--resume changes {c}")
        elif cfg is None:
            raise ValueError("a new run needs a config (cfg=None only resumes a recorded run)")
        else:
            if self._holds_run(ckpt_dir):
                raise CheckpointError(f"{self.run_dir} already holds a run; pass --resume to continue it, or use a "
                                      f"new run dir")
            cfg.validate()
            requested = cfg.to_dict()
        cfg = copy.deepcopy(cfg)
        self.cfg = cfg
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        tc.threads = torch.get_num_threads()  # the run dir records the concrete choices
        tc.dtype = resolve_dtype(tc.dtype, self.device)  # a resumed run's is concrete already: no probe
        if tc.init_from is not None and cfg.data.tokenizer is None:
            cfg.data.tokenizer = saved_tokenizer(tc.init_from)
            self.notice(f"train.init_from: data.tokenizer is the model's own, {cfg.data.tokenizer}")
        self.data = data or self._prepare_data(cfg, cache_dir)
        if resume:
            check_same_data(record, self.data)
        # Resolve what the data decides: vocabulary size and the pad id the hashing pads with.
        cfg.model.vocab_size = self.data.vocab_size
        if cfg.model.engram is not None:
            cfg.model.engram.pad_id = self.data.pad_id
            if tc.engram_optimizer == "dense_adamw":  # AdamW takes dense gradients only
                cfg.model.engram.sparse = False
        cfg.validate()
        for split, tokens in (("train", self.data.train), ("validation", self.data.val)):
            if len(tokens) < tc.seq_len + 1:
                raise ConfigError(f"the corpus's {split} split has {len(tokens)} tokens, fewer than one window of "
                                  f"train.seq_len + 1 = {tc.seq_len + 1}: use a shorter train.seq_len or a larger "
                                  f"corpus")
        if tc.init_from is not None:
            check_init_from(tc.init_from, cfg.model, self.data.tokenizer_spec)
        self.cfg_dict = cfg.to_dict()
        vocab = model_vocab(cfg.model, self.data.tokenizer_spec)
        self._check_setup(vocab)
        state = manifest = None
        if resume:
            state, manifest = self._find_checkpoint(ckpt_dir, changes)

            def write_record() -> None:
                if changes:  # the run's record follows the accepted changes (a later resume keeps them)
                    write_json_atomic(self.run_dir / "resolved.json", {
                        "format": "engram-run-1", "requested": requested, "data": record.data or data_facts(self.data)})
                    write_json_atomic(self.run_dir / "config.json", self.cfg_dict)
                record_start(self.run_dir, resume=manifest.stem if manifest else "step 0", changes=changes,
                             device=str(self.device), **self._start_info())
        else:
            def write_record() -> None:
                init_run_dir(self.run_dir, self.cfg_dict, requested, data_facts(self.data), device=str(self.device),
                             **self._start_info())
        self._write_record(write_record)

        torch.manual_seed(tc.seed)
        model = EngramLM(cfg.model, vocab)
        if tc.init_from is not None and state is None:  # step 0 of a fine-tune; a checkpoint supersedes it
            model.load_state_dict(EngramLM.from_pretrained(tc.init_from).state_dict())
        elif cfg.model.head_bias == "log_prior" and state is None:  # (a checkpoint holds the trained bias)
            import numpy as np

            V = cfg.model.vocab_size
            model.set_head_prior(np.bincount(np.asarray(self.data.train).reshape(-1), minlength=V)[:V])
        self.model = self._build_model(model.to(self.device).compile_engram(tc.compile_engram))
        self.opt, self.table_opt = self._build_optimizers()
        from engram.data import BatchSampler, val_batches

        self.sampler = BatchSampler(self.data.train, tc.batch_size, tc.seq_len, seed=tc.seed)
        self.val = [(x.to(self.device), y.to(self.device))
                    for x, y in val_batches(self.data.val, tc.batch_size, tc.seq_len, tc.eval_tokens)]
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        if state is not None:
            self._load(state)
        self.metrics = self._open_metrics(resume)
        self._stop = False

    # -- hooks a data-parallel trainer overrides (engram.distributed.trainer) ---------------------
    is_main = True  # the process that prints and writes the run's shared files

    def _holds_run(self, ckpt_dir: Path) -> bool:
        return (self.run_dir / "config.json").is_file() or latest_checkpoint(ckpt_dir) is not None

    def _check_setup(self, vocab) -> None:
        """Last checks of the resolved config before anything is written (nothing to check in one process)."""

    def _start_info(self) -> dict:
        """What ``meta.json`` records about this start beyond the defaults."""
        return {}

    def _write_record(self, write) -> None:
        """Run ``write()``, which records the run's start in its directory."""
        write()

    def _build_model(self, model):
        """The model to train, given the freshly built one (here: itself)."""
        return model

    def _count_params(self) -> dict:
        from engram.model.params import count_params

        return count_params(self.model)

    def _table_parameters(self) -> list:
        """The memory-table weights the table optimizer trains."""
        return list(self.model.engram_parameters())

    def _prepare_data(self, cfg: RunConfig, cache_dir: str | None):
        return prepare_run_data(cfg, cache_dir)

    def _should_stop(self) -> bool:
        """Whether to save and stop after this step (Ctrl-C)."""
        return self._stop

    def _open_metrics(self, resume: bool):
        return MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.step if resume else None)

    def notice(self, msg: str) -> None:
        """Tell the user something they should know (stderr), and keep it in ``self.notices``."""
        self.notices.append(msg)
        if self.is_main:
            print(f"[engram.train] {msg}", file=sys.stderr, flush=True)

    def _find_checkpoint(self, ckpt_dir: Path, changes: list[str]) -> tuple[dict | None, Path | None]:
        state, manifest, skipped = load_newest_good(ckpt_dir, self.cfg_dict)
        if skipped and manifest is None:
            raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir} verifies: " + "; ".join(skipped))
        for s in skipped:
            self.notice(f"skipped checkpoint {s}; resuming from the newest intact one, {manifest.stem}")
        if manifest is None:
            self.notice(f"{self.run_dir} has no checkpoint yet (stopped before step {self.cfg.train.ckpt_every}): "
                        f"starting it again from step 0 with its recorded config")
            return None, None
        step = int(state["step"])
        if step > self.cfg.train.steps:
            raise ConfigError(f"--resume: train.steps={self.cfg.train.steps} is below the step of the checkpoint to "
                              f"resume from ({step})")
        return state, manifest

    # -- setup ---------------------------------------------------------------------------------
    def _build_optimizers(self):
        from engram.optim import SparseRowAdam, TorchSparseAdam

        tc = self.cfg.train
        tables = self._table_parameters()
        table_ids = {id(p) for p in tables}
        decay, no_decay = [], []
        for p in self.model.parameters():
            if id(p) in table_ids or not p.requires_grad:
                continue
            (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        table_lr = tc.lr * tc.engram_lr_mult
        table_opt = None
        if tables and tc.engram_optimizer == "dense_adamw":
            groups.append({"params": tables, "weight_decay": 0.0, "lr_mult": tc.engram_lr_mult})
        elif tables and tc.engram_optimizer == "torch_sparse_adam":
            table_opt = TorchSparseAdam(tables, lr=table_lr, betas=(tc.beta1, tc.beta2))
        elif tables:
            table_opt = SparseRowAdam(tables, lr=table_lr, betas=(tc.beta1, tc.beta2), weight_decay=0.0)
        for g in groups:
            g.setdefault("lr_mult", 1.0)
        opt = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=False)
        if table_opt is not None:
            for g in table_opt.param_groups:
                g["lr_mult"] = tc.engram_lr_mult
        return opt, table_opt

    def _state(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "table_opt": self.table_opt.state_dict() if self.table_opt else None,
                "sampler": self.sampler.state_dict(), "torch_rng": torch.get_rng_state(),
                "tokens": self.tokens, "elapsed": self.elapsed}

    def _load(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        if self.table_opt is not None:
            if st["table_opt"] is None:
                raise CheckpointError("checkpoint has no memory-table optimizer state")
            self.table_opt.load_state_dict(st["table_opt"])
        self.sampler.load_state_dict(st["sampler"])
        torch.set_rng_state(st["torch_rng"])
        self.step, self.tokens, self.elapsed = int(st["step"]), int(st["tokens"]), float(st["elapsed"])

    def save(self) -> Path:
        """Checkpoint the current step; a model that is no longer finite is never saved over a good one."""
        bad = next((n for n, p in self.model.named_parameters() if not _all_finite(p)), None)
        if bad is not None:
            raise self._diverged(f"parameter {bad}", "non-finite", step=self.step)
        return save_checkpoint(self.run_dir / "ckpt", self.step, self._state(), self.cfg_dict)

    def save_model(self, directory: Path) -> Path:
        """The trained model plus its tokenizer, so `engram generate --model DIR` needs nothing else;
        the tokenizer files are checksummed with the weights."""
        self.model.save_pretrained(directory, extra_files=self._tokenizer_files())
        return directory

    def _tokenizer_files(self) -> dict:
        """The files that carry the tokenizer next to a saved model."""
        spec = Path(self.data.tokenizer_spec)
        if spec.is_dir():
            return {f"tokenizer/{name}": spec / name
                    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
                    if (spec / name).is_file()}
        return {"tokenizer.txt": (str(self.data.tokenizer_spec) + "\n").encode()}  # a bundled name or one file

    def _diverged(self, what: str, value, step: int | None = None, found_at: int | None = None) -> TrainingDiverged:
        """The error for a non-finite ``what`` at ``step`` (default: the step being taken): the step, the
        likely cause, and the last good checkpoint (untouched: nothing is saved after this). ``found_at``:
        the logging step whose read found it, where reads are deferred (`defer_reads`)."""
        tc, step = self.cfg.train, self.step + 1 if step is None else step
        lr = lr_at(step - 1, tc)
        if "validation" in what and tc.dtype == "bfloat16":
            cause = "bf16 overflow in evaluation (try train.dtype='float32')"
        elif "validation" in what:
            cause = "weights gone non-finite, or validation tokens outside the model's vocabulary"
        elif step == 1:
            cause = ("non-finite values from the very first step: corrupted data or token ids outside the "
                     "vocabulary, or a broken initialisation")
        elif tc.dtype == "bfloat16":
            cause = (f"bf16 overflow (try train.dtype='float32'), or a learning rate too high for this model "
                     f"(lr {lr:.3g} at this step)")
        else:
            cause = (f"a learning rate too high for this model (lr {lr:.3g} at this step): start a new run with a "
                     f"lower train.lr, more train.warmup_steps or a lower train.grad_clip")
        last = latest_checkpoint(self.run_dir / "ckpt")
        good = last.with_suffix(".pt") if last else "none (nothing saved yet)"
        found = "" if found_at is None else (f" (found at logging step {found_at}: on this device values are read "
                                             f"every train.log_every steps, and checkpoints are only written from "
                                             f"a finite model)")
        return TrainingDiverged(f"{what} became {value} at step {step}{found} (dtype {tc.dtype}); likely cause: "
                                f"{cause}. Stopped without saving; last good checkpoint: {good}")
