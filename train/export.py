"""``python -m train.export <checkpoint or run dir> <out dir>``: a training checkpoint as an HF model directory.

    python -m train.export runs/x /models/x-moba          # the run's newest complete checkpoint
    python -m train.export runs/x/checkpoints/step_00000200 /models/x-200

The output holds what ``from_pretrained`` loads: ``config.json`` (with the RoPE settings the run trained
with and a ``moba`` dict: block_size, top_k, full_attn_layers, layers, group_routing, decode; no backend,
which belongs to the machine), the weights as safetensors shards, the run's tokenizer and a generation
config (BOS / EOS / pad ids). ``moba_core.hf.load_moba_model(out_dir)`` reloads it with MoBA in one line.

Weights are the fp32 master weights of the DeepSpeed checkpoint, gathered from the ZeRO partitions of every
rank with DeepSpeed's own ``zero_to_fp32`` (lazily: one tensor is materialised at a time), written one
decoder layer per safetensors shard, so the host never holds more than one layer's fp32 copy; a ZeRO-0
checkpoint's module state is read memory-mapped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import stat
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import checkpoint as ckpt
from .config import RunConfig, register_configs

log = logging.getLogger("train.export")

MODULE_PREFIX = "lm."  # the training module (PackedCausalLM) holds the HF model as .lm


def find_checkpoint(src: Path) -> tuple[Path, str]:
    """``(checkpoint dir, tag)`` of a tag dir, a checkpoint dir (its newest complete tag) or a run dir
    (``<run dir>/checkpoints``, or the ``checkpoint.dir`` its ``config.json`` records).

    Raises:
        ValueError: naming the path when it holds no loadable checkpoint.
    """
    src = Path(src)
    if src.is_dir() and ckpt.TAG_RE.match(src.name):
        problem = ckpt.tag_problem(src)
        if problem:
            raise ValueError(f"checkpoint {src} cannot be exported: {problem}")
        return src.parent, src.name
    run_ckpts = ckpt.run_checkpoint_dir(src)
    for d in (src, run_ckpts):
        if ckpt.list_tags(d):
            tag = ckpt.latest_tag(d)
            if tag:
                return d, tag
    if not src.exists():
        raise ValueError(f"{src} does not exist")
    if (src / "config.json").is_file() and not ckpt.list_tags(run_ckpts):
        hf = f"; its end-of-run export is {src / 'hf'}" if (src / "hf").is_dir() else ""
        raise ValueError(f"{src} is a run directory without checkpoints in {run_ckpts} (a run with "
                         f"checkpoint.enabled=false, or stopped before its first save){hf}")
    raise ValueError(f"{src} is neither a checkpoint (step_*), a checkpoint dir nor a run dir with checkpoints/ "
                     "(or the checkpoint.dir its config.json records)")


def run_config_of(ckpt_dir: Path, tag: str) -> RunConfig:
    """The typed config a checkpoint was trained with (``run_config.json`` beside it).

    Raises:
        ValueError: the checkpoint has no ``run_config.json``.
    """
    f = ckpt_dir / tag / "run_config.json"
    if not f.is_file():
        raise ValueError(f"{f} is missing: the checkpoint does not say which model it holds")
    saved = json.loads(f.read_text())
    register_configs()
    known = set(RunConfig.__dataclass_fields__)
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), {k: v for k, v in saved.items() if k in known})
    return OmegaConf.to_object(merged)


def state_dict_of(ckpt_dir: Path, tag: str, zero_stage: int) -> dict:
    """The training module's weights, name -> tensor (or DeepSpeed's lazy ``GatheredTensor``: call
    ``.contiguous()``): the fp32 masters gathered by ``zero_to_fp32`` for ZeRO >= 1, the module state of a
    ZeRO-0 checkpoint (memory-mapped) otherwise."""
    if zero_stage == 0:
        states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True,
                            weights_only=False)
        return dict(states["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, lazy_mode=True)


def moba_record(cfg: RunConfig, num_layers: int, step: int) -> dict:
    """The MoBA settings of the model at optimizer step ``step`` (the layers the schedule runs with MoBA
    then; the others are ``full_attn_layers``), for ``config.json``'s ``moba`` dict."""
    moba = cfg.moba.to_moba_config()
    moba_layers = cfg.schedule.to_schedule().moba_layers_at(max(step - 1, 0), cfg.train.max_steps,
                                                            moba.moba_layers(num_layers), num_layers)
    return {"block_size": moba.block_size, "top_k": moba.top_k,
            "full_attn_layers": [i for i in range(num_layers) if i not in moba_layers],
            "layers": {str(i % num_layers): dict(o) for i, o in moba.layers.items()},
            "group_routing": moba.group_routing, "decode": moba.decode}


def _shard_group(name: str) -> str:
    """The shard a weight goes to: ``model.layers.<i>`` for the tensors of decoder layer ``i``, the name
    itself for the others (embeddings, final norm, LM head)."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return name


def set_plain_file_modes(directory: Path) -> None:
    """Give every file directly in ``directory`` the mode a plain ``open()`` there gives (0o666 less the umask,
    or what the directory's default ACL says: read from a probe file, so no umask is changed): safetensors writes
    through a temporary file and leaves its files 0600, unreadable by the other users of a shared model
    directory."""
    probe = directory / ".mode-probe"
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        mode = stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.unlink()
    for f in directory.iterdir():
        if f.is_file() and not f.is_symlink():
            f.chmod(mode)


def write_weights(state: dict, out: Path, tied: bool) -> None:
    """Safetensors shards of one decoder layer each (the embeddings, the final norm and the LM head in
    shards of their own), plus ``model.safetensors.index.json`` when there are several (``total_size``: the
    tensors' bytes, as ``save_pretrained`` counts them): the host holds the fp32 copy of one layer at a time,
    whatever the model's size. Tensors are materialised one by one from
    ``state`` (lazy for ZeRO checkpoints); names lose the training module's prefix; ``lm_head.weight`` is
    left out when tied to the input embeddings (as ``save_pretrained`` does). Files get the modes a plain
    ``open()`` gives (``set_plain_file_modes``)."""
    from safetensors.torch import save_file

    names = [n for n in state if not (tied and n == MODULE_PREFIX + "lm_head.weight")]
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(_shard_group(n), []).append(n)
    shard_names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, total = {}, 0
    for shard, members in zip(shard_names, groups.values()):
        cur = {}
        for n in members:
            key = n[len(MODULE_PREFIX):] if n.startswith(MODULE_PREFIX) else n
            cur[key] = state[n].contiguous().detach().to(torch.float32).clone()
        save_file(cur, str(out / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in cur})
        total += sum(t.numel() * t.element_size() for t in cur.values())
        del cur
    if len(shard_names) == 1:
        (out / shard_names[0]).rename(out / "model.safetensors")
    else:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    set_plain_file_modes(out)


def check_out_dir(out: Path, tag_dir: Path) -> None:
    """Refuse an ``out`` that exporting would destroy: it is replaced whole, so it must not hold the
    checkpoint (e.g. the run dir itself) and, when it exists, must be an earlier export (``moba_export.json``)
    or an empty directory.

    Raises:
        ValueError: naming ``out`` and what it holds.
    """
    out, tag_dir = Path(out).resolve(), Path(tag_dir).resolve()
    if out == tag_dir or out in tag_dir.parents:
        raise ValueError(f"out dir {out} holds the checkpoint being exported ({tag_dir}) and would be replaced: "
                         "choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out dir {out} is a file: choose a directory (it is written as a whole)")
    if out.is_dir() and any(out.iterdir()) and not (out / "moba_export.json").is_file():
        raise ValueError(f"out dir {out} already holds files and is not an earlier export (no moba_export.json); "
                         "it would be replaced whole: choose another directory or remove it first")


def export(src: Path, out: Path) -> Path:
    """Export the checkpoint at ``src`` (tag, checkpoint or run dir) to the HF directory ``out``; returns
    ``out``. Written beside ``out`` and renamed into place, so ``out`` is never half written; its files get the
    modes a plain ``open()`` gives (0644 under umask 022).

    Raises:
        ValueError: no loadable checkpoint at ``src``, the model it was trained from cannot be read, or ``out``
            cannot be replaced (``check_out_dir``).
    """
    from transformers import GenerationConfig

    from data import load_tokenizer, tokenizer_in

    from .model import hf_config

    ckpt_dir, tag = find_checkpoint(src)
    check_out_dir(out, ckpt_dir / tag)
    cfg = run_config_of(ckpt_dir, tag)
    state = state_dict_of(ckpt_dir, tag, cfg.parallel.zero_stage)
    vocab = state[MODULE_PREFIX + "model.embed_tokens.weight"].shape[0]
    hf_cfg = hf_config(cfg.model, vocab)
    step = ckpt.step_of(tag)
    hf_cfg.moba = moba_record(cfg, hf_cfg.num_hidden_layers, step)
    hf_cfg.torch_dtype = "float32"
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf_cfg.save_pretrained(tmp)
    write_weights(state, tmp, bool(getattr(hf_cfg, "tie_word_embeddings", False)))
    saved = json.loads((ckpt_dir / tag / "run_config.json").read_text()).get("data_identity") or {}
    spec = tokenizer_in(saved.get("tokenizer_copy")) or cfg.data.tokenizer or tokenizer_in(cfg.model.name_or_path)
    if spec:
        tok = load_tokenizer(spec, corpus_id="", train_texts=None, cache_dir=Path("."))
        tok.save(tmp)
        GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id).save_pretrained(tmp)
    else:
        log.warning("no tokenizer found for %s: exported without one", ckpt_dir / tag)
    (tmp / "moba_export.json").write_text(json.dumps({"step": step, "checkpoint": str((ckpt_dir / tag).resolve())}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("exported %s (step %d) to %s", ckpt_dir / tag, step, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m train.export SRC OUT``. Returns the exit status (2 on a ValueError)."""
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0])
    p.add_argument("src", help="a run dir, a checkpoint dir or one checkpoint (step_*)")
    p.add_argument("out", help="the HF model directory to write (an earlier export there is replaced)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export(Path(args.src), Path(args.out))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
