"""Evaluation tasks of a long-context MoBA model: per-position loss, passkey retrieval, routing statistics.

Used by ``python -m train.eval`` (``train/eval.py``) and, every ``train.eval_every`` steps, by training
(``train.eval_tasks``). Every task reads held-out documents: the validation split of the run's corpus, one
document per row from its first token (``data.packing=pad`` at the evaluated length).

- ``position``: the loss of each token by its position in the document, averaged in log-spaced position
  buckets ``[0, 16), [16, 32), [32, 64), ...`` up to the length, and the trailing-token loss (positions
  ``>= length // 2``, what the MoBA paper watches, Sec. 3.1).
- ``passkey``: a haystack of the corpus' own held-out text with a passkey sentence at a chosen depth, then a
  question; scored by greedy generation with the KV cache (``model.generate``: exact match of the key) and
  by the log-likelihood of the answer tokens.
- ``routing``: per layer, on sampled queries, the statistics of ``moba_core.stats`` (chosen-block distance
  histogram, how often each block position is chosen, attention recall against full attention), from the
  post-RoPE q / k that the attention function receives (``capture_attention``).

Legend: n tokens of one document, V vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random

import torch
import torch.nn.functional as F

from moba_core.hf import attention_modules, moba_attention_forward, register
from moba_core.stats import RoutingStats

log = logging.getLogger(__name__)

TASKS = ("position", "passkey", "routing")
NEEDLE = ("\nThe pass key is ", "{key}", ". Remember it. {key} is the pass key.\n")  # before, key, after
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"


def check_tasks(tasks, setting: str) -> list[str]:
    """``tasks`` as a list of known task names. Raises ``ValueError`` naming ``setting`` and the bad value."""
    tasks = list(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or len(set(tasks)) != len(tasks):
        raise ValueError(f"{setting}={tasks} must list distinct tasks out of {list(TASKS)}")
    return tasks


# ---------------------------------------------------------------------------------------------------------
# Held-out documents


def held_out_documents(dataset, num_docs: int, length: int) -> list[torch.Tensor]:
    """The ``num_docs`` longest documents of a packed validation ``dataset`` (``data.PackedDataset``), each the
    first segment of a row cut to ``length`` tokens: int64 (n,) tensors, longest first (ties: row order)."""
    docs = []
    for i in range(len(dataset)):
        s = dataset[i]
        n = min(int(s["cu_seqlens"][1]), length)
        docs.append(s["input_ids"][:n])
    order = sorted(range(len(docs)), key=lambda i: (-docs[i].numel(), i))
    return [docs[i] for i in order[:num_docs] if docs[i].numel() >= 2]


def filler_tokens(dataset, special: set[int]) -> list[int]:
    """The held-out text of ``dataset`` as one token list (rows in order, ``special`` ids such as EOS and
    padding left out): the haystack of the passkey task, text of the corpus' own kind."""
    out = []
    for i in range(len(dataset)):
        out.extend(t for t in dataset[i]["input_ids"].tolist() if t not in special)
    return out


# ---------------------------------------------------------------------------------------------------------
# Per-position loss


def log_position_edges(length: int, first: int = 16) -> list[int]:
    """Bucket edges ``[0, first, 2 first, 4 first, ..., length]`` (log-spaced; the last bucket ends at
    ``length``). Raises ``ValueError`` for ``length < 2``."""
    if length < 2:
        raise ValueError(f"eval.lengths holds {length}; a length must be >= 2 tokens")
    edges, e = [0], first
    while e < length:
        edges.append(e)
        e *= 2
    return edges + [length]


def bucket_losses(losses: torch.Tensor, positions: torch.Tensor, edges: list[int]) -> list[dict]:
    """Mean loss per position bucket.

    Args:
        losses: fp32 (T,) token losses (nats); positions: int (T,) the position of each token's input in its
            document; edges: increasing bucket edges (``log_position_edges``), bucket i = ``[edges[i], edges[i+1])``.
    Returns:
        one dict per bucket: ``lo``, ``hi``, ``tokens`` (how many losses fell in it) and ``loss`` (their mean,
        None when empty), ``sum`` (their sum, for merging).
    """
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (positions >= lo) & (positions < hi)
        n = int(sel.sum())
        total = float(losses[sel].double().sum())
        out.append({"lo": lo, "hi": hi, "tokens": n, "sum": total, "loss": total / n if n else None})
    return out


@torch.no_grad()
def token_losses(lm, ids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """fp32 (n - 1,) loss of predicting token t + 1 from the prefix ``ids[: t + 1]`` of one document
    ``ids`` (int64 (n,)), logits computed ``chunk`` tokens at a time (never n x V at once)."""
    dev = next(lm.parameters()).device
    ids = ids.to(dev)
    hidden = lm.model(input_ids=ids[None], use_cache=False).last_hidden_state[0, :-1]  # (n - 1, Hd)
    weight = lm.get_output_embeddings().weight
    out = [F.cross_entropy(F.linear(hidden[s: s + chunk], weight).float(), ids[1:][s: s + chunk], reduction="none")
           for s in range(0, hidden.shape[0], chunk)]
    return torch.cat(out).cpu()


def position_loss(lm, docs: list[torch.Tensor], length: int) -> dict:
    """Loss by position over ``docs`` (``held_out_documents``) evaluated at ``length``: ``buckets``
    (``bucket_losses`` over ``log_position_edges(length)``), ``loss`` (all tokens), ``tail_from``
    (``length // 2``) and ``tail_loss`` (tokens at positions >= it; None when no document reaches it),
    ``documents``."""
    losses, pos = [], []
    for d in docs:
        loss = token_losses(lm, d)
        losses.append(loss)
        pos.append(torch.arange(loss.numel()))
    losses, pos = (torch.cat(losses), torch.cat(pos)) if losses else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    tail = length // 2
    n_tail = int((pos >= tail).sum())
    return {
        "buckets": bucket_losses(losses, pos, log_position_edges(length)),
        "loss": float(losses.double().mean()) if losses.numel() else None,
        "tail_from": tail,
        "tail_loss": float(losses[pos >= tail].double().mean()) if n_tail else None,
        "documents": len(docs),
    }


# ---------------------------------------------------------------------------------------------------------
# Passkey retrieval


def passkey_sample(filler: list[int], tokenizer, length: int, depth: float, key: str, offset: int = 0) -> dict:
    """One passkey prompt of exactly ``length`` tokens with its answer.

    Layout (token ids): ``filler[:m] + needle + filler[m:f] + question + answer`` has ``length`` tokens, with
    ``f`` filler tokens (taken from ``filler`` starting at ``offset``, wrapping around) and ``m = round(depth
    * f)``: the needle starts at token ``m``. Needle, question and answer are ``NEEDLE`` / ``QUESTION`` /
    ``ANSWER`` with ``key``, each part encoded on its own.

    Returns:
        ``input_ids`` (list[int], the prompt: everything before the answer), ``answer_ids``,
        ``needle_start`` (= m), ``key_start`` (token index of the key's first token in the prompt),
        ``key_ids``.
    Raises:
        ValueError: ``depth`` outside [0, 1], or ``length`` too short for needle, question and answer
            (naming ``eval.lengths``), or no filler text.
    """
    if not 0 <= depth <= 1:
        raise ValueError(f"eval.depths holds {depth}; depths are fractions in [0, 1]")
    before, key_ids, after = (tokenizer.encode(p.format(key=key)) for p in NEEDLE)
    needle = before + key_ids + after
    question, answer = tokenizer.encode(QUESTION), tokenizer.encode(ANSWER.format(key=key))
    f = length - len(needle) - len(question) - len(answer)
    if f < 0:
        raise ValueError(f"eval.lengths holds {length}: too short for a passkey prompt "
                         f"({length - f} tokens without filler)")
    if f and not filler:
        raise ValueError("no held-out text to build passkey haystacks from")
    hay = [filler[(offset + i) % len(filler)] for i in range(f)]
    m = round(depth * f)
    return {"input_ids": hay[:m] + needle + hay[m:] + question, "answer_ids": answer, "needle_start": m,
            "key_start": m + len(before), "key_ids": key_ids}


@torch.no_grad()
def score_passkey(lm, tokenizer, sample: dict, key: str) -> tuple[bool, float]:
    """(greedy generation with the KV cache finds ``key``, mean log-likelihood of the answer tokens in nats)."""
    dev = next(lm.parameters()).device
    prompt = torch.tensor(sample["input_ids"], device=dev)[None]
    answer = torch.tensor(sample["answer_ids"], device=dev)
    out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=answer.numel(), do_sample=False,
                      use_cache=True, pad_token_id=tokenizer.pad_id)
    found = tokenizer.decode(out[0, prompt.shape[1]:].tolist()).strip().startswith(key)
    ids = torch.cat([prompt[0], answer])
    hidden = lm.model(input_ids=ids[None], use_cache=False).last_hidden_state[0, prompt.shape[1] - 1: -1]
    logp = F.log_softmax(F.linear(hidden, lm.get_output_embeddings().weight).float(), -1)
    return found, float(logp.gather(1, answer[:, None]).mean())


def passkey(lm, tokenizer, filler: list[int], lengths: list[int], depths: list[float], trials: int, seed: int,
            digits: int = 5, progress=None) -> dict:
    """Passkey retrieval on a (length x depth) grid, ``trials`` haystacks per cell (random keys of ``digits``
    digits and filler offsets from ``seed``). Returns ``lengths``, ``depths``, ``accuracy`` and ``logprob``
    ((len(lengths), len(depths)) nested lists: share of exact greedy retrievals, mean answer log-likelihood
    per token in nats)."""
    rng = random.Random(seed)
    acc = [[0.0] * len(depths) for _ in lengths]
    lp = [[0.0] * len(depths) for _ in lengths]
    for i, n in enumerate(lengths):
        for j, d in enumerate(depths):
            for _ in range(trials):
                key = str(rng.randrange(10 ** (digits - 1), 10**digits))
                s = passkey_sample(filler, tokenizer, n, d, key, offset=rng.randrange(max(len(filler), 1)))
                found, logp = score_passkey(lm, tokenizer, s, key)
                acc[i][j] += found / trials
                lp[i][j] += logp / trials
                if progress is not None:
                    progress.update(1)
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "accuracy": acc, "logprob": lp}


# ---------------------------------------------------------------------------------------------------------
# Routing statistics


@contextlib.contextmanager
def capture_attention(lm, callback):
    """Within the block, every attention call of ``lm`` (a model after ``moba_core.hf.apply_moba``) first
    calls ``callback(module, query, key, scaling)`` with the post-RoPE query (B, H_q, T, D) and key
    (B, H_kv, T, D), then attends as before."""
    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        callback(module, query, key, scaling)
        return moba_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)

    register("moba_capture", fn)
    old = lm.config._attn_implementation
    lm.set_attn_implementation("moba_capture")
    try:
        yield
    finally:
        lm.set_attn_implementation(old)


@torch.no_grad()
def routing(lm, docs: list[torch.Tensor], queries: int, seed: int) -> dict:
    """Routing statistics per layer (``moba_core.stats.RoutingStats`` with each layer's own block size and
    top-k) over up to ``queries`` query positions per document, sampled uniformly among the positions past
    the first block (queries that route). Returns ``layers`` (one summary per layer, with ``layer`` and
    ``moba``: whether the layer runs MoBA now; a full layer's numbers are those MoBA would have there) and
    ``recall`` (mean over the MoBA layers; None without one)."""
    mods = attention_modules(lm)
    stats = {m.layer_idx: RoutingStats(m.moba_config.block_size, m.moba_config.top_k, m.moba_config.group_routing)
             for m in mods}
    gen = torch.Generator().manual_seed(seed)
    dev = next(lm.parameters()).device
    for d in docs:
        bs = min(m.moba_config.block_size for m in mods)
        if d.numel() <= bs:
            continue
        cand = torch.arange(bs, d.numel())
        pos = cand[torch.randperm(cand.numel(), generator=gen)[:queries]].sort().values

        def record(module, query, key, scaling, pos=pos):
            p = pos[pos >= module.moba_config.block_size].to(query.device)
            stats[module.layer_idx].update(query[0].transpose(0, 1)[p], key[0].transpose(0, 1), p, scaling)

        with capture_attention(lm, record):
            lm.model(input_ids=d.to(dev)[None], use_cache=False)
    layers = [{"layer": m.layer_idx, "moba": bool(getattr(m, "moba_enabled", True)), **stats[m.layer_idx].summary()}
              for m in mods]
    rec = [r["recall"] for r in layers if r["moba"] and r["recall"] is not None]
    return {"layers": layers, "recall": sum(rec) / len(rec) if rec else None}


# ---------------------------------------------------------------------------------------------------------
# All tasks, flat metrics


def flat_metrics(result: dict) -> dict:
    """Scalars of a ``run_tasks`` result for ``eval.jsonl`` and wandb: ``pos_loss/<length>/<lo>-<hi>``,
    ``tail_loss/<length>``, ``passkey_acc``, ``passkey_logprob`` (over the whole grid), ``recall/<length>``
    and ``recall/<length>/layer<i>``."""
    out = {}
    for n, r in result.get("position", {}).items():
        for b in r["buckets"]:
            if b["loss"] is not None:
                out[f"pos_loss/{n}/{b['lo']}-{b['hi']}"] = b["loss"]
        out[f"tail_loss/{n}"] = r["tail_loss"]
    pk = result.get("passkey")
    if pk:
        cells = [(a, lp) for ra, rl in zip(pk["accuracy"], pk["logprob"]) for a, lp in zip(ra, rl)]
        out["passkey_acc"] = sum(a for a, _ in cells) / len(cells)
        out["passkey_logprob"] = sum(lp for _, lp in cells) / len(cells)
    for n, r in result.get("routing", {}).items():
        out[f"recall/{n}"] = r["recall"]
        for layer in r["layers"]:
            out[f"recall/{n}/layer{layer['layer']}"] = layer["recall"]
    return out


def run_tasks(lm, tokenizer, val_at, tasks: list[str], lengths: list[int], *, num_docs: int, depths: list[float],
              trials: int, queries: int, seed: int, progress=None) -> dict:
    """Run ``tasks`` at each of ``lengths`` on ``lm`` (eval mode, no gradients; restored afterwards).

    ``val_at(length)`` gives the held-out ``PackedDataset`` with one document per row at that length.
    Returns ``{"position": {length: ...}, "passkey": ..., "routing": {length: ...}}`` (only the tasks run;
    see ``position_loss``, ``passkey``, ``routing``). ``progress`` (a tqdm bar or None) advances by one per
    (task, length) and per passkey haystack.
    """
    was_training = lm.training
    lm.eval()
    out = {}
    try:
        for n in lengths:
            ds = val_at(n)
            docs = held_out_documents(ds, num_docs, n)
            if "position" in tasks:
                out.setdefault("position", {})[n] = position_loss(lm, docs, n)
                if progress is not None:
                    progress.update(1)
            if "routing" in tasks:
                out.setdefault("routing", {})[n] = routing(lm, docs, queries, seed)
                if progress is not None:
                    progress.update(1)
        if "passkey" in tasks:
            special = {tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id} - {None}
            filler = filler_tokens(val_at(max(lengths)), special)
            out["passkey"] = passkey(lm, tokenizer, filler, lengths, depths, trials, seed, progress=progress)
    finally:
        lm.train(was_training)
    return out


def progress_total(tasks: list[str], lengths: list[int], depths: list[float], trials: int) -> int:
    """Steps of ``run_tasks``' progress bar."""
    per_length = sum(t in tasks for t in ("position", "routing"))
    return per_length * len(lengths) + ("passkey" in tasks) * len(lengths) * len(depths) * trials


# ---------------------------------------------------------------------------------------------------------
# Pictures


def plot_position(runs: list[tuple[str, dict]], path) -> None:
    """PNG of loss against position (log x axis, one line per run and length) from ``(label, eval.json
    result)`` pairs that hold a ``position`` task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, res in runs:
        for n, r in res.get("position", {}).items():
            pts = [(math.sqrt(max(b["lo"], 1) * b["hi"]), b["loss"]) for b in r["buckets"] if b["loss"] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{label} @ {n}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in document (tokens, bucket centre)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("held-out loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_passkey(res: dict, path, title: str = "") -> None:
    """PNG heat maps (length x depth) of passkey accuracy and answer log-likelihood."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 1.5 + 0.5 * len(res["lengths"])))
    for ax, key, cmap, label in ((axes[0], "accuracy", "RdYlGn", "greedy retrieval accuracy"),
                                 (axes[1], "logprob", "viridis", "answer log-likelihood (nats/token)")):
        grid = res[key]
        im = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=0 if key == "accuracy" else None,
                       vmax=1 if key == "accuracy" else None)
        ax.set_xticks(range(len(res["depths"])), [f"{d:g}" for d in res["depths"]])
        ax.set_yticks(range(len(res["lengths"])), [str(n) for n in res["lengths"]])
        ax.set_xlabel("depth of the passkey")
        ax.set_ylabel("context length (tokens)")
        ax.set_title(label, fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"passkey retrieval {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_routing(res: dict, path, title: str = "") -> None:
    """PNG of routing statistics at one length: per layer, the distance histogram of chosen blocks, the
    rate at which each block position is chosen, and the attention recall (in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for layer in res["layers"]:
        name = f"layer {layer['layer']}{'' if layer['moba'] else ' (full)'}: recall " + (
            f"{layer['recall']:.3f}" if layer["recall"] is not None else "n/a")
        hist = layer["distance_hist"]
        total = max(sum(hist), 1)
        a.plot(range(1, len(hist)), [h / total for h in hist[1:]], marker="o", label=name)
        rate = layer["block_rate"]
        b.plot([i for i, r in enumerate(rate) if r is not None], [r for r in rate if r is not None], marker=".",
               label=name)
    a.set_xlabel("distance of a chosen block from the query's block (blocks)")
    a.set_ylabel("share of chosen blocks")
    b.set_xlabel("block position in the document")
    b.set_ylabel("chosen / candidate")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"MoBA routing {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
