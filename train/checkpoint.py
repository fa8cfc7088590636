"""Checkpoints: DeepSpeed engine state plus the loop's own state, saved so a killed run loses nothing.

Layout under the checkpoint dir (``checkpoint.dir``, default ``<run dir>/checkpoints``):
    step_00000050/            one DeepSpeed tag: model, optimizer (ZeRO-partitioned), LR scheduler,
        rng_rank<r>.pt        and this rank's RNG states (every rank's own, not only rank 0's)
    latest                    the newest complete tag, written by DeepSpeed after the tag is saved

A run killed while saving leaves ``latest`` pointing at the previous complete tag. Older tags are
removed only after a new one is complete (``checkpoint.keep``). Each tag's ``manifest.json`` (written last,
before ``latest``) lists the size of every file; on resume a tag whose files are missing or of another size
(truncated on disk) is skipped with a warning naming the file, for the newest earlier tag that is complete.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_of(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


def list_tags(ckpt_dir: Path) -> list[str]:
    """Complete-looking tags in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(tags, key=step_of)


MANIFEST = "manifest.json"


def write_manifest(tag_dir: Path) -> None:
    """Record the size of every file of a saved tag (``manifest.json``), so a truncated file is found."""
    sizes = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    tmp = tag_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(sizes, indent=1))
    tmp.replace(tag_dir / MANIFEST)


def tag_problem(tag_dir: Path) -> str | None:
    """Why the checkpoint ``tag_dir`` cannot be loaded, naming the file (None when it looks complete): a file
    of its manifest missing or of another size, or (a tag saved before manifests) a ``.pt`` file that is not
    a complete torch archive, or no rank-0 RNG file."""
    manifest = tag_dir / MANIFEST
    if manifest.is_file():
        try:
            sizes = json.loads(manifest.read_text())
        except ValueError:
            return f"{manifest} is not valid JSON"
        for name, size in sizes.items():
            f = tag_dir / name
            if not f.is_file():
                return f"{f} is missing"
            if f.stat().st_size != size:
                return f"{f} has {f.stat().st_size} bytes, {size} when saved (truncated?)"
    elif not (tag_dir / "rng_rank0.pt").is_file():
        return f"{tag_dir / 'rng_rank0.pt'} is missing (the save did not finish)"
    for f in sorted(tag_dir.rglob("*.pt")):
        if not zipfile.is_zipfile(f):  # torch.save writes a zip archive; a cut-off one has no directory
            return f"{f} is not a complete torch file (truncated?)"
    return None


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint: the tag named by ``ckpt_dir/latest`` (or, when that file is missing or
    names a folder that is gone, the newest tag), else the newest earlier tag, skipping with a warning each
    tag whose files are missing or truncated (``tag_problem``). None when there is no checkpoint.

    Raises:
        ValueError: the directory holds checkpoints that were completely saved but none can be loaded now,
            naming the file of each (rather than silently starting from scratch).
    """
    tags = list_tags(ckpt_dir)
    f = ckpt_dir / "latest"
    named = f.read_text().strip() if f.is_file() else None
    if named in tags:  # tags after it are saves that did not finish
        candidates = [t for t in tags if step_of(t) <= step_of(named)]
    else:
        if tags:
            log.warning("%s names no checkpoint; looking for the newest complete one", f)
        candidates = tags
    problems = []
    for tag in reversed(candidates):
        problem = tag_problem(ckpt_dir / tag)
        if problem is None:
            if problems:
                log.warning("falling back to checkpoint %s", ckpt_dir / tag)
            return tag
        saved = tag == named or (ckpt_dir / tag / MANIFEST).is_file()
        if saved:
            log.warning("checkpoint %s cannot be loaded: %s", ckpt_dir / tag, problem)
        problems.append((tag, problem, saved))
    if any(saved for _, _, saved in problems):
        raise ValueError(
            f"no loadable checkpoint in {ckpt_dir}: " + "; ".join(p for _, p, _ in problems)
            + ". Restore the files, or start fresh in another hydra.run.dir / checkpoint.dir"
        )
    return None


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int, rank: int, run_config: dict) -> Path:
    """Save a checkpoint at ``step`` (collective: every rank calls it), then prune on rank 0: the new tag and
    the ``keep - 1`` newest earlier ones stay (tags of later steps, from another run, are never touched)."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        (ckpt_dir / tag / "run_config.json").write_text(json.dumps(run_config, indent=2))
        write_manifest(ckpt_dir / tag)  # every rank's files are written (barrier above)
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        tmp.replace(ckpt_dir / "latest")  # atomic: the new tag counts only once it is complete
        if keep > 0:
            older = [t for t in list_tags(ckpt_dir) if step_of(t) < step]
            for old in older[: max(0, len(older) - (keep - 1))]:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        log.info("saved checkpoint %s", ckpt_dir / tag)
    if dist.is_initialized():
        dist.barrier()
    return ckpt_dir / tag


def checkpoint_dir(setting: str | None, run_dir: Path) -> Path:
    """Where a run in ``run_dir`` with ``checkpoint.dir=setting`` keeps its checkpoints: ``setting`` when set,
    else ``run_dir/checkpoints``."""
    return Path(setting) if setting else Path(run_dir) / "checkpoints"


def run_checkpoint_dir(run_dir: Path) -> Path:
    """Where the run in ``run_dir`` keeps its checkpoints: the ``checkpoint.dir`` its ``config.json`` records
    when it set one, else ``run_dir/checkpoints``."""
    try:
        d = json.loads((Path(run_dir) / "config.json").read_text()).get("checkpoint", {}).get("dir")
    except (OSError, ValueError, AttributeError):
        d = None
    return checkpoint_dir(d, run_dir)


def check_same_checkpoint_dir(run_dir: Path, ckpt_dir: Path) -> None:
    """Refuse a launch into ``run_dir`` that would save to ``ckpt_dir`` while the run's earlier launch kept its
    checkpoints elsewhere (the ``checkpoint.dir`` its ``config.json`` records, or ``run_dir/checkpoints`` when it set
    none): the launch would otherwise start from step 0 beside them and replace the run's records.

    Raises:
        ValueError: naming both folders and the setting that continues the run.
    """
    if not (Path(run_dir) / "config.json").is_file():
        return
    recorded = run_checkpoint_dir(run_dir)
    if recorded.resolve() != Path(ckpt_dir).resolve() and list_tags(recorded):
        raise ValueError(f"hydra.run.dir={run_dir} keeps its checkpoints in {recorded} (its earlier launch's "
                         f"checkpoint.dir), but this launch would save them to {ckpt_dir}: set checkpoint.dir="
                         f"{recorded if recorded != checkpoint_dir(None, run_dir) else 'null'} to continue that run, "
                         "or use another hydra.run.dir")


def resolve_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """Where to resume from: ``resume=auto`` (latest in ``ckpt_dir``, or None), ``none``, or a path to
    a checkpoint dir (its ``latest``), a tag dir inside one, or a run directory (the newest checkpoint of its
    ``checkpoints/`` or of the ``checkpoint.dir`` it ran with, as ``python -m train.eval`` takes a run directory).

    Raises:
        ValueError: ``resume`` is a path without a checkpoint, or names a tag that cannot be loaded (a file
            missing or truncated); ``latest_tag``'s error when no saved checkpoint can be loaded.
    """
    if resume == "none":
        tag = latest_tag(ckpt_dir)
        if tag:
            raise ValueError(
                f"resume=none but {ckpt_dir} already holds checkpoints (newest {tag}): use "
                "resume=auto to continue them, or another hydra.run.dir / checkpoint.dir to start fresh"
            )
        return None
    if resume == "auto":
        tag = latest_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    p = Path(resume)
    if (p / "latest").is_file():
        tag = latest_tag(p)
        if tag:
            return p, tag
    run_ckpts = run_checkpoint_dir(p)
    if run_ckpts.is_dir() and not TAG_RE.match(p.name):  # a run directory
        tag = latest_tag(run_ckpts)
        if tag:
            return run_ckpts, tag
    if p.is_dir() and TAG_RE.match(p.name):
        problem = tag_problem(p)
        if problem:
            raise ValueError(f"resume={resume} cannot be loaded: {problem}")
        return p.parent, p.name
    if not p.exists():
        parent = p.parent if TAG_RE.match(p.name) else p  # a pruned step_* names its checkpoint dir
        tags = sorted(c.name for c in parent.iterdir() if TAG_RE.match(c.name)) if parent.is_dir() else []
        have = f"; {parent} holds {', '.join(tags)}" if tags else ""
        raise ValueError(f"resume={resume!r} does not exist{have} (resume=auto takes the newest checkpoint of the run "
                         "directory)")
    raise ValueError(f"resume={resume!r} is neither auto, none, a run directory with checkpoints, a checkpoint "
                     "directory (a run's checkpoints/) nor one of its step_* folders")


# Settings a resumed run must share with its checkpoint (the model's shape and the data order).
RESUME_KEYS = [
    "model.name_or_path", "model.hidden_size", "model.intermediate_size", "model.num_layers", "model.num_heads",
    "model.num_kv_heads", "model.tie_embeddings", "data.path", "data.tokenizer", "data.vocab_size", "data.seq_len",
    "data.packing", "data.documents", "train.micro_batch_size", "seed", "world_size", "parallel.sp_size",
]
# Values of keys added to RESUME_KEYS later, for checkpoints saved before them (they ran with the default).
RESUME_DEFAULTS = {"data.documents": "module"}


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def check_resume_compatible(ckpt_dir: Path, tag: str, run_config: dict) -> None:
    """Compare this run's settings with those saved beside the checkpoint (``run_config.json``).

    Raises:
        ValueError: naming every setting that differs, with both values.
    """
    f = ckpt_dir / tag / "run_config.json"
    if not f.is_file():
        return
    saved = json.loads(f.read_text())

    def value(cfg: dict, k: str):
        v = _get(cfg, k)
        return RESUME_DEFAULTS.get(k) if v is None else v

    diff = [f"{k}={value(saved, k)!r} there, {value(run_config, k)!r} now" for k in RESUME_KEYS
            if value(saved, k) != value(run_config, k)]
    if diff:
        explicit = _get(run_config, "resume") not in (None, "auto", "none")
        fresh = ("leave out resume= to start fresh (in a hydra.run.dir without checkpoints of its own)" if explicit
                 else "another hydra.run.dir and checkpoint.dir to start fresh" if _get(run_config, "checkpoint.dir")
                 else "another hydra.run.dir (or resume=none there) to start fresh")
        raise ValueError(f"cannot resume from {ckpt_dir / tag}: " + "; ".join(diff)
                         + f". Use the same settings, or {fresh}")


def load(engine, ckpt_dir: Path, tag: str, rank: int) -> dict:
    """Load engine state, optimizer and scheduler included, and this rank's RNG; returns client state."""
    path, client_state = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise ValueError(f"could not load checkpoint {ckpt_dir / tag}")
    rng = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return client_state or {}
