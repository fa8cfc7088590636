"""One training stage: config checks, data, model, DeepSpeed engine, the loop, checkpoints and logs."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moba_core.hf import apply_moba, set_moba_layers

from . import checkpoint as ckpt
from . import data_identity
from .config import ADAMW_IMPLEMENTATIONS, ConfigError, RunConfig, as_config_error
from .distributed import DistInfo, device_type, init_distributed, world_from_env
from .eval import tasks_during_training
from .export import moba_record, set_plain_file_modes
from .guard import NonFiniteError, NonFiniteGuard
from .metrics import MetricsLogger, progress_shown
from .model import (
    IGNORE_INDEX,
    PackedCausalLM,
    attended_keys,
    build_model,
    check_tokenizer_fits,
    count_params,
    dense_attention_max_len,
    enable_activation_checkpointing,
    fused_ops_enabled,
    kept_routing_reason,
    model_head_dim,
    model_shape,
    model_type_of,
    peak_flops,
    prepare_layers,
    step_flops,
    warm_attention_plans,
)
from .preemption import PreemptionFlag, describe, exit_status, restore_signal_handlers
from .profiling import StepProfiler
from .rundir import check_same_run_dir, record_config
from .sequence_parallel import init_sp_groups, shard_batch, sp_attention

log = logging.getLogger(__name__)


def adamw_options(implementation: str, device: torch.device, offload_optimizer: bool) -> dict:
    """Keyword arguments of ``torch.optim.AdamW`` for ``optim.implementation``.

    ``auto`` is ``fused`` on a CUDA device when the optimizer states stay on it (no
    ``parallel.offload_optimizer``), and torch's default elsewhere: one kernel per step instead of a chain of
    multi-tensor passes over the fp32 states (torchtitan's default too). The choice changes no result beyond
    rounding and not the checkpoint format, so it may differ between a run and its resume
    (``follow_optim_settings`` applies the resumed launch's choice).

    Raises:
        ValueError: an implementation outside ``ADAMW_IMPLEMENTATIONS``.
    """
    if implementation == "auto":
        return {"fused": True} if device.type == "cuda" and not offload_optimizer else {}
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
    if implementation not in options:
        raise ValueError(f"optim.implementation={implementation!r} must be one of {', '.join(ADAMW_IMPLEMENTATIONS)}")
    return options[implementation]


def deepspeed_config(cfg: RunConfig, info: DistInfo) -> dict:
    """The DeepSpeed config dict, generated from the typed config (never hand-edited per experiment)."""
    zero = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": info.device.type == "cuda"}
        # Our torch AdamW then steps the CPU-resident states (DeepSpeedCPUAdam would need a JIT C++ build).
        ds_extra = {"zero_force_ds_cpu_optimizer": False}
    else:
        ds_extra = {}
    if cfg.parallel.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum * info.dp_size,
        "zero_optimization": zero,
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": info.device.type == "cuda"},
        "zero_allow_untested_optimizer": True,
        **ds_extra,
    }
    if info.sp_size > 1:
        ds["sequence_parallel_size"] = info.sp_size
    return ds


def lr_lambda(cfg: RunConfig):
    """Linear warmup over ``optim.warmup_steps``, then cosine decay to ``lr * optim.min_lr_ratio``."""
    warm, total, floor = cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def follow_schedule(scheduler, lr: float) -> None:
    """Put a ``LambdaLR`` ``scheduler`` just loaded from a checkpoint on this launch's schedule: base LR ``lr``
    (``optim.lr``) and its lambdas (``train.max_steps``, ``optim.warmup_steps``, ``optim.min_lr_ratio``) at the
    step it resumes at. The checkpoint brings back the base LR and the rate of the schedule it was saved
    with, so without this a changed ``optim.lr`` was ignored and the first resumed step ran at the old rate."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    lrs = [base * lam(scheduler.last_epoch) for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = rate
    scheduler._last_lr = lrs


def bf16_grad_accum_warning(device: torch.device, grad_accum: int, zero_stage: int) -> str | None:
    """The warning for a step whose micro-batch gradients DeepSpeed sums in bf16, or None.

    With bf16 (every GPU run here) and ``train.grad_accum`` > 1, DeepSpeed 0.19 accumulates the micro-batches'
    gradients in the parameters' dtype: ``param.grad`` at ZeRO 0 (its DDP_BFLOAT16 path), bf16 gradient
    buffers at ZeRO 1-3 (also the CPU buffers of optimizer offload at ZeRO 1-2), so every partial sum is
    rounded to bf16's 8-bit mantissa (relative error up to ~2^-9 per addition). Its fp32 accumulation
    (``data_types.grad_accum_dtype``) exists only at ZeRO 1 without offload, through another optimizer wrapper
    with another checkpoint layout, and is not used here. On a CPU the run is fp32 throughout.
    """
    if device.type != "cuda" or grad_accum <= 1:
        return None
    return (f"train.grad_accum={grad_accum} with bf16: DeepSpeed sums the micro-batches' gradients in bf16 at "
            f"ZeRO stage {zero_stage} (each partial sum rounded to 8 mantissa bits); a larger "
            f"train.micro_batch_size with a smaller train.grad_accum needs fewer of these roundings")


def adamw_param_groups(params, weight_decay: float) -> list[dict]:
    """AdamW's two parameter groups: matrices (dim >= 2) decay by ``optim.weight_decay``, vectors (norms, biases)
    never (group 1; ``follow_optim_settings`` relies on this order)."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def follow_optim_settings(optimizer: torch.optim.Optimizer, o, adamw: dict) -> None:
    """Put an AdamW ``optimizer`` just loaded from a checkpoint on this launch's ``optim`` settings: ``betas``,
    ``eps``, the decay group's ``weight_decay`` (group 0; group 1 never decays) and the kernels of
    ``adamw_options`` (``fused`` / ``foreach``). ``Optimizer.load_state_dict`` brings back the saved groups'
    values, so without this a changed ``optim.implementation`` (or beta, eps, weight decay) was ignored on
    resume. Each state's ``step`` moves where the kernels keep it (fp32 on the parameter's device for fused,
    on the CPU otherwise), as torch does when it loads a state into such an optimizer."""
    fused = bool(adamw.get("fused"))
    for i, group in enumerate(optimizer.param_groups):
        group.update(betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay if i == 0 else 0.0,
                     fused=adamw.get("fused"), foreach=adamw.get("foreach"))
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device if fused else "cpu", dtype=torch.float32)


def adamw_kernels(optimizer: torch.optim.Optimizer) -> str:
    """The kernels the first param group of ``optimizer`` will run, for the log: fused, foreach, for-loop or
    torch's default."""
    group = optimizer.param_groups[0]
    if group.get("fused"):
        return "fused=True"
    if group.get("foreach") is not None:
        return f"foreach={group['foreach']}"
    return "torch's default"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def loss_scale(shards: list[dict], grad_accum: int, info: DistInfo) -> float:
    """The factor on each micro-batch's summed token loss that makes the step's gradient that of the mean
    over all valid tokens of the step, whatever its split into micro-batches, data-parallel and
    sequence-parallel ranks: ``grad_accum * dp_size / N``, N = the step's valid labels counted on every
    rank (``shards``: this rank's micro-batches, after sequence sharding) and summed over all ranks.
    DeepSpeed divides the loss by ``grad_accum`` in ``backward`` and averages gradients over the
    data-parallel ranks (summing over the sequence-parallel ones); the factor undoes both exactly.
    Collective: every rank calls it once per step."""
    local = sum(float((b["labels"] != IGNORE_INDEX).sum()) for b in shards)
    (n_step,) = _all_reduce_sum([local], info.device)
    return grad_accum * info.dp_size / max(n_step, 1.0)


def unsharded_grad_norm(engine, zero_stage: int) -> float | None:
    """Global grad norm before clipping when gradients are whole on every rank (ZeRO 0: DeepSpeed has
    all-reduced them in ``backward`` at the accumulation boundary but reports no norm on that path).
    ZeRO >= 1 partitions gradients; DeepSpeed's own ``get_global_grad_norm`` covers those stages."""
    if zero_stage != 0:
        return None
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else None


def evaluate(engine, val_loader, info: DistInfo, batches: int, tail_from: int) -> dict:
    """Validation loss per valid token over the same ``batches`` micro-batches per rank every time (all
    ranks), and the trailing loss: tokens at document position >= ``tail_from``. Returns
    ``{"val_loss", "val_loss_tail"}`` (the tail is None when no document reaches ``tail_from``)."""
    engine.eval()
    sums = [0.0, 0.0, 0.0, 0.0]
    val_loader.sampler.load_state_dict({"consumed_samples": 0})  # the same batches at every evaluation
    it = iter(val_loader)
    with torch.no_grad():
        for _ in range(batches):
            b = to_device(shard_batch(next(it), info.sp_rank, info.sp_size), info.device)
            out = engine(b["input_ids"], b["labels"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"],
                         tail_from=tail_from)
            sums = [a + float(x) for a, x in zip(sums, out)]
    engine.train()
    tot, n, tail, n_tail = _all_reduce_sum(sums, info.device)
    return {"val_loss": tot / max(n, 1.0), "val_loss_tail": tail / n_tail if n_tail else None}


def run(cfg: RunConfig, run_dir: Path, config_dict: dict) -> dict:
    """Train one stage as configured (``_run``); returns the final metrics. However it ends, the signal
    handlers it installed (``PreemptionFlag``) are put back."""
    try:
        return _run(cfg, run_dir, config_dict)
    finally:
        restore_signal_handlers()


def _run(cfg: RunConfig, run_dir: Path, config_dict: dict) -> dict:
    """Train one stage as configured; returns the final metrics. Every check runs before GPU work."""
    import deepspeed

    from data import build_data, build_dataloader
    from data.prepared import is_prepared

    # Every rank checks the same things before any collective or GPU work: an error on one rank only
    # would leave the others waiting in an all-to-all.
    rank, world_size, _ = world_from_env()
    # Errors of the setup steps (the settings, the checkpoint to resume, the data, the tokenizer, the model) name the
    # setting at fault: ConfigError, shown as "error: ..." by python -m train.
    with as_config_error():
        cfg.check(world_size=world_size, shape=model_shape(cfg.model))
        if rank == 0:  # once per run, not once per process
            for warning in cfg.warnings():
                log.warning(warning)
        ckpt_dir = ckpt.checkpoint_dir(cfg.checkpoint.dir, run_dir)
        ckpt.check_same_checkpoint_dir(run_dir, ckpt_dir)
        resume = ckpt.resolve_resume(cfg.resume, ckpt_dir)
        run_config = {**config_dict, "world_size": world_from_env()[1]}
        if resume is not None:
            ckpt.check_resume_compatible(resume[0], resume[1], run_config)
        # The run's corpus and tokenizer stay the ones it started with (data_identity.py).
        saved_data = data_identity.saved_identity(*resume) if resume is not None else None
        data_identity.check_corpus_unchanged(saved_data, cfg.data.path)
        tokenizer_spec = data_identity.tokenizer_spec(cfg.data.tokenizer, cfg.model.name_or_path, saved_data)
        check_tokenizer_fits(cfg.model, tokenizer_spec, "data.tokenizer" if cfg.data.tokenizer else
                             "model.name_or_path" if cfg.model.name_or_path else "the run's stored tokenizer")
        # before any data or distributed work: a bad value, or an architecture Liger-Kernel does not patch, fails now
        fused_ops = fused_ops_enabled(cfg.model.fused_ops, torch.device(device_type(cfg.device)),
                                      model_type_of(cfg.model))
    info = init_distributed(cfg.device, cfg.parallel.sp_size)
    check_same_run_dir(run_dir)  # every rank writes into rank 0's run directory
    mpu = sp_group = None
    if info.sp_size > 1:
        mpu = init_sp_groups(info.sp_size)
        sp_group = mpu.get_sequence_parallel_group()
    seed_everything(cfg.seed + info.dp_rank)
    run_dir.mkdir(parents=True, exist_ok=True)

    # Data: rank 0 builds the caches first, the others then read them.
    d = cfg.data
    # Continuing from a model directory uses the tokenizer saved there unless data.tokenizer says otherwise.
    data_kwargs = dict(path=d.path, tokenizer=tokenizer_spec,
                       vocab_size=d.vocab_size, seq_len=d.seq_len, packing=d.packing, cache_dir=d.cache_dir,
                       documents=d.documents)

    def build_splits():
        with as_config_error():
            return build_data(split="train", **data_kwargs), build_data(split="val", **data_kwargs)

    # Rank 0 builds the caches first; the others then read them. Its outcome goes to every rank, so a data error
    # stops them all with its message (not a lost connection in a barrier).
    error = built = None
    if info.is_main:
        try:
            built = build_splits()
        except ConfigError as e:
            error = e
    outcome = [None if error is None else str(error)]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise ConfigError(f"{outcome[0]} (rank 0's data setup)")
    (train_ds, tokenizer), (val_ds, _) = built if built is not None else build_splits()
    with as_config_error():
        data_identity.check_tokenizer_unchanged(saved_data, tokenizer, tokenizer_spec)  # on every rank
    given = None  # where the tokenizer comes from when it is not trained on the corpus
    if is_prepared(d.path):
        given = f"data.path={d.path} (prepared)"
    elif d.tokenizer:
        given = f"data.tokenizer={d.tokenizer}"
    elif cfg.model.name_or_path:
        given = f"model.name_or_path={cfg.model.name_or_path}"
    unused = d.unused_vocab_size(tokenizer.vocab_size, given)
    if unused and info.is_main:
        log.warning(unused)
    run_config["data_identity"] = data_identity.identity(d.path, tokenizer, run_dir)
    if info.is_main:
        data_identity.store_tokenizer(tokenizer, run_dir, saved_data)
    train_loader = build_dataloader(train_ds, cfg.train.micro_batch_size, seed=cfg.seed,
                                    dp_rank=info.dp_rank, dp_size=info.dp_size)
    val_loader = build_dataloader(val_ds, cfg.train.micro_batch_size, seed=cfg.seed, dp_rank=info.dp_rank,
                                  dp_size=info.dp_size, shuffle=False)

    # Model.
    with as_config_error():
        lm = build_model(cfg.model, tokenizer.vocab_size)
    num_layers = lm.config.num_hidden_layers
    moba_cfg = cfg.moba.to_moba_config()
    schedule = cfg.schedule.to_schedule()
    # Every layer goes through moba_core's attention function (full layers are document-masked too);
    # the schedule below decides when the MoBA layers run MoBA.
    if sp_group is not None:
        name, fn = sp_attention(sp_group)
        moba_layer_ids = apply_moba(lm, moba_cfg, name=name, fn=fn)
    else:
        moba_layer_ids = apply_moba(lm, moba_cfg)
    ops_done = prepare_layers(lm, fused_ops, cfg.model.compile)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(lm, cfg.train.recompute_attention, cfg.train.recompute_routing)
        if not cfg.train.recompute_attention:
            log.info("activation checkpointing keeps the attention outputs (train.recompute_attention=false)")
    elif not (cfg.train.recompute_attention and cfg.train.recompute_routing):
        log.info("train.recompute_attention / train.recompute_routing have no effect without "
                 "train.activation_checkpointing (nothing is recomputed)")
    model = PackedCausalLM(lm, cfg.train.loss_chunk_tokens, fused_loss=fused_ops)
    log.info("model ops: %s", ops_done)
    o = cfg.optim
    adamw = adamw_options(o.implementation, info.device, cfg.parallel.offload_optimizer)
    optimizer = torch.optim.AdamW(adamw_param_groups(model.parameters(), o.weight_decay), lr=o.lr,
                                  betas=(o.beta1, o.beta2), eps=o.eps, **adamw)
    guard = NonFiniteGuard(optimizer, info.device)  # NaN / inf steps apply no update (train/guard.py)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, info), mpu=mpu
    )

    step, tokens = 0, 0
    if resume is not None:
        with as_config_error():
            state = ckpt.load(engine, resume[0], resume[1], info.rank)
        step, tokens = int(state["step"]), int(state["tokens"])
        follow_schedule(scheduler, cfg.optim.lr)  # a changed train.max_steps / optim.lr applies from this step
        follow_optim_settings(optimizer, cfg.optim, adamw)  # and a changed optim.implementation, betas, eps, ...
        train_loader.sampler.load_state_dict(state["sampler"])
        if info.is_main:
            log.info("resumed from %s at step %d (%d tokens seen)", resume[0] / resume[1], step, tokens)
    elif info.is_main:
        log.info("starting from scratch (no checkpoint in %s)", ckpt_dir)
        drop_stale_export(run_dir / "hf", keep=[cfg.model.name_or_path, cfg.data.tokenizer])
    if info.is_main:
        log.info("optimizer: AdamW, optim.implementation=%s (%s)", cfg.optim.implementation, adamw_kernels(optimizer))
        accum = bf16_grad_accum_warning(info.device, cfg.train.grad_accum, cfg.parallel.zero_stage)
        if accum:
            log.warning(accum)
    if info.is_main:  # config.json, config-history/, and the settings changed since the checkpoint
        record_config(run_dir, run_config, resume[0] / resume[1] if resume is not None else None)
    if info.is_main and cfg.train.activation_checkpointing and cfg.train.recompute_attention \
            and not cfg.train.recompute_routing:  # known once the launch's first step is (after a resume)
        why = kept_routing_reason(cfg.moba.backend, info.device, model_head_dim(lm), moba_layer_ids, schedule,
                                  num_layers, (step, cfg.train.max_steps))
        if why is None:
            log.info("activation checkpointing keeps MoBA's routing (train.recompute_routing=false)")
        else:
            log.info("train.recompute_routing=false has no effect in this launch: %s", why)
    start_step, eval_step, val = step, None, {}
    if info.is_main and 0 < cfg.train.profile_step <= step < cfg.train.max_steps:  # resumed past it
        log.warning("train.profile_step=%d lies before this launch's first step (%d): no step is profiled",
                    cfg.train.profile_step, step + 1)
    tail_from = cfg.data.seq_len // 2  # trailing loss: the second half of (long enough) documents

    def validate() -> dict:
        """Validation loss, plus python -m train.eval's tasks (``train.eval_tasks``, rank 0: train/eval.py)."""
        val = evaluate(engine, val_loader, info, cfg.train.eval_batches, tail_from)
        if cfg.train.eval_tasks and info.is_main:
            val.update(tasks_during_training(lm, tokenizer, data_kwargs, cfg.train.eval_tasks, cfg.seed))
        return val

    metrics = MetricsLogger(run_dir, step, cfg.logging.wandb, config_dict, cfg.train.max_steps,
                            cfg.logging.progress_bar, enabled=info.is_main)
    n_nonembed = count_params(lm, exclude_embeddings=True)
    peak = peak_flops(info.device)
    hc = lm.config
    q_dim = hc.num_attention_heads * model_head_dim(lm)
    train_iter = iter(train_loader)
    last = {}

    # Each MoBA layer's own block size and top-k (moba.layers), for the FLOP count.
    layer_cfgs = {i: moba_cfg.for_layer(i, num_layers) for i in moba_layer_ids}
    if cfg.train.warmup_attention_plans:
        max_len = dense_attention_max_len(cfg.data.seq_len, layer_cfgs, num_layers, schedule,
                                          (step, cfg.train.max_steps))
        built, secs = warm_attention_plans(lm, max_len, info.sp_size, info.device,
                                           show=info.is_main and progress_shown(cfg.logging.progress_bar))
        if built and info.is_main:
            log.info("cuDNN attention plans for %d lengths (%d-%d tokens) built in %.1f s "
                     "(train.warmup_attention_plans)", len(built), built[0], built[-1], secs)
        if built:  # the steps' peak memory (mem_gb) is training's own, not the warm-up's random tensors
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(info.device)
    current: list[int] | None = None

    def use_schedule_of(s: int) -> list[int]:
        """Set every MoBA layer to MoBA or full attention as the schedule has it at optimizer step ``s``
        (0-based); returns the layers that run MoBA. Logs the layers whose attention changes."""
        nonlocal current
        layers = schedule.moba_layers_at(s, cfg.train.max_steps, moba_layer_ids, num_layers)
        if info.is_main and current is None:
            log.info("schedule %s: MoBA in layers %s, full attention in %s", schedule.name, layers,
                     [i for i in range(num_layers) if i not in layers])
        elif info.is_main and layers != current:  # step numbers as in metrics.jsonl (1 = the first step)
            for i in sorted(set(layers) ^ set(current)):
                log.info("schedule %s: layer %d %s from step %d on (%d of %d layers run MoBA)", schedule.name, i,
                         "full -> MoBA" if i in layers else "MoBA -> full", s + 1, len(layers), num_layers)
        current = layers
        set_moba_layers(lm, layers)
        return layers

    # An evaluation uses the attention of the step it evaluates: step 0's before training, else that of the
    # last step trained (set below for every step this launch trains).
    use_schedule_of(max(step - 1, 0))
    if resume is None:  # the starting point of the stage, to compare the end against
        metrics.log_eval(0, validate())
        eval_step = 0

    def client_state() -> dict:
        return {"step": step, "tokens": tokens, "sampler": train_loader.sampler.state_dict()}

    pre_clip_norm = None
    preempt = PreemptionFlag(saves=cfg.checkpoint.enabled)
    while step < cfg.train.max_steps:
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        moba_now = use_schedule_of(step)
        profiler = None
        if step + 1 == cfg.train.profile_step:
            profiler = StepProfiler(run_dir, step + 1, info.rank, info.device).__enter__()
        t0 = time.perf_counter()
        loss_sum, n_valid, n_tok, flops = 0.0, 0.0, 0, 0.0
        fulls = [next(train_iter) for _ in range(cfg.train.grad_accum)]  # the whole step's micro-batches
        shards = [to_device(shard_batch(full, info.sp_rank, info.sp_size), info.device) for full in fulls]
        scale = loss_scale(shards, cfg.train.grad_accum, info)
        for full, b in zip(fulls, shards):
            ls, nv = engine(b["input_ids"], b["labels"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"])
            guard.see_loss(ls)
            engine.backward(ls * scale)
            if engine.is_gradient_accumulation_boundary():
                pre_clip_norm = unsharded_grad_norm(engine, cfg.parallel.zero_stage)
            engine.step()
            loss_sum += float(ls.detach())
            n_valid += float(nv)
            n_tok += b["input_ids"].numel()  # this shard's tokens: the sum over ranks counts each once
            cu = full["cu_seqlens"]
            pairs = {}  # (block_size, top_k) -> attended query-key pairs of this micro-batch
            for i in moba_now:
                key = (layer_cfgs[i].block_size, layer_cfgs[i].top_k)
                if key not in pairs:
                    pairs[key] = attended_keys(cu, *key)
            flops += step_flops(
                n_nonembed, full["input_ids"].numel(), num_layers, q_dim, attended_keys(cu, None, 1),
                [pairs[(layer_cfgs[i].block_size, layer_cfgs[i].top_k)] for i in moba_now],
                hc.vocab_size, hc.hidden_size,
            )
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if profiler is not None:
            profiler.__exit__(None, None, None)
        loss_sum, n_valid, n_tok, flops = _all_reduce_sum([loss_sum, n_valid, n_tok, flops], info.device)
        flops /= info.sp_size  # every sp rank counted the FLOPs of the whole sample
        step += 1
        tokens += int(n_tok)
        skipped = guard.end_step(scheduler)
        if skipped and info.is_main:
            log.warning("step %d skipped: non-finite loss or gradient (%d in a row, train.max_skipped_steps=%d)",
                        step, guard.in_row, cfg.train.max_skipped_steps)
        if skipped or step % cfg.train.log_every == 0 or step == cfg.train.max_steps or profiler is not None:
            grad_norm = engine.get_global_grad_norm()
            grad_norm = pre_clip_norm if grad_norm is None else grad_norm
            last = {
                "step": step,
                "loss": loss_sum / max(n_valid, 1.0),
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "lr": lr,
                "tokens": tokens,
                "tokens_per_s": n_tok / dt,
                "mfu": flops / dt / (peak * info.world_size) if peak else None,
                "moba_layers": len(moba_now),  # how many layers ran MoBA in this step
                "moba_layer_ids": moba_now,  # which (the others ran full attention)
                "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if info.device.type == "cuda" else None,
                "skipped": skipped,  # the update was skipped: non-finite loss or gradient
            }
            if profiler is not None:
                last["profiled"] = True  # under torch.profiler (train.profile_step): its times include the overhead
            metrics.log(last)
        if guard.in_row > cfg.train.max_skipped_steps:
            metrics.close()
            good = ckpt.latest_tag(ckpt_dir)
            raise NonFiniteError(
                f"step {step}: the loss or gradient norm was not finite in {guard.in_row} steps in a row "
                f"(train.max_skipped_steps={cfg.train.max_skipped_steps}); stopped without saving. The last good "
                + (f"checkpoint is kept: {ckpt_dir / good}" if good else "checkpoint: none was saved")
                + "; resume from it with a lower optim.lr or a larger optim.warmup_steps"
            )
        if cfg.train.eval_every and step % cfg.train.eval_every == 0:
            val = validate()
            metrics.log_eval(step, val)
            eval_step = step
        stop = preempt.requested(info.device)
        save_now = stop or (not skipped and step % cfg.checkpoint.every == 0) or step == cfg.train.max_steps
        saved = None
        if save_now and cfg.checkpoint.enabled:
            saved = ckpt.save(engine, ckpt_dir, step, client_state(), cfg.checkpoint.keep, info.rank, run_config)
        if stop:
            if info.is_main:
                log.warning(stop_message(preempt.signum, step, saved, run_dir, cfg.resume))
            preempt.restore()
            metrics.close()
            return {**last, "step": step, "preempted": True, "signal": preempt.signum}

    # The final evaluation and HF export. A launch stopped or killed after its last checkpoint left them
    # undone; this one (resumed at that step) does them. A signal from here on stops before the next of them.
    need_eval = eval_step != step and not _all_reduce_sum([float(metrics.has_eval(step))], info.device)[0]
    need_export = cfg.checkpoint.export_hf and exported_step(run_dir / "hf") != step
    if step == start_step and info.is_main:
        todo = " and ".join(w for w, n in (("the final evaluation", need_eval), ("the HF export", need_export)) if n)
        log.info("the checkpoint is at step %d, train.max_steps=%d: %s", step, cfg.train.max_steps,
                 f"doing what the last launch left undone: {todo}" if todo
                 else "nothing to train (raise train.max_steps to continue)")
    preempt.phase = "the final evaluation"
    if need_eval and not preempt.requested(info.device):
        val = validate()
        metrics.log_eval(step, val)
        need_eval = False
    preempt.phase = "the HF export"
    if need_export and not preempt.requested(info.device):
        export_hf(engine, lm, tokenizer, run_dir / "hf", info, cfg.parallel.zero_stage, step,
                  moba_record(cfg, num_layers, step))
        need_export = False
    preempt.restore()
    metrics.close()
    if need_eval or need_export:
        if info.is_main:
            tag = ckpt.latest_tag(ckpt_dir) if cfg.checkpoint.enabled else None
            log.warning(stop_message(preempt.signum, step, ckpt_dir / tag if tag else None, run_dir, cfg.resume,
                                     "the final evaluation" if need_eval else "the HF export"))
        return {**last, "step": step, "preempted": True, "signal": preempt.signum}
    return {**last, **val, "step": step}


def stop_message(signum: int, step: int, checkpoint: Path | None, run_dir: Path, resume: str,
                 before: str | None = None) -> str:
    """The line a launch stopped by a signal logs: the signal, the step (and the final work ``before`` which it
    stopped), the checkpoint it leaves (None: ``checkpoint.enabled=false``, nothing saved) and how to resume.
    ``python -m train`` then exits with ``exit_status(signum)`` (``train.__main__``)."""
    where = f"at step {step}" + (f" before {before}" if before else "")
    again = f"python -m train with the same settings and hydra.run.dir={run_dir}" + (
        "" if resume == "auto" else " resume=auto")
    if checkpoint is None:
        kept = f"checkpoint.enabled=false: nothing saved, so {again} starts from scratch"
    elif before:
        kept = f"the last checkpoint is {checkpoint}; to complete the stage, run {again}"
    else:
        kept = f"checkpoint saved: {checkpoint}; to resume from it, run {again}"
    return f"stopped by a signal {where} ({describe(signum)}): {kept}; exit status {exit_status(signum)}"


EXPORT_RECORD = "moba_export.json"  # in the exported folder: the training step it holds


def exported_step(out_dir: Path) -> int | None:
    """The step of the model exported to ``out_dir`` (None when there is no complete export)."""
    try:
        return int(json.loads((out_dir / EXPORT_RECORD).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def drop_stale_export(out_dir: Path, keep: list[str | None] = ()) -> None:
    """Remove the HF export ``out_dir`` left by an earlier launch when this one starts from scratch (that
    launch saved no checkpoint: ``checkpoint.enabled=false``, or its checkpoints were deleted). Its weights are
    not this run's, yet its step would match this run's last one: the final export was skipped and
    ``python -m train.eval`` took the old weights for the run's. Kept when it is (or holds) one of the paths
    ``keep`` (the model or tokenizer this run starts from)."""
    if any(k and Path(out_dir).resolve() in (Path(k).resolve(), *Path(k).resolve().parents) for k in keep):
        return
    step = exported_step(out_dir)
    if out_dir.exists():
        log.warning("removing %s: an HF export%s of an earlier launch, which saved no checkpoint (this launch "
                    "starts from scratch)", out_dir, f" of step {step}" if step is not None else "")
        shutil.rmtree(out_dir)


def export_hf(engine, lm, tokenizer, out_dir: Path, info: DistInfo, zero_stage: int, step: int,
              moba: dict | None = None) -> None:
    """Write the model as an HF checkpoint (config + safetensors, and the tokenizer) that
    ``model.name_or_path`` can load, with ``moba_export.json`` naming ``step`` and the MoBA settings
    ``moba`` (``train.export.moba_record``) in its config (``moba_core.hf.load_moba_model`` reapplies them).
    It is written beside ``out_dir`` and renamed into place, so ``out_dir`` is never half written; its files get
    the modes a plain ``open()`` gives (0644 under umask 022; safetensors alone would leave the weights 0600).
    Collective under ZeRO-3 (parameters are gathered); rank 0 writes."""
    import deepspeed

    params = list(lm.parameters())
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else contextlib.nullcontext()
    with ctx:
        if info.is_main:
            tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
            shutil.rmtree(tmp, ignore_errors=True)
            attn = lm.config._attn_implementation
            lm.config._attn_implementation = "sdpa"  # the saved model loads without moba_core registered
            if moba is not None:
                lm.config.moba = moba
            lm.save_pretrained(tmp, safe_serialization=True)
            lm.config._attn_implementation = attn
            tokenizer.save(tmp)
            (tmp / EXPORT_RECORD).write_text(json.dumps({"step": step}))
            set_plain_file_modes(tmp)  # safetensors leaves its files 0600
            shutil.rmtree(old, ignore_errors=True)
            if out_dir.exists():
                out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
            log.info("exported HF checkpoint of step %d to %s", step, out_dir)
    if dist.is_initialized():
        dist.barrier()

