"""Typed configuration of one training stage (the Hydra schema).

Every config group has a dataclass here, registered in Hydra's ConfigStore as ``base_config``; the YAML
files under ``configs/`` only set values, so a misspelt key fails when the config is composed. Checks run
in ``__post_init__`` (through ``OmegaConf.to_object``) and ``RunConfig.check`` (cross-field checks), and
raise ``ValueError`` naming the override to change, before any model, data or GPU work starts.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moba_core import MoBAConfig
from moba_core.attention import triton_available
from moba_core.config import repeated_layer
from moba_core.schedule import Schedule, fraction_step, uses_moba
from moba_core.varlen import cudnn_env

from .eval_tasks import check_tasks
from .sweep import override_key


class ConfigError(ValueError):
    """A bad setting found by a check of the run's config (the message names the setting and its value);
    ``python -m train`` prints it as ``error: ...`` without a traceback."""


@contextlib.contextmanager
def as_config_error():
    """Turn a ``ValueError`` raised inside into a ``ConfigError`` with the same message: for the setup steps of a
    run (resume, data, tokenizer, model) that read the user's settings and files, whose errors name the setting
    and value at fault, so that ``python -m train`` shows ``error: ...`` rather than a traceback."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


@contextlib.contextmanager
def exit_on_bad_setting(kind: type[Exception] = ValueError):
    """Turn a ``kind`` raised inside into ``SystemExit("error: <message>")`` (exit status 1): a bad setting is shown
    by its message alone, not by Hydra's "Error executing job" and a traceback of our own check. With
    ``HYDRA_FULL_ERROR=1`` (Hydra's own switch for full tracebacks) the error is raised as it is."""
    try:
        yield
    except kind as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"error: {e}") from None


@dataclass
class ModelConfig:
    """The model. With ``name_or_path`` set, the fields a checkpoint carries (``CHECKPOINT_FIELDS``) are
    None unless given on the command line (``from_checkpoint_unless_overridden``): None = the checkpoint's
    value. An explicit shape field must then equal the checkpoint's; ``rope_theta`` and
    ``max_position_embeddings`` replace the checkpoint's."""

    name: str = "tiny"  # label of the architecture preset (configs/model/<name>.yaml)
    name_or_path: str | None = None  # HF checkpoint dir to continue from; None = fresh init from the fields below
    hidden_size: int | None = 256  # width of the residual stream
    intermediate_size: int | None = 688  # MLP width
    num_layers: int | None = 4  # decoder layers
    num_heads: int | None = 4  # query heads
    num_kv_heads: int | None = 2  # key/value heads (GQA when < num_heads)
    rope_theta: float | None = None  # RoPE base; None = 10000 for a fresh model, the checkpoint's value otherwise
    # RoPE scaling for context extension, in transformers' rope_scaling format, e.g. {rope_type: yarn, factor: 4.0,
    # original_max_position_embeddings: 8192} (rope_type: linear | dynamic | yarn | llama3); None = the checkpoint's
    # (none for a fresh model); {rope_type: default} = no scaling
    rope_scaling: Any = None
    max_position_embeddings: int | None = 131072  # largest position the model is configured for (tokens)
    tie_embeddings: bool | None = True  # share input embedding and LM head weights
    init_std: float = 0.02  # std of the normal init of fresh weights
    # Liger-Kernel's fused RMSNorm, RoPE, SwiGLU and linear + cross-entropy loss: auto (on a GPU, for an
    # architecture Liger-Kernel patches) | true (refused otherwise) | false
    fused_ops: Any = "auto"
    compile: bool = False  # torch.compile every decoder layer (the attention call stays eager)

    def __post_init__(self):
        if self.fused_ops not in ("auto", True, False):
            raise ValueError(f"model.fused_ops={self.fused_ops!r} must be auto, true or false")
        for key in SHAPE_FIELDS + ("max_position_embeddings", "tie_embeddings"):
            if getattr(self, key) is None and not self.name_or_path:
                raise ValueError(f"model.{key}=None needs model.name_or_path (a fresh model needs a value)")
        for key in SHAPE_FIELDS + ("max_position_embeddings",):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)} must be >= 1")
        if self.rope_theta is not None and self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta={self.rope_theta} must be > 0")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        if self.init_std <= 0:
            raise ValueError(f"model.init_std={self.init_std} must be > 0")
        if None in (self.num_heads, self.num_kv_heads, self.hidden_size):
            return  # the checkpoint's own shape (checked against any explicit field when it is loaded)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.num_kv_heads}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} must be a multiple of model.num_heads={self.num_heads}"
            )


# Fields of ModelConfig that fix the shape of the weights, and every field an HF checkpoint carries.
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
CHECKPOINT_FIELDS = SHAPE_FIELDS + ("rope_theta", "rope_scaling", "max_position_embeddings", "tie_embeddings")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")  # model.rope_scaling's rope_type values


def check_rope_scaling(scaling) -> None:
    """``model.rope_scaling`` must be a dict with ``rope_type`` (or the older ``type``) in ``ROPE_TYPES`` and,
    unless ``default``, a ``factor`` > 0 (transformers checks the other keys when the model is built).

    Raises:
        ValueError: naming ``model.rope_scaling`` and the value.
    """
    if not isinstance(scaling, dict):
        raise ValueError(f"model.rope_scaling={scaling!r} must be a dict such as {{rope_type: linear, factor: 2.0}}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"model.rope_scaling={scaling!r}: rope_type must be one of {', '.join(ROPE_TYPES)}")
    factor = scaling.get("factor")
    if kind != "default" and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0):
        raise ValueError(f"model.rope_scaling={scaling!r}: rope_type {kind} needs a factor > 0")


@dataclass
class LayerMoBASettings:
    """One entry of ``moba.layers``: settings of chosen layers, e.g. ``{layer: [0, 1], block_size: 64}``."""

    layer: Any = None  # a layer index or a list of them (negative = from the last layer)
    block_size: int | None = None  # these layers' block size (tokens); None = moba.block_size
    top_k: int | None = None  # these layers' top-k; None = moba.top_k


@dataclass
class MoBASettings:
    block_size: int = 128  # keys per MoBA block (tokens); positive multiple of 16
    top_k: int = 3  # blocks per query, counting its own block
    full_attn_layers: Any = field(default_factory=list)  # layer indices kept full; an int N = the last N layers
    group_routing: bool = False  # one routing choice per KV group instead of per query head
    backend: str = "auto"  # auto | triton | flash | reference
    layers: list[LayerMoBASettings] = field(default_factory=list)  # per-layer block_size / top_k overrides
    decode: str = "moba"  # attention after a KV cache (generation): moba (same routing) | full (whole cache)

    def __post_init__(self):
        f = self.full_attn_layers
        if isinstance(f, int) and f < 0:
            raise ValueError(f"moba.full_attn_layers={f} must be >= 0 when it counts the last N layers")
        if not isinstance(f, int) and not (isinstance(f, (list, tuple)) and all(isinstance(i, int) for i in f)):
            raise ValueError(f"moba.full_attn_layers={f!r} must be a list of layer indices or an int N (last N)")
        self.to_moba_config()  # MoBAConfig checks block_size, top_k and backend

    def to_moba_config(self) -> MoBAConfig:
        return MoBAConfig(
            block_size=self.block_size,
            top_k=self.top_k,
            full_attn_layers=self.full_layer_indices(),
            group_routing=self.group_routing,
            backend=self.backend,
            layers=self.layer_overrides(),
            decode=self.decode,
        )

    def layer_overrides(self) -> dict[int, dict[str, int]]:
        """``layers`` as ``MoBAConfig.layers``: ``{layer index: {"block_size": ..., "top_k": ...}}``.

        Raises:
            ValueError: an entry without a layer index or without a setting, or a layer given twice.
        """
        out = {}
        for entry in self.layers:
            ids = entry.layer if isinstance(entry.layer, (list, tuple)) else [entry.layer]
            over = {k: getattr(entry, k) for k in ("block_size", "top_k") if getattr(entry, k) is not None}
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) or not over:
                raise ValueError(f"moba.layers entry (layer={entry.layer!r}, block_size={entry.block_size!r}, "
                                 f"top_k={entry.top_k!r}) needs a layer index (or a list of them) and block_size "
                                 "and/or top_k")
            for i in ids:
                if i in out:
                    raise ValueError(f"moba.layers sets layer {i} twice")
                out[i] = over
        return out

    def full_layer_indices(self) -> list[int]:
        """``full_attn_layers`` as indices (an int N becomes the last N layers, as negative indices)."""
        f = self.full_attn_layers
        return list(range(-f, 0)) if isinstance(f, int) else list(f)


@dataclass
class ScheduleConfig:
    name: str = "moba"  # moba | full | full_then_moba | moba_then_full | gradual
    switch_fraction: float = 0.9  # fraction of train.max_steps at which a two-phase schedule switches
    start_fraction: float = 0.0  # gradual: fraction of train.max_steps at which the first layer switches
    end_fraction: float = 1.0  # gradual: fraction of train.max_steps by which every layer has switched
    order: Any = "first_to_last"  # gradual: first_to_last | last_to_first | a list of the MoBA layers' indices
    reverse: bool = False  # gradual: false = layers move full -> MoBA; true = MoBA -> full

    def __post_init__(self):
        self.to_schedule()  # Schedule checks every field

    def to_schedule(self) -> Schedule:
        order = self.order if isinstance(self.order, str) else list(self.order)
        return Schedule(self.name, self.switch_fraction, self.start_fraction, self.end_fraction, order, self.reverse)

    # the fields each schedule reads (moba_core.schedule.Schedule); the others do nothing under it
    FIELDS_READ = {"moba": (), "full": (), "full_then_moba": ("switch_fraction",),
                   "moba_then_full": ("switch_fraction",),
                   "gradual": ("start_fraction", "end_fraction", "order", "reverse")}

    def unused_overrides(self, overrides: Sequence[str]) -> list[str]:
        """Warnings for ``schedule.<field>=...`` given on the command line (``overrides``, Hydra's form) that the
        chosen schedule does not read, e.g. ``schedule.start_fraction=0.5`` with ``schedule=moba``: the run
        would otherwise go on as if it had not been given."""
        out = []
        readers = {f: [n for n, read in self.FIELDS_READ.items() if f in read] for f in self.__dataclass_fields__}
        for o in overrides:
            key, value = override_key(o), o.partition("=")[2]
            field_name = key.removeprefix("schedule.")
            if key.startswith("schedule.") and field_name in readers and field_name != "name" \
                    and field_name not in self.FIELDS_READ.get(self.name, ()):
                out.append(f"{key}={value} has no effect with schedule={self.name} (read only by schedule="
                           f"{' / '.join(readers[field_name])})")
        return out


@dataclass
class DataConfig:
    path: str | None = None  # None = the stdlib corpus; a corpus; or a directory written by python -m data.prepare
    tokenizer: str | None = None  # HF tokenizer dir; None = SentencePiece trained on the corpus and cached
    vocab_size: int = 8192  # vocabulary of the trained SentencePiece tokenizer
    seq_len: int = 1024  # tokens per packed sample
    packing: str = "concat"  # concat (end to end, cut at sample edges) | pad (one doc per sample) | best_fit
    cache_dir: str | None = None  # tokenizer and packed shards; None = $MOBA_CACHE or <repo>/.cache/data
    documents: str = "module"  # module (one document per file) | package (one per top-level folder: long documents)

    def __post_init__(self):
        from data.corpus import check_documents

        check_documents(self.documents, self.path)
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} must be >= 2")
        if self.packing not in ("concat", "pad", "best_fit"):
            raise ValueError(f"data.packing={self.packing!r} must be 'concat', 'pad' or 'best_fit'")
        if self.vocab_size < 512:
            raise ValueError(f"data.vocab_size={self.vocab_size} must be >= 512 (byte pieces + specials)")

    def unused_vocab_size(self, tokenizer_vocab: int, given: str | None) -> str | None:
        """The warning for a ``data.vocab_size`` that does nothing, or None: it sizes only a tokenizer trained on
        the corpus, so one set away from its default while the tokenizer comes from elsewhere (``given``: a
        prepared ``data.path``, ``data.tokenizer`` or ``model.name_or_path``) with another vocabulary
        (``tokenizer_vocab``) is ignored, and the model gets ``tokenizer_vocab`` embeddings."""
        if given is None or self.vocab_size in (DataConfig.vocab_size, tokenizer_vocab):
            return None
        return (f"data.vocab_size={self.vocab_size} is not used: the tokenizer comes from {given} and has "
                f"{tokenizer_vocab} tokens (data.vocab_size sizes only a tokenizer trained on the corpus)")


ADAMW_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warmup (optimizer steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # torch AdamW's kernels: auto (fused on a GPU whose optimizer states stay on it, torch's default otherwise)
    # | fused (one kernel per step) | foreach (multi-tensor ops) | for-loop (one parameter at a time)
    implementation: str = "auto"

    def __post_init__(self):
        if self.implementation not in ADAMW_IMPLEMENTATIONS:
            raise ValueError(f"optim.implementation={self.implementation!r} must be one of "
                             f"{', '.join(ADAMW_IMPLEMENTATIONS)}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        for key in ("weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ValueError(f"optim.{key}={getattr(self, key)} must be >= 0")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"optim.{key}={getattr(self, key)} must lie in [0, 1)")
        if self.eps <= 0:
            raise ValueError(f"optim.eps={self.eps} must be > 0")


@dataclass
class TrainLoopConfig:
    max_steps: int = 100  # optimizer steps of this stage
    micro_batch_size: int = 1  # packed samples per micro-batch per data-parallel rank
    grad_accum: int = 1  # micro-batches per optimizer step
    activation_checkpointing: bool = False  # recompute decoder layers in backward
    # with activation_checkpointing: false keeps every layer's attention outputs (o, LSE; MoBA's routing lists)
    # from the forward instead of running the attention kernels again in the recompute (selective activation
    # checkpointing): less time, more memory (about q's size per layer)
    recompute_attention: bool = True
    # with activation_checkpointing (attention recomputed): false keeps MoBA's routing (block choices and the
    # key-block lists, ~2 x tokens x query heads x (top_k - 1) x 4 bytes per MoBA layer) instead of routing again
    # in the recompute; no effect on full-attention layers
    recompute_routing: bool = True
    # GPU, cuDNN dense attention (Hopper, bf16): build cuDNN's plan for every padded document length up to
    # data.seq_len (or MoBA's dense prefix length) before step 1, ~0.15 s per length plus one fwd+bwd at it
    # (57 lengths at 32K, 121 at 128K); false builds each when first met, stalling that step (and every rank)
    warmup_attention_plans: bool = True
    log_every: int = 1  # optimizer steps between metric lines
    eval_every: int = 0  # optimizer steps between validation passes; 0 = only at the end
    eval_batches: int = 4  # validation micro-batches per pass (per data-parallel rank); >= 1
    # python -m train.eval's tasks also run at every evaluation (rank 0, at data.seq_len; eval.jsonl and wandb):
    eval_tasks: list[str] = field(default_factory=list)  # position | passkey | routing; [] = none
    loss_chunk_tokens: int = 4096  # tokens per chunk of the chunked cross-entropy
    max_skipped_steps: int = 3  # steps in a row skipped for a NaN/inf loss or gradient before the run stops
    # optimizer step (1-based) run under torch.profiler: profile/ traces and profile_step<N>.json (its time split
    # into attention, matmul, loss, optimizer, communication, ...); 0 = none
    profile_step: int = 0

    def __post_init__(self):
        for key in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "eval_batches", "loss_chunk_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every={self.eval_every} must be >= 0 (0 = evaluate only at the end)")
        if not 0 <= self.profile_step <= self.max_steps:
            raise ValueError(f"train.profile_step={self.profile_step} must lie in [0, train.max_steps="
                             f"{self.max_steps}] (0 = no profile)")
        if self.max_skipped_steps < 0:
            raise ValueError(f"train.max_skipped_steps={self.max_skipped_steps} must be >= 0 (0 = stop at the first)")
        check_tasks(self.eval_tasks, "train.eval_tasks")


@dataclass
class ParallelConfig:
    sp_size: int = 1  # sequence-parallel (Ulysses) group size
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    offload_optimizer: bool = False  # keep optimizer states in CPU memory (ZeRO >= 1)

    def __post_init__(self):
        if self.sp_size < 1:
            raise ValueError(f"parallel.sp_size={self.sp_size} must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("parallel.offload_optimizer=true needs parallel.zero_stage >= 1")


@dataclass
class CheckpointConfig:
    enabled: bool = True  # false: no checkpoint is written at all (benchmarks; a stopped run cannot resume)
    dir: str | None = None  # None = <run dir>/checkpoints
    every: int = 50  # optimizer steps between checkpoints (and one at the end)
    keep: int = 2  # newest checkpoints kept; 0 = keep all
    export_hf: bool = True  # write the final model as an HF checkpoint (safetensors) to <run dir>/hf

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"checkpoint.every={self.every} must be >= 1")
        if self.keep < 0:
            raise ValueError(f"checkpoint.keep={self.keep} must be >= 0")


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "moba-cpt"
    name: str | None = None  # run name; None = the run dir's name

    def __post_init__(self):
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logging.wandb.mode={self.mode!r} must be offline, online or disabled")


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: str = "auto"  # auto (when stderr is a terminal) | on | off


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moba: MoBASettings = field(default_factory=MoBASettings)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    experiment: Any = None  # name of the experiment preset, if any (set by configs/experiment/*.yaml)
    resume: str = "auto"  # auto (latest checkpoint of the run dir, if any) | none | a checkpoint dir
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be auto, cpu or cuda")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed} must lie in [0, 2**32) (numpy's seed range)")

    def check(self, world_size: int = 1, shape: tuple[int, int, int] | None = None) -> None:
        """Cross-field checks; run on every rank before any collective or GPU work.

        Args:
            world_size: processes of the job.
            shape: (attention heads, key/value heads, layers) of the model (``train.model.model_shape``).

        Raises:
            ValueError: naming the settings and values that disagree, or an environment variable of
                ``moba_core.varlen.cudnn_env`` (``MOBA_CUDNN_ATTENTION``, ``MOBA_CUDNN_MIN_SEQLEN``) and its bad
                value, which the first attention call would raise only after the data and model are built.
        """
        cudnn_env()
        moba_runs = uses_moba(self.schedule.name)
        if moba_runs and self.data.seq_len < self.moba.block_size:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} is smaller than moba.block_size={self.moba.block_size}: "
                "MoBA needs at least one block per sequence"
            )
        for i, over in self.moba.layer_overrides().items():
            if moba_runs and self.data.seq_len < over.get("block_size", 0):
                raise ValueError(f"data.seq_len={self.data.seq_len} is smaller than moba.layers' block_size="
                                 f"{over['block_size']} of layer {i}: MoBA needs at least one block per sequence")
        if moba_runs and self.moba.backend == "triton":
            self.check_triton_usable()
        if self.train.eval_tasks and (self.parallel.sp_size > 1 or self.parallel.zero_stage == 3):
            p = self.parallel
            raise ValueError(f"train.eval_tasks={list(self.train.eval_tasks)} runs the whole model on rank 0: not with "
                             f"parallel.sp_size={p.sp_size} / parallel.zero_stage={p.zero_stage}; use python -m "
                             "train.eval on the run afterwards")
        sp = self.parallel.sp_size
        if world_size % sp:
            raise ValueError(f"world size {world_size} must be divisible by parallel.sp_size={sp}")
        if self.data.seq_len % sp:
            raise ValueError(f"data.seq_len={self.data.seq_len} must be divisible by parallel.sp_size={sp}")
        if shape is not None:
            heads, kv_heads, layers = shape
            for key, n in (("model.num_heads", heads), ("model.num_kv_heads", kv_heads)):
                if n % sp:
                    raise ValueError(f"{key}={n} must be divisible by parallel.sp_size={sp}")
            f = self.moba.full_attn_layers
            if isinstance(f, int) and f > layers:
                raise ValueError(f"moba.full_attn_layers={f} asks for more full layers than the model's {layers}")
            # [0, 0] or [1, -3] of 4 layers: a typo for another layer, most likely
            twice = repeated_layer(f, layers) if isinstance(f, (list, tuple)) else None
            if twice:
                raise ValueError(f"moba.full_attn_layers={list(f)!r} names layer {twice[1] % layers} twice (as "
                                 f"{twice[0]} and {twice[1]}) in a model of {layers} layers")
            if moba_runs:  # raise on an index outside the model
                moba_layers = self.moba.to_moba_config().moba_layers(layers)
                self.schedule.to_schedule().moba_layers_at(0, self.train.max_steps, moba_layers, layers)

    def warnings(self) -> list[str]:
        """Settings that are valid but that a user most likely did not mean (logged as warnings at the start of
        a run): a two-phase schedule (``full_then_moba`` / ``moba_then_full``) whose ``schedule.switch_fraction``
        of ``train.max_steps`` rounds to 0 or all steps, so one phase never runs; an ``optim.warmup_steps`` of
        at least ``train.max_steps``, so the learning rate never leaves its linear warm-up."""
        out = []
        name, steps = self.schedule.name, self.train.max_steps
        if name in ("full_then_moba", "moba_then_full"):
            switch = fraction_step(self.schedule.switch_fraction, steps)
            first, second = name.split("_then_")
            empty = first if switch == 0 else second if switch >= steps else None
            if empty is not None:
                out.append(f"schedule={name}: schedule.switch_fraction={self.schedule.switch_fraction} of "
                           f"train.max_steps={steps} switches at step {switch}, so the {empty} phase has no steps")
        warm = self.optim.warmup_steps
        if warm >= steps > 0:
            out.append(f"optim.warmup_steps={warm} >= train.max_steps={steps}: the learning rate never leaves its "
                       f"linear warm-up (it reaches {steps / warm:.2f} x optim.lr at the last step)")
        return out

    def check_triton_usable(self) -> None:
        """``moba.backend=triton`` runs our Triton kernels: it needs Triton and a CUDA device (on a CPU only
        under the slow ``TRITON_INTERPRET=1``, as ``moba_core`` allows).

        Raises:
            ValueError: naming ``moba.backend`` and ``device``.
        """
        on_cuda = self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
        if not triton_available():
            raise ValueError("moba.backend=triton but Triton is not installed: use moba.backend=flash (or auto)")
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            where = "device=cpu" if self.device == "cpu" else f"device={self.device} finds no CUDA device"
            raise ValueError(f"moba.backend=triton needs a CUDA device but {where}: use moba.backend=flash "
                             "(or auto) on a CPU")


def check_known_keys(cfg: DictConfig | dict, schema: type = RunConfig, prefix: str = "") -> None:
    """Refuse keys the schema does not have. Hydra's ``+key=value`` (the form it suggests after a typo)
    adds a key even to a typed config, and ``OmegaConf.to_object`` would keep it as an ignored attribute.

    Raises:
        ValueError: naming the unknown key, the closest known one and the group's settings.
    """
    data = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    known = {f.name: f for f in fields(schema)}
    for key, value in data.items():
        if key not in known:
            raise _unknown_key(str(key), known, prefix)
        factory = known[key].default_factory
        if is_dataclass(factory) and isinstance(value, dict):
            check_known_keys(value, factory, f"{prefix}{key}.")


def _unknown_key(key: str, known: dict, prefix: str) -> ValueError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return ValueError(f"{prefix}{key} is not a setting{hint}; {prefix.rstrip('.') or 'the config'} has: "
                      f"{', '.join(known)}")


def check_override_keys(overrides: Sequence[str], schema: type = RunConfig) -> None:
    """Refuse a command-line override ``a.b.c=value`` whose key the schema does not have, before Hydra composes
    the config (Hydra's own error for it only suggests ``+a.b.c=value``, which ``check_known_keys`` then refuses).
    Flags (``-m``), additions and deletions (``+`` / ``~``), ``hydra.*`` keys and group choices without a dot
    (``model=tiny``) are left to Hydra; the check stops at a field that is not a dataclass, except that the
    entries of a list of dataclasses (``moba.layers=[{layer: 0, blok_size: 64}]``) have their keys checked too.

    Raises:
        ValueError: as ``check_known_keys``: the unknown key, the closest known one and the group's settings.
    """
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or key.startswith(("-", "+", "~", "hydra.")) or "." not in key or "@" in key:
            continue
        current, prefix = schema, ""
        for part in key.split("."):
            known = {f.name: f for f in fields(current)}
            if part not in known:
                raise _unknown_key(part, known, prefix)
            entry = _list_entry_type(current, part)
            current, prefix = known[part].default_factory, f"{prefix}{part}."
            if entry is not None:
                _check_entry_keys(override, entry, prefix.rstrip("."))
            if not is_dataclass(current):
                break


def _list_entry_type(schema: type, name: str) -> type | None:
    """The dataclass of the entries of ``schema.name`` when it is a ``list[<dataclass>]``, else None."""
    hint = typing.get_type_hints(schema).get(name)
    if typing.get_origin(hint) is list:
        (arg,) = typing.get_args(hint) or (None,)
        return arg if is_dataclass(arg) else None
    return None


def _check_entry_keys(override: str, entry: type, key: str) -> None:
    """Refuse an unknown key in an entry of a list-of-dataclass override (``moba.layers=[{layer: 0, blok_size: 64}]``):
    Hydra's own error for it suggests ``+moba.layers=...``, which is no fix."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        value = OverridesParser.create().parse_overrides([override])[0].value()
    except Exception:  # noqa: BLE001 - a value Hydra cannot parse: its own error says where
        return
    known = {f.name: f for f in fields(entry)}
    for i, item in enumerate(value if isinstance(value, list) else []):
        for k in item if isinstance(item, dict) else []:
            if k not in known:
                raise _unknown_key(str(k), known, f"{key}[{i}].")


def from_checkpoint_unless_overridden(cfg: DictConfig, overrides: Sequence[str]) -> list[str]:
    """With ``model.name_or_path`` set, set each model field a checkpoint carries (``CHECKPOINT_FIELDS``)
    to None, meaning the checkpoint's value, unless the command line sets it: a model group's preset
    (e.g. the default ``rope_theta: 10000.0``) must not replace a checkpoint's value. Changes ``cfg`` in
    place.

    Args:
        cfg: the composed config (before ``OmegaConf.to_object``).
        overrides: the command-line overrides (``HydraConfig.get().overrides.task``), e.g.
            ``["model.name_or_path=/ckpt", "model.rope_theta=1e6"]``.
    Returns the fields kept because the command line sets them.
    """
    if not cfg.model.get("name_or_path"):
        return []
    given = {override_key(o) for o in overrides}
    kept = []
    for key in CHECKPOINT_FIELDS:
        if f"model.{key}" in given:
            kept.append(key)
        else:
            cfg.model[key] = None
    return kept


def register_configs() -> None:
    """Register the schema as ``base_config`` (used first in ``configs/config.yaml``'s defaults)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
