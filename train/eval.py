"""``python -m train.eval TARGET... [key=value ...]``: judge trained models (Hydra, ``configs/eval.yaml``).

    python -m train.eval runs/default/moba                                  # the run's latest weights
    python -m train.eval runs/default/moba 'eval.lengths=[256,512,1024]' 'eval.tasks=[position,passkey]'
    python -m train.eval runs/x/checkpoints/step_00000050 runs/y/hf         # two targets, compared

A TARGET is a run directory (its HF export when that holds the latest step, else its latest checkpoint), a
checkpoint directory (``<run>/checkpoints/step_N``) or an HF model directory. Each target runs the tasks of
``train.eval_tasks`` (per-position loss, passkey retrieval, routing statistics) at every length of
``eval.lengths`` with the attention its run had at that step (its ``moba`` settings and schedule; an HF dir
outside a run: the ``moba`` dict ``train.export`` recorded in its config.json; ``moba.*`` given here replace
single settings; ``eval.attention=moba|full`` forces one), and writes into its run directory
(``eval.out_dir``): ``eval.json`` (settings, every result, and the flat metrics) and ``eval_position_loss.png``
(every target of the call and ``eval.compare``'s eval.json files side by side), ``eval_passkey.png`` and
``eval_routing.png`` (a plot of a task the call does not run is removed, so none is left from an earlier call).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from data.corpus import DOCUMENT_MODES, check_documents, corpus_fingerprint
from moba_core.hf import apply_moba, attention_modules, moba_config_from_record, set_moba_layers
from moba_core.schedule import Schedule
from moba_core.varlen import cudnn_env

from . import checkpoint as ckpt
from . import eval_tasks as tasks_mod
from .config import (
    ConfigError,
    LayerMoBASettings,
    MoBASettings,
    RunConfig,
    as_config_error,
    check_known_keys,
    check_override_keys,
    exit_on_bad_setting,
)
from .eval_tasks import TASKS
from .metrics import progress_shown
from .sweep import override_key

log = logging.getLogger("train.eval")

RESULT_FILE = "eval.json"
PLOT_FILES = {"position": "eval_position_loss.png", "passkey": "eval_passkey.png", "routing": "eval_routing.png"}


@dataclass
class EvalSettings:
    targets: list[str] = field(default_factory=list)  # run dirs, checkpoint dirs or HF dirs (or positional args)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # position | passkey | routing
    lengths: list[int] = field(default_factory=list)  # context lengths (tokens); [] = 1/4, 1/2, 1 x data.seq_len
    num_docs: int = 8  # held-out documents per length (position loss, routing), the longest of the val split
    # passkey depths: the share of the haystack's filler that comes before the key
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2  # passkey haystacks per (length, depth)
    queries: int = 128  # routing: sampled query positions per document
    attention: str = "run"  # run (the run's attention at that step) | moba (every MoBA layer) | full
    compare: list[str] = field(default_factory=list)  # other eval.json files (or their dirs) drawn beside
    out_dir: str | None = None  # where eval.json and the PNGs go; None = the target's run directory
    data_path: str | None = None  # held-out text: None = the run's data.path (standalone HF dir: stdlib)
    cache_dir: str | None = None  # data cache; None = the run's data.cache_dir
    documents: str | None = None  # module | package (long documents); None = the run's data.documents (or module)
    seed: int = 0  # passkeys, haystack offsets, routing queries

    def __post_init__(self):
        tasks_mod.check_tasks(self.tasks, "eval.tasks")
        for key in ("num_docs", "trials", "queries"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key}={getattr(self, key)} must be >= 1")
        if any(n < 2 for n in self.lengths):
            raise ValueError(f"eval.lengths={list(self.lengths)} must hold lengths >= 2 (tokens)")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"eval.depths={list(self.depths)} must hold fractions in [0, 1]")
        if self.attention not in ("run", "moba", "full"):
            raise ValueError(f"eval.attention={self.attention!r} must be run, moba or full")
        if self.documents is not None and self.documents not in DOCUMENT_MODES:
            raise ValueError(f"eval.documents={self.documents!r} must be one of {', '.join(DOCUMENT_MODES)} "
                             "(or null: the run's data.documents)")


@dataclass
class EvalConfig:
    eval: EvalSettings = field(default_factory=EvalSettings)
    moba: MoBASettings = field(default_factory=MoBASettings)  # for HF dirs without a run; given keys replace a run's
    device: str = "auto"  # auto | cpu | cuda
    progress_bar: str = "auto"  # auto (when stderr is a terminal) | on | off

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be auto, cpu or cuda")
        if self.progress_bar not in ("auto", "on", "off"):
            raise ValueError(f"progress_bar={self.progress_bar!r} must be auto, on or off")


# ---------------------------------------------------------------------------------------------------------
# Targets


def run_config_of(d: dict) -> RunConfig:
    """A ``RunConfig`` from a run's ``config.json`` / a checkpoint's ``run_config.json`` (launch records such as
    ``world_size`` are left out)."""
    known = {f.name for f in fields(RunConfig)}
    base = OmegaConf.structured(RunConfig)
    return OmegaConf.to_object(OmegaConf.merge(base, {k: v for k, v in d.items() if k in known}))


@dataclass
class Target:
    path: Path  # as given
    weights: Path  # HF dir or checkpoint tag dir
    kind: str  # hf | checkpoint
    run_dir: Path | None  # the run that made it (None: a standalone HF dir)
    run_cfg: RunConfig | None
    step: int | None  # training step of the weights (None: unknown)


def _is_hf(p: Path) -> bool:
    try:
        return "model_type" in json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _run_of(p: Path) -> tuple[Path | None, RunConfig | None]:
    if (p / "config.json").is_file() and not _is_hf(p):
        return p, run_config_of(json.loads((p / "config.json").read_text()))
    return None, None


def resolve_target(path: str) -> Target:
    """What ``python -m train.eval`` evaluates for ``path`` (see the module docstring).

    Raises:
        ValueError: naming the path when it is none of a run directory with weights, a checkpoint or an HF dir.
    """
    p = Path(path).expanduser()
    if (p / "run_config.json").is_file() and ckpt.TAG_RE.match(p.name):  # a checkpoint tag
        cfg = run_config_of(json.loads((p / "run_config.json").read_text()))
        run_dir, _ = _run_of(p.parent.parent)
        return Target(p, p, "checkpoint", run_dir or p.parent.parent, cfg, ckpt.step_of(p.name))
    if _is_hf(p):
        run_dir, cfg = _run_of(p.parent)
        from .loop import exported_step

        return Target(p, p, "hf", run_dir, cfg, exported_step(p))
    run_dir, cfg = _run_of(p)
    if not p.exists():
        raise ValueError(f"eval.targets: {path} does not exist")
    if cfg is None:
        raise ValueError(f"eval.targets: {path} is neither a run directory (config.json), a checkpoint "
                         "(checkpoints/step_N) nor an HF model directory")
    ckpt_dir = ckpt.checkpoint_dir(cfg.checkpoint.dir, p)
    tag = ckpt.latest_tag(ckpt_dir)
    from .loop import exported_step

    hf_step = exported_step(p / "hf")
    if hf_step is not None and (tag is None or hf_step >= ckpt.step_of(tag)):
        return Target(p, p / "hf", "hf", p, cfg, hf_step)
    if tag is None:
        raise ValueError(f"eval.targets: run directory {path} has neither an HF export (hf/) nor a checkpoint")
    return Target(p, ckpt_dir / tag, "checkpoint", p, run_config_of(
        json.loads((ckpt_dir / tag / "run_config.json").read_text())), ckpt.step_of(tag))


def load_model(t: Target, vocab_size: int, device: torch.device):
    """The target's causal LM in float32 on ``device``, in eval mode (HF dir: ``from_pretrained``; checkpoint:
    the run's model with the DeepSpeed module states, gathered from ZeRO-3 partitions when needed)."""
    from transformers import AutoModelForCausalLM

    from .model import build_model

    if t.kind == "hf":
        lm = AutoModelForCausalLM.from_pretrained(t.weights, dtype=torch.float32)
    else:
        lm = build_model(t.run_cfg.model, vocab_size)
        if t.run_cfg.parallel.zero_stage == 3:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(t.weights.parent), t.weights.name)
        else:
            f = t.weights / "mp_rank_00_model_states.pt"
            state = torch.load(f, map_location="cpu", weights_only=False)["module"]
        state = {k.removeprefix("lm."): v.float() for k, v in state.items()}
        lm.load_state_dict(state)
    return lm.to(device).eval()


def tokenizer_and_data(t: Target, s: EvalSettings):
    """(tokenizer, ``val_at(length)``: the held-out ``PackedDataset`` with one document per row at that length)."""
    from data import build_data, load_tokenizer, tokenizer_in
    from data.prepared import is_prepared

    path = s.data_path if s.data_path is not None else (t.run_cfg.data.path if t.run_cfg else None)
    cache = s.cache_dir if s.cache_dir is not None else (t.run_cfg.data.cache_dir if t.run_cfg else None)
    documents = s.documents or (t.run_cfg.data.documents if t.run_cfg else "module")
    check_documents(documents, path, key="eval.documents" if s.documents else "the run's data.documents",
                    path_key="eval.data_path" if s.data_path is not None else "the run's data.path",
                    fix="eval.documents")
    spec = None
    if t.run_dir is not None:
        spec = tokenizer_in(t.run_dir / "tokenizer")
    if spec is None and t.run_cfg is not None:
        spec = t.run_cfg.data.tokenizer or tokenizer_in(t.run_cfg.model.name_or_path)
    spec = spec or tokenizer_in(t.weights)
    if spec is None:
        raise ValueError(f"eval.targets: {t.path} holds no tokenizer (and no run with one)")
    tok = load_tokenizer(spec, corpus_id="", train_texts=None, cache_dir=Path(cache or "."))
    where = "eval.data_path" if s.data_path is not None else f"the data of {t.path} (its run's data.path)"

    def data_error(e: ValueError) -> str:  # the reader names data.path=<path>; here the path comes from ``where``
        return f"{where}: {str(e).replace(f'data.path={path}', str(path), 1)}"

    def val_at(n: int):
        # read when a task first needs length n: its errors (a file gone, a bad row) are ConfigErrors naming the source
        try:
            if is_prepared(path):  # a prepared directory fixes seq_len and packing: its rows, cut to n
                prep = json.loads((Path(path) / "prepared.json").read_text())
                if n > prep["seq_len"]:
                    raise ValueError(f"eval.lengths holds {n}, longer than data.path={path}'s seq_len "
                                     f"{prep['seq_len']}")
                return build_data(path=path, tokenizer=spec, seq_len=prep["seq_len"], packing=prep["packing"],
                                  split="val")[0]
            return build_data(path=path, tokenizer=spec, seq_len=n, packing="pad", split="val", cache_dir=cache,
                              documents=documents)[0]
        except ValueError as e:
            raise ConfigError(data_error(e)) from e

    try:  # a path that does not exist (or a file of another kind) fails now, before the model is loaded
        corpus_fingerprint(path)
    except ValueError as e:
        raise ValueError(data_error(e)) from e
    return tok, val_at


def settings_from_record(record: dict, backend: str) -> MoBASettings:
    """The ``moba.*`` settings of an exported model's ``config.json`` ``moba`` dict (``train.export``:
    block_size, top_k, full_attn_layers as the layers that ran full attention at the exported step, per-layer
    overrides, group_routing, decode), with the machine's ``backend``.

    Raises:
        ValueError: the record lacks block_size / top_k or holds settings MoBASettings refuses.
    """
    cfg = moba_config_from_record(record, backend)  # checks the record
    return MoBASettings(block_size=cfg.block_size, top_k=cfg.top_k, full_attn_layers=list(cfg.full_attn_layers),
                        group_routing=cfg.group_routing, backend=backend, decode=cfg.decode,
                        layers=[LayerMoBASettings(layer=i, **o) for i, o in cfg.layers.items()])


def set_attention(lm, t: Target, settings: EvalConfig, moba_overrides: dict) -> dict:
    """Apply MoBA to ``lm`` as the target's run had it at its step (``eval.attention`` and ``moba.*`` overrides
    aside). Returns ``{"moba_layers", "block_size", "top_k"}`` for eval.json."""
    moba = t.run_cfg.moba if t.run_cfg is not None else settings.moba
    record = getattr(lm.config, "moba", None)
    if t.run_cfg is None and record is not None:  # an exported model (train.export) records its MoBA settings
        moba = settings_from_record(record, settings.moba.backend)
    if moba_overrides:
        moba = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(moba), moba_overrides))
    n_layers = len(attention_modules(lm)) or lm.config.num_hidden_layers
    layers = apply_moba(lm, moba.to_moba_config())
    if settings.eval.attention == "full":
        layers = []
    elif settings.eval.attention == "run" and t.run_cfg is not None:
        sc = t.run_cfg.schedule
        sched = Schedule(**{f.name: getattr(sc, f.name) for f in fields(Schedule) if hasattr(sc, f.name)})
        step = max((t.step or t.run_cfg.train.max_steps) - 1, 0)
        layers = sched.moba_layers_at(step, t.run_cfg.train.max_steps, layers, n_layers)
    set_moba_layers(lm, layers)
    return {"moba_layers": layers, "block_size": moba.block_size, "top_k": moba.top_k}


# ---------------------------------------------------------------------------------------------------------
# The command


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_lengths(trained: int) -> list[int]:
    """``eval.lengths=[]``: a quarter, half and all of the trained length (those of at least 64 tokens)."""
    return sorted({n for n in (trained // 4, trained // 2, trained) if n >= 64} | {trained})


def length_warnings(lengths: list[int], trained: int | None, max_positions: int | None, label: str,
                    given: bool = True) -> list[str]:
    """Warnings for ``eval.lengths`` beyond what the model saw or is configured for: above the run's
    ``data.seq_len`` (``trained``; None for an HF dir without a run) the numbers measure length extrapolation;
    above ``max_position_embeddings`` (``max_positions``) RoPE runs at positions the model was not set up for.
    ``given=False``: the lengths are the defaults (``default_lengths``), and the warning says so."""
    out = []
    what = "eval.lengths" if given else "the default eval.lengths (set eval.lengths to choose)"
    beyond = [n for n in lengths if trained and n > trained]
    if beyond:
        out.append(f"{label}: {what} {beyond} exceed the data.seq_len={trained} it trained at: those results "
                   "measure length extrapolation")
    past = [n for n in lengths if max_positions and n > max_positions]
    if past:
        out.append(f"{label}: {what} {past} exceed its max_position_embeddings={max_positions}: positions the "
                   "model is not configured for (extend it with model.rope_scaling / max_position_embeddings)")
    return out


def _compare_results(paths: list[str]) -> list[tuple[str, dict]]:
    out = []
    for p in map(Path, paths):
        f = p / RESULT_FILE if p.is_dir() else p
        if not f.is_file():
            raise ValueError(f"eval.compare: {p} holds no {RESULT_FILE}")
        out.append((f.parent.name, json.loads(f.read_text())["results"]))
    return out


def evaluate_targets(cfg: EvalConfig, moba_overrides: dict | None = None) -> list[Path]:
    """Evaluate every target of ``cfg.eval.targets``; returns the written eval.json paths.

    Raises:
        ValueError: no target, a setting / target that cannot be evaluated (naming it), or a bad
            ``MOBA_CUDNN_ATTENTION`` / ``MOBA_CUDNN_MIN_SEQLEN`` (``moba_core.varlen.cudnn_env``), before any model
            is loaded. Errors in a target's data rows found while its lengths are read come as ``ConfigError``
            during that target (the eval.json of earlier targets is written by then).
    """
    s = cfg.eval
    with as_config_error():
        cudnn_env()
        if not s.targets:
            raise ValueError("no target: python -m train.eval <run dir | checkpoint | HF dir> (or eval.targets=[...])")
        device = _device(cfg.device)
    done = []
    for path in s.targets:
        with as_config_error():  # a target, its data or its model that cannot be used: named, without a traceback
            t = resolve_target(path)
            tok, val_at = tokenizer_and_data(t, s)
            lm = load_model(t, tok.vocab_size, device)
            attn = set_attention(lm, t, cfg, moba_overrides or {})
        lengths = list(s.lengths) or default_lengths(t.run_cfg.data.seq_len if t.run_cfg else 1024)
        for warning in length_warnings(lengths, t.run_cfg.data.seq_len if t.run_cfg else None,
                                       getattr(lm.config, "max_position_embeddings", None), t.path.name,
                                       given=bool(s.lengths)):
            log.warning(warning)
        total = tasks_mod.progress_total(list(s.tasks), lengths, list(s.depths), s.trials)
        show = progress_shown(cfg.progress_bar)
        from tqdm import tqdm

        with tqdm(total=total, desc=f"eval {t.path.name}", disable=not show, dynamic_ncols=True) as bar:
            res = tasks_mod.run_tasks(lm, tok, val_at, list(s.tasks), lengths, num_docs=s.num_docs,
                                      depths=list(s.depths), trials=s.trials, queries=s.queries, seed=s.seed,
                                      progress=bar)
        out_dir = Path(s.out_dir) if s.out_dir else (t.run_dir or t.weights)
        record = {"target": str(t.path), "weights": str(t.weights), "step": t.step, "attention": attn,
                  "tasks": list(s.tasks), "lengths": lengths, "results": res, "metrics": tasks_mod.flat_metrics(res)}
        done.append((t, out_dir, json.loads(json.dumps(record))))
        del lm
    labels = [f"{t.path.parent.name}/{t.path.name}" for t, _, _ in done]
    everyone = [(label, r["results"]) for label, (_, _, r) in zip(labels, done)] + _compare_results(list(s.compare))
    written = []
    for (_, out_dir, record), label in zip(done, labels):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RESULT_FILE).write_text(json.dumps(record, indent=1))
        res = record["results"]
        for task, name in PLOT_FILES.items():  # a plot of a task this call did not run is a former call's: drop it
            if task not in res:
                (out_dir / name).unlink(missing_ok=True)
        if "position" in res:
            tasks_mod.plot_position(everyone, out_dir / PLOT_FILES["position"])
        if "passkey" in res:
            tasks_mod.plot_passkey(res["passkey"], out_dir / PLOT_FILES["passkey"], label)
        if "routing" in res:
            n = max(res["routing"], key=int)
            tasks_mod.plot_routing(res["routing"][n], out_dir / PLOT_FILES["routing"], f"{label} @ {n} tokens")
        log.info("%s: %s", out_dir / RESULT_FILE, summary_line(record["metrics"]))
        written.append(out_dir / RESULT_FILE)
    return written


def summary_line(metrics: dict) -> str:
    """The headline numbers of ``flat_metrics`` on one line (tail loss, passkey accuracy, recall)."""
    keys = [k for k in metrics if k.startswith(("tail_loss/", "passkey_", "recall/")) and "layer" not in k]
    return " | ".join(f"{k} {metrics[k]:.4f}" if metrics[k] is not None else f"{k} n/a" for k in keys)


def tasks_during_training(lm, tokenizer, data_kwargs: dict, tasks: list[str], seed: int) -> dict:
    """The flat metrics of ``tasks`` at the run's ``data.seq_len`` (``data_kwargs``: the run's ``build_data``
    arguments), for eval.jsonl and wandb at every evaluation of a training run (``train.eval_tasks``)."""
    from data import build_data
    from data.prepared import is_prepared

    def val_at(n: int):
        packing = data_kwargs["packing"] if is_prepared(data_kwargs["path"]) else "pad"
        return build_data(**{**data_kwargs, "seq_len": n, "packing": packing}, split="val")[0]

    s = EvalSettings()
    res = tasks_mod.run_tasks(lm, tokenizer, val_at, tasks, [data_kwargs["seq_len"]], num_docs=s.num_docs,
                              depths=s.depths, trials=1, queries=s.queries, seed=seed)
    return tasks_mod.flat_metrics(res)


# Hydra's command-line flags that take the next argument as their value (``--info`` only for one of its topics)
HYDRA_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun")
HYDRA_INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def _targets_from_argv(argv: list[str]) -> list[str]:
    """Move positional TARGET arguments (no ``=`` unless it is a path that exists, not an option, not the value of a
    Hydra flag such as ``--cfg job``) into one ``eval.targets=[...]`` override appended after the rest, which keeps
    its order."""
    targets, rest = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        takes_value = a in HYDRA_VALUE_FLAGS or (a in ("--info", "-i") and i + 1 < len(argv)
                                                and argv[i + 1] in HYDRA_INFO_TOPICS)
        if takes_value:
            rest.extend(argv[i:i + 2])
            i += 2
            continue
        # a path that exists is a target even with "=" in its name (sweep job folders: 3_moba.top_k=3)
        setting = ("=" in a and not os.path.exists(a)) or a.startswith("-")
        (rest if setting else targets).append(a)
        i += 1
    if targets:
        quoted = ",".join("'" + t.replace("\\", "\\\\").replace("'", "\\'") + "'" for t in targets)
        rest.append(f"eval.targets=[{quoted}]")
    return rest


def to_eval_config(cfg: DictConfig) -> EvalConfig:
    """Typed config; the dataclasses' checks raise ``ValueError`` naming the setting (and a key ``+eval.foo=1``
    added that the schema does not have)."""
    check_known_keys(cfg, EvalConfig)
    try:
        return OmegaConf.to_object(cfg)
    except ValueError:
        raise
    except Exception as e:  # OmegaConf wraps errors raised in __post_init__
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ValueError):
            raise cause from None
        raise


ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


@hydra.main(config_path="../configs", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> None:
    with exit_on_bad_setting():
        ecfg = to_eval_config(cfg)
    given = {override_key(o) for o in HydraConfig.get().overrides.task}
    overrides = {k.split(".", 1)[1]: getattr(ecfg.moba, k.split(".", 1)[1]) for k in given if k.startswith("moba.")}
    with exit_on_bad_setting(ConfigError):
        evaluate_targets(ecfg, overrides)


if __name__ == "__main__":
    sys.argv = sys.argv[:1] + _targets_from_argv(sys.argv[1:])
    with exit_on_bad_setting():  # a mistyped key (eval.lenghts): say so, with the closest setting, before Hydra
        check_override_keys(sys.argv[1:], EvalConfig)
    main()
