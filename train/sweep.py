"""Sweep job directories: one short folder per job of a Hydra multirun, named after what the sweep varies.

Hydra's default job folder (``hydra.job.override_dirname``) joins every override of the command line, so
a path among them makes nested folders (one per ``/``) and twenty overrides make a name longer than the
file system allows (``OSError: [Errno 36] File name too long``). ``configs/config.yaml`` sets
``hydra.sweep.subdir: ${sweep_subdir:${hydra.job.num}}`` instead: the job number, then the swept keys
only (those given several values, read from the sweep's ``multirun.yaml`` that Hydra's sweeper writes
before any job starts) with this job's values, e.g. ``1_moba.block_size=64,moba.top_k=2``. Values are
sanitised (a path becomes its last component; characters other than letters, digits and ``._+-`` become
``-``) and the name is cut to ``SUBDIR_MAX`` characters with a hash of the whole. The job number keeps
names unique; the job's full overrides are in its ``config.json`` (``overrides``, ``sweep``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from omegaconf import OmegaConf

SUBDIR_MAX = 80  # characters of a job folder's name
VALUE_MAX = 24  # characters of one sanitised value
EXCLUDED = ("hydra.", "resume")  # never part of a job folder's name


def override_key(override: str) -> str:
    """``+moba.top_k=2`` -> ``moba.top_k``."""
    return override.split("=", 1)[0].lstrip("+~").strip()


def sanitise(value: str) -> str:
    """A value as part of a folder name: a path becomes its last component, other characters than letters,
    digits and ``._+-`` become ``-``, at most ``VALUE_MAX`` characters."""
    value = value.strip().strip("'\"")
    if "/" in value:
        parts = [p for p in value.split("/") if p]
        value = parts[-1] if parts else "root"
    value = re.sub(r"[^A-Za-z0-9._+-]+", "-", value).strip("-") or "x"
    return value[:VALUE_MAX]


def swept_keys(sweep_dir: str | Path) -> list[str] | None:
    """The keys a multirun sweeps (overrides with several values: ``a=1,2``, ``range(..)``, ``choice(..)``),
    from ``<sweep_dir>/multirun.yaml``; None when there is no such file (another sweeper)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    overrides = list(OmegaConf.load(path).hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.key_or_group for o in parsed if o.is_sweep_override() and not o.is_hydra_override()]


def job_subdir(job_num: int | str, overrides: list[str], swept: list[str] | None) -> str:
    """The folder name of sweep job ``job_num`` with the task ``overrides`` of this job: the job number and
    the ``swept`` keys with their sanitised values (all overrides but ``hydra.*`` and ``resume`` when
    ``swept`` is None), cut to ``SUBDIR_MAX`` characters with a hash of the whole when longer."""
    items = []
    for o in overrides:
        key = override_key(o)
        if key.startswith(EXCLUDED) or (swept is not None and key not in swept):
            continue
        items.append(f"{key}={sanitise(o.split('=', 1)[1] if '=' in o else '')}")
    name = "_".join([str(job_num), ",".join(items)]) if items else str(job_num)
    if len(name) > SUBDIR_MAX:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:SUBDIR_MAX - 9]}-{digest}"
    return name


def sweep_subdir(job_num) -> str:
    """The resolver ``${sweep_subdir:${hydra.job.num}}`` (``hydra.sweep.subdir``): ``job_subdir`` of the job
    Hydra is starting (its overrides and sweep directory read from ``HydraConfig``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return str(job_num)
    hc = HydraConfig.get()
    return job_subdir(job_num, list(hc.overrides.task), swept_keys(hc.sweep.dir))


def sweep_record() -> dict:
    """What ``config.json`` records of the launch: ``overrides`` (every task override of this job) and, for
    a sweep job, ``sweep``: its directory, job number and the swept settings with this job's values."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    record = {"overrides": overrides, "sweep": None}
    if hc.mode == RunMode.MULTIRUN:
        swept = swept_keys(hc.sweep.dir) or []
        values = {override_key(o): o.split("=", 1)[1] for o in overrides if "=" in o}
        record["sweep"] = {"dir": str(Path(hc.sweep.dir).resolve()), "job": hc.job.num,
                           "swept": {k: values.get(k) for k in swept}}
    return record


def register_resolvers() -> None:
    """Register ``sweep_subdir`` with OmegaConf (before Hydra composes the config)."""
    OmegaConf.register_new_resolver("sweep_subdir", sweep_subdir, replace=True)
