"""Joining a job launched by ``torchrun`` (or by hand), and leaving it cleanly or loudly.

``init_distributed`` reads the environment ``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT). Without it, the process is a world of one and nothing is initialised, so plain
``python -m engram train`` needs no process group. With it, it joins the default process group with a
bounded timeout, opens a second group for the Engram row exchange, and starts a heartbeat `Watchdog` so
that a rank that dies or freezes ends every rank within ``dead_after_s`` instead of hanging them.

A run that succeeds calls `shutdown`; a rank that ends any other way (an exception, an exit without
`shutdown`) tells its peers, which then end at once with a line naming it.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engram.config import ConfigError, UserError
from engram.distributed.output import rank_zero_output
from engram.distributed.watchdog import Watchdog, collective_error_summary

__all__ = ["DEFAULT_DEAD_AFTER_S", "DEFAULT_TIMEOUT_S", "DistContext", "init_distributed", "rank_zero_output",
           "shutdown"]

DEFAULT_TIMEOUT_S = 120.0  # process-group timeout: the second line of defence behind the heartbeats
DEFAULT_DEAD_AFTER_S = 30.0  # a rank silent this long is dead


@dataclass
class DistContext:
    """Where this process stands in the job.

    memory_group: the process group of the Engram row exchange. It is separate from the default group
        so that its all-to-alls never interleave with DDP's bucketed all-reduces on one communicator;
        None in a world of one without a process group.
    backend: ``"gloo"`` or ``"nccl"``; None without a process group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    memory_group: object | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    watchdog: Watchdog | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        """Whether this rank speaks for the job (logs, progress, files written once)."""
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        """Whether this context joined a process group (`shutdown` then leaves it)."""
        return self.backend is not None


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def _seconds(given: float | None, env: str, default: float) -> float:
    if given is None:
        raw = os.environ.get(env, "").strip()
        if not raw:
            return default
        try:
            given = float(raw)
        except ValueError:
            raise ConfigError(f"{env} must be a number of seconds, got {raw!r}") from None
    if not given > 0 or given == float("inf"):
        raise ConfigError(f"{env} must be a positive number of seconds, got {given}")
    return float(given)


def _read_env() -> tuple[int, int, int, str, int] | None:
    """``(rank, world, local_rank, master_addr, master_port)`` from the launcher's environment, or None."""
    has_rank, has_world = "RANK" in os.environ, "WORLD_SIZE" in os.environ
    if not has_rank and not has_world:
        return None
    if has_rank != has_world:
        given, missing = ("RANK", "WORLD_SIZE") if has_rank else ("WORLD_SIZE", "RANK")
        raise ConfigError(f"{given} is set but {missing} is not: launch with torchrun, or set RANK, WORLD_SIZE, "
                          "MASTER_ADDR and MASTER_PORT together")
    rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
    if world < 1:
        raise ConfigError(f"WORLD_SIZE must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK must be in [0, {world - 1}] for WORLD_SIZE={world}, got {rank}")
    local_rank = _int_env("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if local_rank < 0:
        raise ConfigError(f"LOCAL_RANK must be >= 0, got {local_rank}")
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n, "").strip()]
    if missing:
        raise ConfigError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not: they name the rendezvous (rank 0's host "
                          "and a free port)")
    port = _int_env("MASTER_PORT")
    if not 0 < port < 65536:
        raise ConfigError(f"MASTER_PORT must be a TCP port (1-65535), got {port}")
    return rank, world, local_rank, os.environ["MASTER_ADDR"].strip(), port


def _resolve(backend: str, device: str | torch.device | None, local_rank: int) -> tuple[str, torch.device]:
    """The backend and this rank's device: NCCL on a CUDA device picked by LOCAL_RANK, else gloo on the CPU."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    if device is None:
        kind = "cuda" if backend != "gloo" and torch.cuda.is_available() else "cpu"
    else:
        kind = torch.device(device).type
    if backend == "auto":
        backend = "nccl" if kind == "cuda" else "gloo"
    if kind != "cuda":
        if backend == "nccl":
            raise ConfigError("backend 'nccl' needs a CUDA device; use backend 'gloo' on the CPU")
        return backend, torch.device(kind)
    if not torch.cuda.is_available():
        raise ConfigError("a CUDA device was asked for but CUDA is not available on this host")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU: this host shows {count} CUDA device(s); start at "
                          f"most {count} processes per node (torchrun --nproc_per_node) or set LOCAL_RANK")
    torch.cuda.set_device(local_rank)
    return backend, torch.device("cuda", local_rank)


def init_distributed(backend: str = "auto", *, device: str | torch.device | None = None,
                     timeout_s: float | None = None, dead_after_s: float | None = None) -> DistContext:
    """Join the job the environment describes, or return a world of one when there is none.

    Args:
        backend: ``"auto"`` (NCCL when the device is CUDA, else gloo), ``"gloo"`` or ``"nccl"``.
        device: the device this rank computes on (default: its GPU when CUDA is available and the
            backend allows it, else the CPU).
        timeout_s: the process-group timeout (default ``ENGRAM_DIST_TIMEOUT`` or 120 s): a collective
            still waiting after it fails, even where no heartbeat went missing.
        dead_after_s: how long a silent rank has before the others end (default ``ENGRAM_DIST_DEAD_AFTER``
            or 30 s).

    Raises ConfigError for an inconsistent environment (RANK without WORLD_SIZE, a rank out of range,
    no MASTER_ADDR, a LOCAL_RANK without a GPU) before anything is initialised.
    """
    timeout_s = _seconds(timeout_s, "ENGRAM_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)
    dead_after_s = _seconds(dead_after_s, "ENGRAM_DIST_DEAD_AFTER", DEFAULT_DEAD_AFTER_S)
    env = _read_env()
    if env is None:  # a world of one: the device is settled as for a rank, and no group is made
        return DistContext(device=_resolve(backend, device, 0)[1], timeout_s=timeout_s)
    rank, world, local_rank, addr, port = env
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised; call shutdown() first")
    backend, dev = _resolve(backend, device, local_rank)
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except dist.DistError as e:  # the rendezvous did not come together: the environment, not a bug
        text = " ".join(str(e).split())
        raise UserError(f"rank {rank} of {world} could not join the rendezvous at {addr}:{port}: {text}") from e
    ctx = DistContext(rank, world, local_rank, backend, dev, dist.new_group(backend=backend), timeout_s)
    if world > 1:
        ctx.watchdog = _start_watchdog(rank, world, addr, port, dead_after_s, timeout_s)
        _install_hooks(ctx)
    return ctx


def _start_watchdog(rank: int, world: int, addr: str, port: int, dead_after_s: float, timeout_s: float) -> Watchdog:
    # Its own client of the rendezvous store: the default group's client serialises every request behind
    # one lock, which a blocking wait of the main thread (NCCL's communicator setup) would hold.
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    client = dist.TCPStore(addr, port, is_master=False, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=max(10.0, dead_after_s)))
    # keys per launch attempt: torchrun's agent keeps its store across restarts, and an old verdict must
    # not end the new workers
    run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store = dist.PrefixStore(f"engram/watchdog/{run}", client)
    dog = Watchdog(store, rank, world, dead_after_s=dead_after_s, store_host=None if agent else 0,
                   store_addr=(addr, port))
    dog.start()
    return dog


# --- how a rank that does not reach shutdown() tells the others -------------------------------------------
_hooked: list = []  # [ctx, previous sys.excepthook] while installed


def _excepthook(kind, value, tb) -> None:
    ctx, previous = _hooked
    summary = collective_error_summary(value) if value is not None else None
    if summary is not None:  # a peer went away: one line naming it, not a backend traceback
        ctx.watchdog.end(ctx.watchdog.diagnose(summary))
        return
    text = "".join(traceback.format_exception(kind, value, tb))
    try:
        sys.stderr.flush()
    except Exception:
        pass
    os.write(2, "".join(f"[rank {ctx.rank}] {line}\n" for line in text.splitlines()).encode("utf-8", "replace"))
    first = next((ln.strip() for ln in str(value).splitlines() if ln.strip()), "")
    dog = ctx.watchdog
    _remove_hooks()
    dog.publish(f"rank {ctx.rank} failed ({kind.__name__}{': ' + first if first else ''})")
    dog.stop()


def _leave_with(verdict: str) -> None:
    """Publish ``verdict`` (``{rank}`` filled in) as this rank's last word, once; no-op without a job."""
    if _hooked:
        ctx = _hooked[0]
        dog = ctx.watchdog
        _remove_hooks()
        dog.publish(verdict.format(rank=ctx.rank))
        dog.stop()


def _at_exit() -> None:
    _leave_with("rank {rank} exited without calling shutdown()")


def report_failure(message: str) -> None:
    """Tell the other ranks why this rank is about to exit (a user error it has already handled): they end
    with ``rank R failed (message)`` instead of "exited without calling shutdown()". No-op without a job."""
    _leave_with("rank {rank} failed (" + message.replace("{", "{{").replace("}", "}}") + ")")


def _install_hooks(ctx: DistContext) -> None:
    _hooked[:] = [ctx, sys.excepthook]
    sys.excepthook = _excepthook
    atexit.register(_at_exit)


def _remove_hooks() -> None:
    if _hooked:
        sys.excepthook = _hooked[1]
        _hooked.clear()
    atexit.unregister(_at_exit)


def shutdown(ctx: DistContext) -> None:
    """Leave the job after a successful run: mark this rank done, then destroy its process groups.

    Call it once the rank's last collective is done, on every rank. The rank that hosts the rendezvous
    store waits here (up to the process-group timeout) until the others have left, since its exit ends
    the store. A world of one without a process group has nothing to do.
    """
    if ctx.watchdog is not None:
        _remove_hooks()
        ctx.watchdog.finish(ctx.timeout_s)
        ctx.watchdog = None
    if ctx.initialized and dist.is_initialized():
        if ctx.memory_group is not None:
            dist.destroy_process_group(ctx.memory_group)
        dist.destroy_process_group()
    ctx.memory_group = None
