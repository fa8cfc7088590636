"""The run directory: every rank agrees on it, one launch at a time owns it, and it keeps every launch's config.

- ``launch_time`` (the OmegaConf resolver ``${launch_time:<strftime pattern>}`` that the default
  ``hydra.run.dir`` uses): the start time of the launch, the same on every rank. Hydra's own ``${now:...}``
  is read by each process when it starts, so under torchrun two ranks can get directories a second apart.
  Here rank 0 decides and shares its time through the key-value store torchrun's agent hosts for its
  workers; ``MOBA_LAUNCH_TIME`` (seconds since the epoch) set by a launcher wins over both.
- ``claim_run_dir``: global rank 0 holds ``<run dir>/run.lock`` (host, pid, start time, command) for the whole
  launch; a second launch into a directory whose holder is alive stops before it touches metrics,
  checkpoints or wandb, naming the directory and the holder. A lock whose process is gone (same host), or
  that an earlier attempt of the same SLURM job / torchrun run left, is stale and taken over with a warning.
  Under torchrun every rank learns rank 0's directory and lock status, and stops if they differ.
- ``check_same_run_dir``: after the process group exists, every rank compares its run directory with rank
  0's (catches launchers without torchrun's store).
- ``record_config``: ``config.json`` (this launch's resolved config) and ``config-history/`` (one file per
  launch that got past the resume checks), and a log line naming every setting changed since the checkpoint
  a launch resumes from (``moba.top_k 3 -> 2``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import itertools
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from .config import ConfigError
from .distributed import world_from_env

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
LAUNCH_TIME_ENV = "MOBA_LAUNCH_TIME"
HISTORY_DIR = "config-history"
_STORE_TIMEOUT_S = 900  # how long ranks wait for rank 0's answer (rank 0 may still be importing)

_launch_time: float | None = None
_claims = itertools.count()


def launch_store():
    """A client of the key-value store that torchrun's agent hosts for its workers (at ``MASTER_ADDR:
    MASTER_PORT`` when ``TORCHELASTIC_USE_AGENT_STORE=True``), or None outside torchrun."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=dt.timedelta(seconds=_STORE_TIMEOUT_S))
    # One namespace per attempt: torchrun restarts the workers with a new TORCHELASTIC_RESTART_COUNT.
    return dist.PrefixStore(f"moba/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def agreed_launch_time() -> float:
    """Seconds since the epoch at which this launch started, the same on every rank (cached per process):
    ``$MOBA_LAUNCH_TIME`` when set, else rank 0's clock, shared through torchrun's store; a process outside
    torchrun uses its own clock.

    Raises:
        ValueError: ``MOBA_LAUNCH_TIME`` is not a number.
    """
    global _launch_time
    if _launch_time is None:
        env = os.environ.get(LAUNCH_TIME_ENV)
        if env:
            try:
                _launch_time = float(env)
            except ValueError:
                raise ConfigError(f"{LAUNCH_TIME_ENV}={env!r} must be seconds since the epoch") from None
        else:
            now = time.time()
            rank, world, _ = world_from_env()
            store = launch_store() if world > 1 else None
            if store is not None:
                if rank == 0:
                    store.set("launch_time", repr(now))
                else:
                    now = float(store.get("launch_time").decode())
            _launch_time = now
    return _launch_time


def launch_time(pattern: str) -> str:
    """The resolver ``${launch_time:%Y-%m-%d}``: ``agreed_launch_time()`` formatted with a strftime pattern."""
    return dt.datetime.fromtimestamp(agreed_launch_time()).strftime(pattern)


# Per run folder (resolved): the nearest of itself and its parents that existed before this launch's Hydra made or
# wrote anything; a refused launch removes only what lies below it (``train.__main__.drop_if_untouched``).
EXISTED_BEFORE: dict[Path, Path] = {}


class NotePreexistingRunDir(Callback):
    """Hydra callback (``hydra.callbacks`` in configs/config.yaml): notes which part of the run folder's path
    exists before Hydra makes it, from ``hydra.run.dir`` as Hydra resolves it (interpolations, escapes), in
    ``EXISTED_BEFORE``."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir", throw_on_missing=True))).resolve()
        except Exception:  # noqa: BLE001 - an interpolation only Hydra's job can resolve: nothing noted
            return
        EXISTED_BEFORE[run_dir] = next(p for p in (run_dir, *run_dir.parents) if p.is_dir())


def register_resolvers() -> None:
    """Register ``launch_time`` with OmegaConf (before Hydra composes the config)."""
    OmegaConf.register_new_resolver("launch_time", launch_time, replace=True)


# ---------------------------------------------------------------------------------------------- the lock


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may hold spaces


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def holder_record() -> dict:
    """Who this process is, as written into a lock file."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(), "pid": pid, "proc_start": _proc_start(pid),
        "since": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
        "torchrun_run": os.environ.get("TORCHELASTIC_RUN_ID"),
        "torchrun_restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
    }


def describe(holder: dict) -> str:
    """One line naming a lock's holder."""
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')} "
            f"(command: {holder.get('command')})")


def stale_reason(holder: dict, me: dict) -> str | None:
    """Why the holder of a lock can no longer be running (None when it may be): its process is gone or is
    another process now (same host), or it was an earlier attempt of this SLURM job or torchrun run."""
    if holder.get("host") == me["host"]:
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _pid_alive(pid):
            return f"process {pid} is gone"
        start = holder.get("proc_start")
        if start is not None and _proc_start(pid) not in (None, start):
            return f"process id {pid} now belongs to another process"
    if me["slurm_job"] and holder.get("slurm_job") == me["slurm_job"] and \
            (holder.get("slurm_restart") or 0) < me["slurm_restart"]:
        return f"it was an earlier attempt of SLURM job {me['slurm_job']}"
    if me["torchrun_run"] and holder.get("torchrun_run") == me["torchrun_run"] and \
            (holder.get("torchrun_restart") or 0) < me["torchrun_restart"]:
        return f"it was an earlier attempt of torchrun run {me['torchrun_run']}"
    return None


def _read_lock(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as held by an unknown process
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _guard(directory: Path) -> Iterator[None]:
    """Serialise lock checks on one host (``flock`` on the directory), so that two launches never both take
    over one stale lock. Where the filesystem has no ``flock`` the creation itself is still atomic."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing releases the flock


class RunDirLock:
    """``<directory>/run.lock`` held by this process, for one or more directories (the run directory and a
    ``checkpoint.dir`` outside it). ``setting`` names the override each directory comes from.

    Raises (``acquire``):
        ConfigError (a ValueError): a directory is held by another live launch, naming the directory, the holder
            and the lock file.
    """

    def __init__(self, dirs: list[tuple[str, Path]]):
        self.dirs = dirs
        self.me = holder_record()
        self.held: list[Path] = []

    def acquire(self) -> None:
        try:
            for setting, d in self.dirs:
                self._acquire_one(setting, Path(d))
        except BaseException:
            self.release()
            raise

    def _acquire_one(self, setting: str, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        path = d / LOCK_NAME
        with _guard(d):
            for _ in range(5):
                if self._create(path):
                    self.held.append(path)
                    return
                holder = _read_lock(path)
                if holder is None:
                    continue  # released in between: try again
                if holder.get("host") == self.me["host"] and holder.get("pid") == self.me["pid"]:
                    self.held.append(path)  # left by an earlier run() of this very process
                    return
                reason = stale_reason(holder, self.me) if holder else None
                if reason is None:
                    raise ConfigError(
                        f"{setting}={d} is in use by another launch: {describe(holder) if holder else 'unknown'} "
                        f"holds {path}. Wait for it to end or choose another {setting}; if that launch is "
                        f"gone, delete {path}"
                    )
                log.warning("taking over the stale lock %s of %s: %s", path, describe(holder), reason)
                path.unlink(missing_ok=True)
        raise ConfigError(f"{setting}={d}: could not take the lock {path} (it keeps changing)")

    def _create(self, path: Path) -> bool:
        """Create ``path`` holding this process's record, atomically; False if it exists."""
        tmp = path.with_name(f".{LOCK_NAME}.{self.me['host']}.{self.me['pid']}")
        tmp.write_text(json.dumps(self.me))
        try:
            os.link(tmp, path)  # fails if the lock exists; the lock never appears half written
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me))
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock files this process holds (only if they still name it)."""
        for path in self.held:
            holder = _read_lock(path)
            if holder and holder.get("host") == self.me["host"] and holder.get("pid") == self.me["pid"]:
                path.unlink(missing_ok=True)
        self.held = []

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, ckpt_dir: Path | None = None) -> Iterator[None]:
    """Hold the run directory (and ``ckpt_dir`` when it lies outside it) for the duration of the block.

    Global rank 0 takes the lock. Under torchrun it shares its directory and the outcome through the
    launch's store, so every rank stops with the same message when the directory is taken, and a rank whose
    directory differs from rank 0's stops naming both. Elsewhere the other ranks go on (a launcher stops them
    when rank 0 fails) and ``check_same_run_dir`` compares directories once the process group exists.

    Raises:
        ConfigError (a ValueError): the directory is held by another launch, or this rank's directory is not rank 0's.
    """
    run_dir = Path(run_dir).resolve()
    dirs = [("hydra.run.dir", run_dir)]
    if ckpt_dir is not None:
        ckpt_dir = Path(ckpt_dir).resolve()
        if run_dir not in ckpt_dir.parents and ckpt_dir != run_dir:
            dirs.append(("checkpoint.dir", ckpt_dir))
    rank, world, _ = world_from_env()
    store = launch_store() if world > 1 else None
    key = f"run_dir/{next(_claims)}"  # a Hydra sweep runs its jobs one after another in each process
    lock = None
    if rank == 0:
        lock = RunDirLock(dirs)
        try:
            lock.acquire()
        except Exception as e:
            if store is not None:  # the other ranks stop with the same message
                store.set(key, json.dumps({"dir": str(run_dir), "error": str(e)}))
            raise
        if store is not None:
            store.set(key, json.dumps({"dir": str(run_dir), "error": None}))
    elif store is not None:
        decided = json.loads(store.get(key).decode())
        if decided["error"]:
            raise ConfigError(decided["error"])
        if decided["dir"] != str(run_dir):
            raise ConfigError(f"rank {rank} has hydra.run.dir={run_dir} but rank 0 has {decided['dir']}: every "
                             "rank must get the same hydra.run.dir")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def check_same_run_dir(run_dir: Path) -> None:
    """Collective (every rank calls it once the process group exists): compare this rank's run directory
    with rank 0's.

    Raises:
        ConfigError (a ValueError): on every rank when any rank's directory differs, naming rank 0's and the others'.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    dirs = [None] * dist.get_world_size()
    dist.all_gather_object(dirs, str(Path(run_dir).resolve()))
    other = sorted({(r, d) for r, d in enumerate(dirs) if d != dirs[0]})
    if other:
        raise ConfigError(f"the ranks disagree on hydra.run.dir: rank 0 has {dirs[0]}, "
                         + ", ".join(f"rank {r} has {d}" for r, d in other)
                         + ". Give every rank the same hydra.run.dir (launch with torchrun or set it explicitly)")


# ---------------------------------------------------------------------------------------- config history


def flatten(cfg: dict, prefix: str = "") -> dict:
    """``{"moba": {"top_k": 3}}`` -> ``{"moba.top_k": 3}`` (lists stay values)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Records of where a run keeps things, not settings: they differ whenever a run resumes another run's checkpoint.
NOT_SETTINGS = frozenset({"data_identity.tokenizer_copy"})


def changed_settings(before: dict, after: dict) -> list[str]:
    """Every setting whose value differs between two configs, as ``"key old -> new"`` (``(unset)`` for a
    key only one of them has); the records of ``NOT_SETTINGS`` are left out."""
    a, b = flatten(before), flatten(after)
    return [f"{k} {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b))
            if k not in NOT_SETTINGS and (k not in a or k not in b or a[k] != b[k])]


def record_config(run_dir: Path, run_config: dict, resumed_from: Path | None = None) -> Path:
    """Write this launch's resolved config to ``<run dir>/config.json`` and, kept for good, to
    ``<run dir>/config-history/<n>_<time>.json`` (with the command line and host); when resuming, log every
    setting that differs from the config saved with that checkpoint (``moba.top_k 3 -> 2``). Rank 0 only.
    Returns the history file."""
    if resumed_from is not None:
        saved = Path(resumed_from) / "run_config.json"
        if saved.is_file():
            changes = changed_settings(json.loads(saved.read_text()), run_config)
            if changes:
                log.info("resuming %s with changed settings: %s", resumed_from, "; ".join(changes))
                if any(c.startswith("train.max_steps ") for c in changes):
                    log.info("train.max_steps changed: the cosine LR schedule now runs to the new train.max_steps")
    (run_dir / "config.json").write_text(json.dumps(run_config, indent=2))
    history = run_dir / HISTORY_DIR
    history.mkdir(exist_ok=True)
    n = 1 + max((int(p.name.split("_", 1)[0]) for p in history.glob("*_*.json")
                 if p.name.split("_", 1)[0].isdigit()), default=0)
    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    entry = history / f"{n:03d}_{stamp}.json"
    launch = {"time": stamp, "host": socket.gethostname(), "command": " ".join(sys.argv),
              "resumed_from": str(resumed_from) if resumed_from is not None else None}
    entry.write_text(json.dumps({"launch": launch, "config": run_config}, indent=2))
    return entry
