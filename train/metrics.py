"""Step metrics on rank 0: ``metrics.jsonl``, wandb, and a progress bar or one greppable line per step."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


def progress_shown(setting: str) -> bool:
    """Whether a progress bar is drawn for ``logging.progress_bar`` / ``eval.progress_bar`` = ``setting``: on,
    or auto while stderr is a terminal."""
    return setting == "on" or (setting == "auto" and sys.stderr.isatty())


class MetricsLogger:
    """Writes one JSON object per logged step to ``<run dir>/metrics.jsonl`` and to wandb.

    On resume, lines of steps after the resumed step (written by the run that died) are dropped from
    ``metrics.jsonl`` and ``eval.jsonl``, so each file holds each step once; a fresh start (``resumed_step``
    0: no checkpoint) drops them all, the step-0 evaluation of a run killed before its first checkpoint
    included. A line that is not JSON (a crash mid-write) is dropped with a warning naming the file. wandb
    runs offline by default and resumes the same run id.
    """

    def __init__(self, run_dir: Path, resumed_step: int, wandb_cfg, config_dict: dict, max_steps: int,
                 progress_bar: str, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        if not enabled:
            return
        self.eval_path = run_dir / "eval.jsonl"
        for path in (self.path, self.eval_path):  # drop what a killed run wrote after its last checkpoint
            records = read_records(path)
            keep = [r for r in records if 0 < resumed_step and r["step"] <= resumed_step]
            if path.exists():
                path.write_text("".join(json.dumps(r) + "\n" for r in keep))
            if len(keep) < len(records):
                log.info("%s: dropped %d lines written after the %s", path, len(records) - len(keep),
                         f"checkpoint of step {resumed_step}" if resumed_step else "start of a run that never "
                         "saved a checkpoint")
        self.eval_steps = {r["step"] for r in read_records(self.eval_path)}
        self.file = self.path.open("a")
        if wandb_cfg.mode != "disabled":
            import wandb

            id_file = run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.wandb = wandb.init(
                project=wandb_cfg.project, name=wandb_cfg.name or run_dir.name, id=run_id, resume="allow",
                mode=wandb_cfg.mode, dir=str(run_dir), config=config_dict,
            )
        if progress_shown(progress_bar):
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=resumed_step, desc="train", dynamic_ncols=True)

    def has_eval(self, step: int) -> bool:
        """Whether ``eval.jsonl`` holds an evaluation of ``step`` (False on ranks other than 0)."""
        return self.enabled and step in self.eval_steps

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.wandb is not None:
            scalars = {k: v for k, v in metrics.items() if v is not None and k != "step" and not isinstance(v, list)}
            self.wandb.log(scalars, step=metrics["step"])  # lists (moba_layer_ids) stay in metrics.jsonl
        if self.bar is not None:
            self.bar.n = metrics["step"]
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                refresh=False,
            )
            self.bar.refresh()
        else:
            parts = [f"step {metrics['step']}"]
            for key, fmt in (("loss", ".4f"), ("grad_norm", ".3f"), ("lr", ".3e"), ("tokens_per_s", ".0f"),
                             ("mfu", ".3f"), ("moba_layers", "d"), ("mem_gb", ".2f")):
                if metrics.get(key) is not None:
                    parts.append(f"{key} {format(metrics[key], fmt)}")
            log.info(" | ".join(parts))

    def log_eval(self, step: int, val: dict) -> None:
        """One line of ``eval.jsonl``: ``step``, ``val_loss``, ``val_loss_tail`` (see ``train.loop.evaluate``)."""
        if not self.enabled:
            return
        tail = val.get("val_loss_tail")
        log.info("eval step %d | val_loss %.4f | val_loss_tail %s", step, val["val_loss"],
                 f"{tail:.4f}" if tail is not None else "n/a")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in val.items() if v is not None}, step=step)
        with self.eval_path.open("a") as f:
            f.write(json.dumps({"step": step, **val}) + "\n")
        self.eval_steps.add(step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a ``.jsonl`` file, one per line. A line that is not a JSON object with a ``step``
    (a partial last line left by a crash mid-write) is skipped with a warning naming the file and line."""
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no integer step")
        except ValueError:
            log.warning("%s line %d is not a complete record (a crash mid-write?); dropping it: %.80r", path, i, line)
            continue
        records.append(record)
    return records
