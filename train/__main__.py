"""``python -m train``: one training stage, configured by Hydra (``configs/config.yaml`` and groups).

    python -m train                                   # the tiny model on the stdlib corpus, MoBA
    python -m train moba.block_size=256 moba.top_k=4 data.seq_len=2048 hydra.run.dir=runs/x
    python -m train -m moba.block_size=128,256 moba.top_k=2,3      # a sweep (one run per combination)
    python -m train.compare multirun/<date>/<time>                 # compare its runs (train/compare.py)

A launch stopped by SIGTERM / SIGUSR1 / SIGINT saves a checkpoint and exits with 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM; train/preemption.py); a sweep stops there too.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import (
    ConfigError,
    RunConfig,
    check_known_keys,
    check_override_keys,
    exit_on_bad_setting,
    from_checkpoint_unless_overridden,
    register_configs,
)
from .distributed import quiet_deepspeed, shutdown_distributed, world_from_env
from .preemption import exit_status
from .rundir import EXISTED_BEFORE, claim_run_dir, register_resolvers
from .sweep import register_resolvers as register_sweep_resolvers
from .sweep import sweep_record

register_configs()
register_resolvers()  # ${launch_time:...} in hydra.run.dir: the same directory on every rank
register_sweep_resolvers()  # ${sweep_subdir:...} in hydra.sweep.subdir: short job folders (train/sweep.py)
log = logging.getLogger("train")


def to_run_config(cfg: DictConfig, overrides: Sequence[str] | None = None) -> RunConfig:
    """Typed config (dataclass checks run here, before any data, model or GPU work).

    Args:
        cfg: the composed config. Keys the schema does not have (``+moba.blocksize=64``) are refused.
        overrides: the command-line overrides; when given, the model fields a checkpoint carries and the
            command line does not set become None in ``cfg`` (``from_checkpoint_unless_overridden``).
    Raises:
        ValueError: naming the setting and value that are wrong.
    """
    check_known_keys(cfg)
    if overrides is not None:
        from_checkpoint_unless_overridden(cfg, overrides)
    try:
        return OmegaConf.to_object(cfg)
    except ValueError:
        raise
    except Exception as e:  # OmegaConf wraps errors raised in __post_init__
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ValueError):
            raise cause from None
        raise


def drop_if_untouched(run_dir: Path) -> None:
    """Remove ``run_dir`` when a launch refused before any work left nothing in it but Hydra's job log (the folder
    Hydra made for it), and the parents Hydra made for it that are left empty: repeated mistakes leave no trail of
    empty run folders. A folder with anything else (an earlier run's records or checkpoints), one that existed
    before the launch (``rundir.NotePreexistingRunDir``), and the working directory (or one above it) are kept."""
    try:
        names = {p.name for p in run_dir.iterdir()}
        here = Path.cwd().resolve()
    except OSError:
        return
    resolved = run_dir.resolve()
    existed = EXISTED_BEFORE.get(resolved)
    if names != {"__main__.log"} or resolved == here or resolved in here.parents or existed == resolved:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    if existed is None:  # which parents Hydra made is not known: keep them
        return
    for parent in resolved.parents:
        if parent == existed or parent == here or parent in here.parents:
            break
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break


def ended_together(code) -> bool:
    """Whether a launch that exits with ``SystemExit(code)`` ended on every rank at once: finished (None, 0) or
    stopped by a signal after saving (128 + the signal; the stop is agreed between ranks, train.preemption).
    An error (1, or an "error: ..." text) may be one rank's alone."""
    return code is None or (isinstance(code, int) and not isinstance(code, bool) and (code == 0 or code >= 128))


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return _main(cfg, run_dir)
    except SystemExit as e:
        if isinstance(e.code, str) and e.code.startswith("error: "):  # a refused setting (exit_on_bad_setting)
            drop_if_untouched(run_dir)
        raise


def _main(cfg: DictConfig, run_dir: Path) -> float | None:
    overrides = list(HydraConfig.get().overrides.task)
    with exit_on_bad_setting():
        run_cfg = to_run_config(cfg, overrides)
    if run_cfg.checkpoint.dir:  # recorded absolute in config.json: eval / export / resume= find it from any folder
        run_cfg.checkpoint.dir = cfg.checkpoint.dir = str(Path(run_cfg.checkpoint.dir).expanduser().resolve())
    if world_from_env()[0] == 0:
        for warning in run_cfg.schedule.unused_overrides(overrides):
            log.warning(warning)
    quiet_deepspeed(run_cfg.device)  # before train.loop imports deepspeed
    from .loop import run

    # One launch at a time owns the run directory (and every rank has the same one): train/rundir.py.
    # ConfigError: the directory held by another launch, or a check that needs the world size, the model's shape,
    # the data or the checkpoint (train.loop): "error: ..." without a traceback.
    with exit_on_bad_setting(ConfigError), \
            claim_run_dir(run_dir, Path(run_cfg.checkpoint.dir) if run_cfg.checkpoint.dir else None):
        # config.json keeps the full command-line overrides (and a sweep job's swept settings) beside the config.
        result = run(run_cfg, run_dir, {**OmegaConf.to_container(cfg, resolve=True), **sweep_record()})
    if result.get("preempted"):
        # Stopped by a signal after saving (the loop logged what it saved and how to resume): exit 128 + the
        # signal's number, once the run directory is released, so that whatever chains stages (make train, a
        # script, a sweep) stops here instead of going on without this stage's output.
        raise SystemExit(exit_status(result["signal"]))
    return result.get("val_loss")  # what a Hydra sweeper would optimise


if __name__ == "__main__":
    with exit_on_bad_setting():  # a mistyped key: say so (with the closest setting) before Hydra composes anything
        check_override_keys(sys.argv[1:])
    together = False
    try:
        main()
        together = True
    except SystemExit as e:
        together = ended_together(e.code)
        raise
    finally:  # after every job of a sweep; also when Hydra exits with a job's error
        shutdown_distributed(wait_for_all=together)
