"""Model construction, the packed-batch loss and FLOP accounting.

Legend: T tokens of the packed micro-batch (micro_batch_size x seq_len, one row), V vocabulary,
Hd hidden size.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _set_rope_theta(config, theta: float) -> None:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        rope["rope_theta"] = theta
    config.rope_theta = theta


def _set_rope_scaling(config, scaling: dict) -> None:
    """Replace the RoPE scaling of an HF config (transformers' ``rope_scaling`` dict; the RoPE base kept)."""
    params = {("rope_type" if k == "type" else k): v for k, v in dict(scaling).items()}
    theta = rope_theta_of(config)
    if hasattr(config, "rope_parameters"):  # transformers >= 5: one dict holds the base and the scaling
        config.rope_parameters = {**params, "rope_theta": theta if theta is not None else 10000.0}
    else:
        config.rope_scaling = None if params.get("rope_type") == "default" else params


def rope_scaling_of(hf_cfg) -> dict | None:
    """The RoPE scaling of an HF config as a ``model.rope_scaling`` dict (None = no scaling)."""
    rope = getattr(hf_cfg, "rope_parameters", None)
    if not isinstance(rope, dict):
        rope = getattr(hf_cfg, "rope_scaling", None)
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) == "default":
        return None
    return {k: v for k, v in rope.items() if k != "rope_theta"}


# ModelConfig field -> the attribute of an HF config that holds it.
HF_NAMES = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
            "tie_embeddings": "tie_word_embeddings"}


# Files that hold an HF checkpoint's weights (one of them must be in model.name_or_path).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_checkpoint_dir(path: str) -> None:
    """Refuse a ``model.name_or_path`` that is not a directory, or that holds no weights file (``WEIGHT_FILES``).

    Raises:
        ValueError: naming ``model.name_or_path`` and the path.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"model.name_or_path={path!r} does not exist (a local HF checkpoint directory is expected)")
    if not p.is_dir():
        raise ValueError(f"model.name_or_path={path!r} is not a directory (an HF checkpoint directory is expected)")
    if not (p / "config.json").is_file():
        raise ValueError(f"model.name_or_path={path!r} holds no config.json: not an HF checkpoint directory")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise ValueError(f"model.name_or_path={path!r} holds no weights (none of {', '.join(WEIGHT_FILES)})")


def checkpoint_config(cfg: ModelConfig, log_changes: bool = False):
    """The HF config of ``model.name_or_path`` with the settings given on the command line applied.

    Fields left None keep the checkpoint's values. ``rope_theta`` and ``max_position_embeddings`` replace
    the checkpoint's; a shape field (or ``tie_embeddings``) must equal the checkpoint's, since its
    weights have that shape. With ``log_changes``, each replaced value is logged ("rope_theta 500000.0 ->
    1000000.0").

    Raises:
        ValueError: ``model.name_or_path`` does not exist, holds no weights or is not an HF checkpoint, or a
            shape field differs from it.
    """
    from transformers import AutoConfig

    check_checkpoint_dir(cfg.name_or_path)
    try:
        hf_cfg = AutoConfig.from_pretrained(cfg.name_or_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.name_or_path={cfg.name_or_path!r} is not an HF checkpoint: {e}") from e
    for key, attr in HF_NAMES.items():
        want, have = getattr(cfg, key), getattr(hf_cfg, attr, None)
        if key == "num_kv_heads" and have is None:
            have = hf_cfg.num_attention_heads
        if want is not None and want != have:
            raise ValueError(
                f"model.{key}={want} differs from the checkpoint's {have} (model.name_or_path={cfg.name_or_path!r}): "
                f"its weights have that shape; drop model.{key} to keep the checkpoint's"
            )
    changes = []
    if cfg.rope_scaling is not None:
        old = rope_scaling_of(hf_cfg)
        _set_rope_scaling(hf_cfg, cfg.rope_scaling)
        changes.append(("rope_scaling", old, rope_scaling_of(hf_cfg)))
    if cfg.rope_theta is not None:
        changes.append(("rope_theta", rope_theta_of(hf_cfg), float(cfg.rope_theta)))
        _set_rope_theta(hf_cfg, cfg.rope_theta)
    if cfg.max_position_embeddings is not None:
        changes.append(("max_position_embeddings", hf_cfg.max_position_embeddings, cfg.max_position_embeddings))
        hf_cfg.max_position_embeddings = cfg.max_position_embeddings
    for key, old, new in changes:
        if log_changes and old != new:
            log.info("model.%s overrides the checkpoint's: %s %s -> %s", key, key, old, new)
    return hf_cfg


def check_tokenizer_fits(cfg: ModelConfig, spec: str | None, setting: str) -> None:
    """Load the tokenizer ``spec`` (a ``data.tokenizer`` value) once, before any data work, and check that its
    vocabulary fits the embeddings of ``model.name_or_path`` (when set). ``setting`` names where ``spec``
    comes from (``data.tokenizer`` or ``model.name_or_path``). A None ``spec`` (a SentencePiece model trained
    on the corpus) is not checked.

    Raises:
        ValueError: the tokenizer cannot be read (naming ``setting`` and the path), or its vocabulary is
            larger than the model's ``vocab_size``.
    """
    from data import load_tokenizer

    if spec is None:
        return
    try:
        tok = load_tokenizer(spec, corpus_id="", train_texts=None, cache_dir=Path("."))
    except Exception as e:  # sentencepiece raises RuntimeError on a corrupt model, transformers OSError, ...
        raise ValueError(f"{setting}: the tokenizer {spec!r} cannot be read: {type(e).__name__}: {e}") from e
    if cfg.name_or_path:
        vocab = checkpoint_config(cfg).vocab_size
        if tok.vocab_size > vocab:
            raise ValueError(
                f"{setting}: the tokenizer {spec!r} has {tok.vocab_size} tokens, more than the {vocab} embeddings "
                f"of model.name_or_path={cfg.name_or_path!r}; use the model's own tokenizer"
            )


def rope_theta_of(hf_cfg) -> float | None:
    """The RoPE base of an HF config (``rope_parameters["rope_theta"]`` in transformers 5, else ``rope_theta``)."""
    rope = getattr(hf_cfg, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    theta = getattr(hf_cfg, "rope_theta", None)
    return float(theta) if theta is not None else None


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """A Llama-family causal LM in float32: loaded from ``cfg.name_or_path`` or freshly initialised.

    A loaded model keeps every value its checkpoint carries (RoPE base included) unless ``cfg`` sets it
    (see ``checkpoint_config``).

    Raises:
        ValueError: ``model.name_or_path`` is not a directory with an HF config, a shape field given on
            the command line differs from it, or its vocabulary is smaller than the tokenizer's
            (``vocab_size``).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    restore_unfused_modules()
    hf_cfg = hf_config(cfg, vocab_size, log_changes=True)
    if cfg.name_or_path:
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, config=hf_cfg, dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # missing / truncated / mismatched weights
            lines = str(e).strip().splitlines()
            detail = "\n".join(lines[:6]) + ("\n  ..." if len(lines) > 6 else "")
            raise ValueError(f"model.name_or_path={cfg.name_or_path}: its weights cannot be loaded "
                             f"({type(e).__name__}: {detail})") from e
        log.info("loaded %s (%.1fM parameters, rope_theta %s, rope_scaling %s)", cfg.name_or_path,
                 count_params(model) / 1e6, rope_theta_of(model.config), rope_scaling_of(model.config))
        return model
    model = LlamaForCausalLM(hf_cfg)
    log.info("initialised %s (%.1fM parameters)", cfg.name, count_params(model) / 1e6)
    return model


def hf_config(cfg: ModelConfig, vocab_size: int, log_changes: bool = False):
    """The HF config of the model ``build_model`` makes (the checkpoint's with the command line's changes,
    or a fresh Llama's), without building it.

    Raises:
        ValueError: as ``checkpoint_config``; or the checkpoint's vocabulary is smaller than ``vocab_size``.
    """
    from transformers import LlamaConfig

    if cfg.name_or_path:
        hf_cfg = checkpoint_config(cfg, log_changes=log_changes)
        if hf_cfg.vocab_size < vocab_size:
            raise ValueError(
                f"model.name_or_path={cfg.name_or_path!r} has vocab_size={hf_cfg.vocab_size} but the tokenizer "
                f"has {vocab_size}; set data.tokenizer to the model's tokenizer"
            )
        return hf_cfg
    hf_cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        attention_dropout=0.0,
    )
    _set_rope_theta(hf_cfg, cfg.rope_theta if cfg.rope_theta is not None else 10000.0)
    if cfg.rope_scaling is not None:
        _set_rope_scaling(hf_cfg, cfg.rope_scaling)
    return hf_cfg


def model_shape(cfg: ModelConfig) -> tuple[int, int, int]:
    """(attention heads, key/value heads, layers) of the configured model, read without building it
    (from the checkpoint's config.json when ``model.name_or_path`` is set), for checks before launch.

    Raises:
        ValueError: ``model.name_or_path`` has no readable HF config, or a shape field differs from it.
    """
    if not cfg.name_or_path:
        return cfg.num_heads, cfg.num_kv_heads, cfg.num_layers
    c = checkpoint_config(cfg)
    return c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads, c.num_hidden_layers


def count_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameters of ``model`` (tied weights once). ``exclude_embeddings``: without the input embedding and
    the LM head (tied or not), the N of the dense FLOP count, to which ``step_flops`` adds the LM head's
    matrix product itself."""
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        emb = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        n -= emb.numel()
        if out is not None and out.weight is not emb:
            n -= out.weight.numel()
    return n


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int):
    """Sum of token cross-entropies without materialising all logits.

    hidden: (T, Hd); weight: (V, Hd) LM head; labels: (T,) int64 with -100 = ignore. Each chunk of
    ``chunk`` tokens computes its fp32 logits under activation checkpointing, so peak memory is
    chunk x V. A chunk without valid labels adds exactly 0 (never NaN). Returns a 0-dim fp32 sum, connected
    to ``hidden``'s graph even when no label is valid.
    """

    def part(h, y):
        logits = F.linear(h, weight).float()
        return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")

    # 0, yet part of the graph: a rank whose tokens have no valid label (a padding-only sequence-parallel
    # shard) still runs backward, which the other ranks need for the all-to-alls in attention.
    total = hidden[:0].float().sum()
    for s in range(0, hidden.shape[0], chunk):
        h, y = hidden[s : s + chunk], labels[s : s + chunk]
        if not bool((y != IGNORE_INDEX).any()):
            continue
        total = total + (checkpoint(part, h, y, use_reentrant=False) if torch.is_grad_enabled() else part(h, y))
    return total


def model_type_of(cfg: ModelConfig) -> str:
    """The HF ``model_type`` of the model ``build_model`` makes (``llama`` for a fresh model, the checkpoint's
    otherwise), read without building it.

    Raises:
        ValueError: as ``checkpoint_config``.
    """
    return checkpoint_config(cfg).model_type if cfg.name_or_path else "llama"


def check_fused_model_type(model_type: str | None) -> None:
    """Refuse an architecture whose layers Liger-Kernel does not patch (its ``MODEL_TYPE_TO_APPLY_LIGER_FN``).

    Raises:
        ValueError: naming ``model.fused_ops`` and ``model_type``.
    """
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"model.fused_ops=true: Liger-Kernel has no fused ops for model_type={model_type!r}; "
                         "set model.fused_ops=false (or auto: fused where Liger-Kernel can)")


def fused_ops_enabled(setting, device: torch.device, model_type: str | None) -> bool:
    """Whether ``model.fused_ops`` (``"auto"``, True or False) turns Liger-Kernel's fused ops on for a model of
    ``model_type`` (``model_type_of``) on ``device``: ``auto`` = on a GPU when ``liger_kernel`` is installed and
    patches ``model_type``. Its Triton kernels need a GPU (or ``TRITON_INTERPRET=1``, which the CPU tests use).
    Called before any data or model work, so that a setting that cannot work fails at once.

    Raises:
        ValueError: ``model.fused_ops=true`` without ``liger_kernel`` installed, for a ``model_type`` it does not
            patch (``check_fused_model_type``), or on a CPU without the Triton interpreter.
    """
    import importlib.util

    have = importlib.util.find_spec("liger_kernel") is not None
    if setting == "auto":
        if not (have and device.type == "cuda"):
            return False
        try:
            check_fused_model_type(model_type)
        except ValueError:
            log.info("model.fused_ops=auto: Liger-Kernel has no fused ops for model_type=%r; the model runs unfused",
                     model_type)
            return False
        return True
    if not setting:
        return False
    if not have:
        raise ValueError("model.fused_ops=true needs Liger-Kernel: pip install liger-kernel (or model.fused_ops=false)")
    check_fused_model_type(model_type)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("model.fused_ops=true needs a GPU (Liger-Kernel's Triton kernels); on a CPU use "
                         "model.fused_ops=false (or TRITON_INTERPRET=1, very slow)")
    return True


FUSED_OPS = ("rms_norm", "rope", "swiglu")
# Per modeling module (e.g. transformers.models.llama.modeling_llama): the attributes Liger-Kernel replaced in it,
# as they were before the first replacement in this process.
_UNFUSED: dict[str, dict[str, object]] = {}


def restore_unfused_modules() -> None:
    """Undo Liger-Kernel's module-level replacements made by ``apply_fused_ops`` earlier in this process.

    Liger-Kernel patches the model's modeling module itself (for Llama: ``LlamaRMSNorm``, ``LlamaMLP`` and
    ``apply_rotary_pos_emb`` in ``modeling_llama``), not only the instance, so every model built after a fused
    one (the next job of an in-process Hydra sweep, ``python -m train.eval``, a test) got Liger's modules even
    with ``model.fused_ops=false``, and a ``model.compile=true`` model then failed in dynamo (``prepare_layers``).
    ``build_model`` calls this first. A fused model still alive keeps its Liger RMSNorm / SwiGLU modules; its
    RoPE (looked up in the module at each call) is PyTorch's again until ``apply_fused_ops`` runs once more.
    """
    for name, attrs in _UNFUSED.items():
        module = sys.modules.get(name)
        if module is not None:
            for attr, value in attrs.items():
                setattr(module, attr, value)


def apply_fused_ops(lm: nn.Module, ops: tuple[str, ...] = FUSED_OPS) -> None:
    """Swap ``lm``'s RMSNorm, rotary embedding and SwiGLU MLP (``ops``, a subset of ``FUSED_OPS``) for
    Liger-Kernel's fused Triton versions (Hsu et al. 2024, arXiv 2410.10989), in place (the rotary function
    is patched in the model's module).
    The loss is fused in ``PackedCausalLM(fused_loss=True)``, not through Liger's model forward, which
    the packed, document-masked forward here does not use.

    Raises:
        ValueError: ``lm``'s architecture (``config.model_type``) is one Liger-Kernel does not patch (the
            training loop has refused it before any work: ``fused_ops_enabled``), or ``ops`` holds another op.
    """
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    check_fused_model_type(getattr(lm.config, "model_type", None))
    unknown = set(ops) - set(FUSED_OPS)
    if unknown:
        raise ValueError(f"fused ops {sorted(unknown)} are not among {FUSED_OPS}")
    module = sys.modules[type(lm).__module__]
    before = dict(vars(module))
    _apply_liger_kernel_to_instance(model=lm, **{op: op in ops for op in FUSED_OPS}, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    originals = _UNFUSED.setdefault(module.__name__, {})
    for attr, value in before.items():  # the first original of each replaced attribute (restore_unfused_modules)
        if vars(module).get(attr) is not value:
            originals.setdefault(attr, value)


def compile_layers(lm: nn.Module) -> int:
    """``torch.compile`` every decoder layer of ``lm`` in place (``nn.Module.compile``: the module keeps its
    name and parameters, so checkpoints and ZeRO are unaffected); the attention call inside, MoBA's
    varlen kernels included, is left to run eagerly (``torch.compiler.disable``). Returns the number of
    layers compiled."""
    layers = lm.model.layers
    for layer in layers:
        attn = layer.self_attn
        attn.forward = torch.compiler.disable(attn.forward)
        layer.compile(dynamic=True)
    return len(layers)


# The ops whose outputs selective checkpointing keeps from the forward (by schema name): MoBA's routing
# (``train.recompute_routing=false``), and with it MoBA's Triton forward (``moba_core.triton_backend``: the route op
# and the kernels op) and the dense attention kernels of ``moba_core.varlen`` and PyTorch's SDPA
# (``train.recompute_attention=false``).
KEPT_ROUTING_OPS = frozenset({"moba::route"})
KEPT_ATTENTION_OPS = KEPT_ROUTING_OPS | frozenset({
    "moba::triton_fwd", "aten::_scaled_dot_product_cudnn_attention", "aten::_flash_attention_forward",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_efficient_attention_forward", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "flash_attn::_flash_attn_varlen_forward", "flash_attn::_flash_attn_forward",
})


def keep_ops_policy(kept: frozenset, ctx, op, *args, **kwargs):
    """Selective activation checkpointing policy (``torch.utils.checkpoint.create_selective_checkpoint_contexts``,
    with ``kept`` bound): keep the outputs of the ops named in ``kept`` (``namespace::name``), recompute
    everything else (norms, projections, RoPE, MLP)."""
    from torch.utils.checkpoint import CheckpointPolicy

    schema = getattr(op, "_schema", None)
    keep = schema is not None and schema.name in kept
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


keep_attention_policy = functools.partial(keep_ops_policy, KEPT_ATTENTION_OPS)  # train.recompute_attention=false
keep_routing_policy = functools.partial(keep_ops_policy, KEPT_ROUTING_OPS)  # train.recompute_routing=false


def checkpointing_kwargs(recompute_attention: bool = True, recompute_routing: bool = True) -> dict:
    """The ``gradient_checkpointing_kwargs`` of ``train.activation_checkpointing`` (non-reentrant
    ``torch.utils.checkpoint`` per decoder layer), with a selective policy when something is kept:

    - ``recompute_attention=False``: ``keep_attention_policy``. The attention kernels (MoBA's routing
      included) then run once per step instead of twice, at the memory of their outputs per layer (o: tokens x
      query heads x head dim in the model's dtype, the LSE and, for MoBA, the routing).
    - ``recompute_routing=False`` (attention recomputed): ``keep_routing_policy``. MoBA's routing
      (``torch.ops.moba.route``: block means, top-k, the key-block lists) runs once per step; its outputs stay
      (about 2 x tokens x query heads x (top_k - 1) x 4 bytes per MoBA layer). No effect on full attention.
    """
    kwargs = {"use_reentrant": False}
    policy = keep_attention_policy if not recompute_attention else None if recompute_routing else keep_routing_policy
    if policy is not None:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    return kwargs


def moba_layers_at_ends(schedule, layers: list[int], num_layers: int, steps: tuple[int, int]) -> list[list[int]]:
    """The MoBA layers at the first and at the last optimizer step a launch trains.

    Every schedule switches each layer at most once (``moba_core.schedule``), so what runs at these two steps
    decides what runs at any step between them: a layer is MoBA at some step iff it is at either end, and full
    at some step iff it is full at either end.

    Args:
        schedule: a ``moba_core.schedule.Schedule``; layers: the MoBA layers of the model; steps: (first 0-based
            step of this launch, ``train.max_steps``); a resumed launch starts at its checkpoint's step.
    Returns:
        ``[layers at the first step, layers at the last step]``, or ``[]`` when no step is left.
    """
    first, max_steps = steps
    if first >= max_steps:
        return []
    return [schedule.moba_layers_at(s, max_steps, sorted(layers), num_layers) for s in (first, max_steps - 1)]


def model_head_dim(lm: nn.Module) -> int:
    """Head dim of the HF model ``lm``'s attention: its attention modules' ``head_dim``, else the config's
    ``head_dim`` when set (not None), else ``hidden_size // num_attention_heads``."""
    from moba_core.hf import attention_modules

    mods = attention_modules(lm)
    hc = lm.config
    return (getattr(mods[0], "head_dim", None) if mods else None) or getattr(hc, "head_dim", None) or (
        hc.hidden_size // hc.num_attention_heads)


def kept_routing_reason(backend: str, device: torch.device, head_dim: int, moba_layers: list[int], schedule,
                        num_layers: int, steps: tuple[int, int]) -> str | None:
    """Why ``train.recompute_routing=false`` cannot keep anything in this launch, or None when it does: MoBA's
    routing is a separate op (``torch.ops.moba.route``) only on the ``triton`` backend (``backend`` as
    configured, resolved for ``device``) at head dims up to ``MAX_HEAD_DIM``, and only in layers that run MoBA
    at some step this launch trains (``schedule``: a ``moba_core.schedule.Schedule``; ``steps``: (first step,
    ``train.max_steps``), see ``moba_layers_at_ends``)."""
    from moba_core.attention import resolve_backend
    from moba_core.triton_backend import MAX_HEAD_DIM

    if not any(moba_layers_at_ends(schedule, moba_layers, num_layers, steps)):
        return (f"no layer runs MoBA in steps {steps[0] + 1}-{steps[1]} (schedule={schedule.name}, "
                f"moba layers {sorted(moba_layers)})")
    try:
        resolved = resolve_backend(backend, device)
    except ValueError as e:  # triton on a CPU without the interpreter (the config check stops MoBA runs before)
        return str(e)
    if resolved != "triton":
        return f"moba.backend={backend} runs the flash backend on {device.type}, which routes inside its own call"
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} > {MAX_HEAD_DIM} runs the flash backend"
    return None


def enable_activation_checkpointing(lm: nn.Module, recompute_attention: bool = True,
                                    recompute_routing: bool = True) -> None:
    """``train.activation_checkpointing``: every decoder layer of the HF model ``lm`` under non-reentrant
    ``torch.utils.checkpoint`` with ``checkpointing_kwargs(recompute_attention, recompute_routing)``, through
    transformers' ``activation_checkpointing_enable`` (its older name ``gradient_checkpointing_enable`` before
    transformers 5)."""
    kwargs = checkpointing_kwargs(recompute_attention, recompute_routing)
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_layers(lm: nn.Module, fused_ops: bool, compile: bool) -> str:
    """Apply ``model.fused_ops`` and ``model.compile`` to ``lm`` in place; returns what was done, for the log.

    With both on, the decoder layers are compiled without Liger-Kernel's RMSNorm / RoPE / SwiGLU inside them:
    dynamo fails tracing Liger's autograd Functions there (an AssertionError in ``overwrite_tensor_vt_proxy`` at
    ``LigerRMSNormFunction.apply``, torch 2.13 on an H200), and the compiler fuses those ops itself. The fused
    linear + cross-entropy (outside the layers, ``PackedCausalLM(fused_loss=True)``) stays.
    """
    if fused_ops and not compile:
        apply_fused_ops(lm)
    if compile:
        compile_layers(lm)
    if fused_ops and compile:
        return ("decoder layers compiled (RMSNorm, RoPE, SwiGLU fused by torch.compile); Liger-Kernel linear + "
                "cross-entropy")
    if fused_ops:
        return "Liger-Kernel fused (RMSNorm, RoPE, SwiGLU, linear + cross-entropy)"
    return "PyTorch (unfused)" + (", decoder layers compiled" if compile else "")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies by Liger-Kernel's fused linear + cross-entropy (the logits are made and
    consumed chunk by chunk inside the kernel, never for the whole sequence). Shapes and result as
    ``chunked_cross_entropy``: hidden (T, Hd), weight (V, Hd), labels (T,) int64 with -100 = ignore; a 0-dim
    fp32 sum, connected to ``hidden``'s graph even when no label is valid."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    total = hidden[:0].float().sum()
    if not bool((labels != IGNORE_INDEX).any()):
        return total
    loss = liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="sum",
                                            accum_dtype=torch.float32)
    return total + loss.float()


class PackedCausalLM(nn.Module):
    """Wraps an HF causal LM: packed micro-batch in, (sum of token losses, valid label count) out.

    forward(input_ids (1, T), labels (1, T), position_ids (1, T), cu_seqlens int32 (docs+1,), max_seqlen)
    -> (loss_sum fp32 0-dim, n_valid int64 0-dim); with ``tail_from=P`` also the loss sum and count of the
    tokens at document position >= P (the trailing-token loss the MoBA paper tracks, Sec. 3.1).
    Documents are kept apart by passing ``cu_seqlens`` to every attention layer as the flash-attention
    keyword arguments.
    """

    def __init__(self, lm: nn.Module, loss_chunk_tokens: int = 4096, fused_loss: bool = False):
        super().__init__()
        self.lm = lm
        self.loss_chunk_tokens = loss_chunk_tokens
        self.fused_loss = fused_loss

    def _loss_sum(self, hidden, weight, labels):
        if self.fused_loss:
            return fused_linear_cross_entropy(hidden, weight, labels)
        return chunked_cross_entropy(hidden, weight, labels, self.loss_chunk_tokens)

    def forward(self, input_ids, labels, position_ids, cu_seqlens, max_seqlen: int, tail_from: int | None = None):
        out = self.lm.model(
            input_ids=input_ids,
            position_ids=position_ids,
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=max_seqlen,
            max_length_k=max_seqlen,
            use_cache=False,
        )
        hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        labels = labels.reshape(-1)
        weight = self.lm.get_output_embeddings().weight
        loss_sum = self._loss_sum(hidden, weight, labels)
        if tail_from is None:
            return loss_sum, (labels != IGNORE_INDEX).sum()
        tail = labels.masked_fill(position_ids.reshape(-1) < tail_from, IGNORE_INDEX)
        tail_sum = self._loss_sum(hidden, weight, tail)
        return loss_sum, (labels != IGNORE_INDEX).sum(), tail_sum, (tail != IGNORE_INDEX).sum()


def dense_attention_max_len(seq_len: int, layer_cfgs: dict, num_layers: int, schedule,
                            steps: tuple[int, int] | None = None) -> int:
    """Longest causal sequence the dense attention primitives (``moba_core.varlen``) can get in a run whose
    documents are at most ``seq_len`` tokens: ``seq_len`` when some layer runs full attention at some step
    (a layer without MoBA, or a MoBA layer the schedule keeps full), else the longest dense part of a MoBA layer
    (a document's first ``top_k`` blocks, ``moba_core.triton_backend.dense_blocks_of``), 0 without dense path.

    Args:
        layer_cfgs: ``{layer: MoBAConfig}`` of the MoBA layers (``MoBAConfig.for_layer``).
        schedule: a ``moba_core.schedule.Schedule``, or its name.
        steps: (first step, ``train.max_steps``): the 0-based optimizer steps this launch trains, from the first
            to ``max_steps - 1`` (a resumed run: from the step it resumes at); None: any step (a schedule other
            than ``moba`` then counts as running full attention).
    """
    from moba_core.schedule import Schedule
    from moba_core.triton_backend import dense_blocks_of

    schedule = Schedule(schedule) if isinstance(schedule, str) else schedule
    if steps is not None and steps[0] >= steps[1]:
        return 0  # nothing left to train
    if len(layer_cfgs) < num_layers:
        return seq_len
    if steps is None:
        full_some_step = schedule.name != "moba"
    else:
        layers = sorted(layer_cfgs)
        full_some_step = any(ends != layers for ends in moba_layers_at_ends(schedule, layers, num_layers, steps))
    if full_some_step:
        return seq_len
    return max((min(seq_len, dense_blocks_of(c.top_k) * c.block_size) for c in layer_cfgs.values()), default=0)


def warm_attention_plans(lm: nn.Module, max_len: int, sp_size: int, device: torch.device,
                         dtype: torch.dtype = torch.bfloat16, show: bool = False) -> tuple[list[int], float]:
    """Build cuDNN's attention plans for every padded document length up to ``max_len`` tokens before training
    (``moba_core.varlen.CudnnVarlen.warmup``; ``train.warmup_attention_plans``), at the shape every layer calls
    them with: the model's query heads divided by ``sp_size`` (Ulysses gives each rank whole heads), its head
    dim and softmax scale. A no-op (nothing built) where the dense primitives are not cuDNN (a CPU, another
    GPU, fp32, ``MOBA_CUDNN_ATTENTION=0``). Returns (the lengths built, seconds)."""
    import time

    from moba_core.hf import attention_modules
    from moba_core.varlen import CudnnVarlen, varlen_primitives

    hc = lm.config
    mods = attention_modules(lm)  # wherever the architecture keeps them (not always lm.model.layers)
    attn = mods[0] if mods else None
    head_dim = model_head_dim(lm)
    prims = varlen_primitives(device, dtype, head_dim)
    if not isinstance(prims, CudnnVarlen) or max_len < prims.min_seqlen:
        return [], 0.0
    scale = getattr(attn, "scaling", None) or head_dim ** -0.5
    t0 = time.perf_counter()
    from tqdm import tqdm

    with tqdm(total=len(prims.plan_lengths(max_len)), desc="cuDNN attention plans", disable=not show,
              dynamic_ncols=True) as bar:
        built = prims.warmup(max_len, hc.num_attention_heads // sp_size, head_dim, dtype, device, scale,
                             progress=lambda done, total, L: bar.update(1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return built, time.perf_counter() - t0


def attended_keys(cu_seqlens: torch.Tensor, block_size: int | None, top_k: int) -> int:
    """Query-key pairs one head computes for a packed batch: causal within each document, and under MoBA
    (``block_size`` set) the current block's causal prefix plus up to ``top_k - 1`` earlier full blocks.
    Used for FLOP counts (packed documents are not one long sequence; causal is not a full square)."""
    total = 0
    for n in (cu_seqlens[1:] - cu_seqlens[:-1]).tolist():
        if block_size is None:
            total += n * (n + 1) // 2
            continue
        pos = torch.arange(n, dtype=torch.int64)
        blk = pos // block_size
        total += int((pos % block_size + 1 + torch.clamp(blk, max=top_k - 1) * block_size).sum())
    return total


def step_flops(n_params_nonembed: int, n_tokens: int, num_layers: int, q_dim: int, pairs_full: int,
               pairs_moba: list[int], vocab: int, hidden: int) -> float:
    """Model FLOPs of one forward + backward, the numerator of MFU (PaLM's definition, Chowdhery et al. 2022,
    App. B): 6 x (N + vocab x hidden) per token for the matrix products of the weights (``n_params_nonembed``
    = N without the input embedding and LM head, ``count_params(exclude_embeddings=True)``; the LM head's
    product is the vocab x hidden term), plus 12 x q_dim per attended query-key pair and layer (QK^T and
    PV, 2 FLOPs per multiply-add, x3 for forward + backward). ``pairs_moba``: the pairs of each layer that
    runs MoBA (``attended_keys`` with that layer's block size and top-k); the other layers attend
    ``pairs_full`` (causal pairs per document). Activation-checkpointing recompute and MoBA's routing
    (mean pooling and block scores) are not counted: MFU, not hardware FLOPs utilisation."""
    dense = 6.0 * (n_params_nonembed + vocab * hidden) * n_tokens
    attn = 12.0 * q_dim * (sum(pairs_moba) + pairs_full * (num_layers - len(pairs_moba)))
    return dense + attn


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of one GPU (None on a CPU or an unknown GPU: MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
