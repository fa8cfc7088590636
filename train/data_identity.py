"""Which tokenizer and corpus a run uses, and the checks that a resumed run still has the same ones.

A run trains with one tokenizer and one corpus from its first step to its last. At the start it stores its
tokenizer in ``<run dir>/tokenizer/`` and records the identity of both in its run config (key
``data_identity``, saved beside every checkpoint): the fingerprint of the corpus at ``data.path`` (names,
sizes and modification times of its files, ``data.corpus_fingerprint``) and the tokenizer's fingerprint
(its vocabulary). A resumed run:

- refuses to continue when the corpus changed (a SentencePiece tokenizer trained on the corpus, the token
  stream and the sampler's order all depend on it), naming ``data.path``;
- uses the stored tokenizer when the run trained its own (``data.tokenizer`` unset), instead of training
  one again on whatever the corpus is now;
- refuses to continue when the tokenizer it loads is not the one the run started with.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"  # the run's copy of its tokenizer, inside the run dir


def _corpus_name(path: str | None) -> str:
    return f"data.path={path!r}" + (" (the embedded stdlib corpus)" if path is None else "")


def tokenizer_spec(data_tokenizer: str | None, model_path: str | None, saved: dict | None = None) -> str | None:
    """The ``data.tokenizer`` value a run uses: ``data.tokenizer`` when set; else the tokenizer saved in
    ``model.name_or_path``; else, on resume, the run's stored copy of the tokenizer it trained; else None
    (a SentencePiece model trained on the corpus).

    Args:
        data_tokenizer: ``data.tokenizer``.
        model_path: ``model.name_or_path``.
        saved: the ``data_identity`` of the checkpoint being resumed (``saved_identity``), or None.
    Raises:
        ValueError: ``model.name_or_path`` holds no tokenizer and ``data.tokenizer`` is unset: a tokenizer
            trained on the corpus would give ids that mean nothing to the pretrained embeddings.
    """
    from data import tokenizer_in

    if data_tokenizer:
        return data_tokenizer
    if model_path:
        spec = tokenizer_in(model_path)
        if spec is None:
            raise ValueError(
                f"model.name_or_path={model_path!r} holds no tokenizer and data.tokenizer is not set: a tokenizer "
                "trained on the corpus would not match the checkpoint's embeddings. Set data.tokenizer to the "
                "model's tokenizer (an HF tokenizer dir or a SentencePiece .model file)"
            )
        return spec
    copy = (saved or {}).get("tokenizer_copy")
    if copy and tokenizer_in(copy) is not None:
        return tokenizer_in(copy)
    return None


def saved_identity(ckpt_dir: Path, tag: str) -> dict | None:
    """The ``data_identity`` recorded beside checkpoint ``ckpt_dir/tag`` (None for a checkpoint without one)."""
    f = Path(ckpt_dir) / tag / "run_config.json"
    if not f.is_file():
        return None
    return json.loads(f.read_text()).get("data_identity")


def check_corpus_unchanged(saved: dict | None, path: str | None) -> None:
    """Refuse to resume when the corpus at ``data.path`` is not the one the run started with.

    Raises:
        ValueError: naming ``data.path`` and both fingerprints.
    """
    from data import corpus_fingerprint

    if not saved or "corpus" not in saved:
        return
    now = corpus_fingerprint(path)
    if now != saved["corpus"]:
        raise ValueError(
            f"{_corpus_name(path)} changed since this run started (a file was added, removed or modified; "
            f"corpus fingerprint {saved['corpus']} at the start, {now} now). The run's tokenizer, token stream "
            "and data order come from the corpus it started with: restore that corpus, or start a new run "
            "(another hydra.run.dir) to train on the changed one"
        )


def check_tokenizer_unchanged(saved: dict | None, tokenizer, spec: str | None) -> None:
    """Refuse to resume with a tokenizer other than the one the run started with.

    Raises:
        ValueError: naming the tokenizer (``data.tokenizer`` or the model's) and both fingerprints.
    """
    if not saved or "tokenizer" not in saved or tokenizer.fingerprint == saved["tokenizer"]:
        return
    raise ValueError(
        f"the tokenizer changed since this run started (data.tokenizer={spec!r}: {tokenizer.name}, fingerprint "
        f"{tokenizer.fingerprint} now, {saved['tokenizer']} at the start): token ids would change meaning "
        "under the trained embeddings. Restore the tokenizer, or start a new run (another hydra.run.dir)"
    )


def identity(path: str | None, tokenizer, run_dir: Path) -> dict:
    """The ``data_identity`` of a run: corpus and tokenizer fingerprints, and where its tokenizer is stored."""
    from data import corpus_fingerprint

    return {"data.path": path, "corpus": corpus_fingerprint(path), "tokenizer": tokenizer.fingerprint,
            "tokenizer_copy": str((Path(run_dir) / TOKENIZER_DIR).resolve())}


def store_tokenizer(tokenizer, run_dir: Path, saved: dict | None = None) -> None:
    """Write the run's tokenizer into ``<run dir>/tokenizer/`` (rank 0), replacing what a run killed
    before its first checkpoint may have left there; the new copy appears only once complete. A launch that
    resumes this run's own checkpoint (``saved``, its ``data_identity``) with the same tokenizer keeps the copy
    already there (it was written whole at the run's start)."""
    out = Path(run_dir) / TOKENIZER_DIR
    if (saved and saved.get("tokenizer") == tokenizer.fingerprint and out.is_dir()
            and saved.get("tokenizer_copy") == str(out.resolve())):
        return
    tmp = out.with_name(f".{TOKENIZER_DIR}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("stored the run's tokenizer (%s) in %s", tokenizer.name, out)
