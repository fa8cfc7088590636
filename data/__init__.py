"""Data for continual pre-training: corpus loading, tokenization, document-aware packing, resumable sampling.

    from data import build_data, build_dataloader
    train_ds, tok = build_data(seq_len=4096)                  # the stdlib corpus, a trained tokenizer
    loader = build_dataloader(train_ds, micro_batch_size=2, seed=0, dp_rank=0, dp_size=1)
    batch = next(iter(loader))  # input_ids/labels/position_ids (1, 2*4096), cu_seqlens, max_seqlen

Data at scale (several sources mixed in tokens, length upsampling, best-fit packing, rows checked) is made
by `python -m data.prepare` (`data.prepare`, `data.sources`, `data.mixture`, `data.layout`); `build_data`
reads its output directory as it is (`data.prepared`).

Imports only datasets, numpy, torch, sentencepiece, transformers, tqdm, omegaconf (the settings of
`python -m data.prepare`), matplotlib (its histogram) and the standard library.
"""

from .build import build_data
from .cache import default_cache_dir
from .corpus import corpus_fingerprint, load_corpus, split_corpus, stdlib_dir
from .packing import IGNORE_INDEX, PACKING_MODES, PackedDataset, collate_packed, pack
from .sampler import ResumableSampler, build_dataloader
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_in

__all__ = [
    "IGNORE_INDEX",
    "PACKING_MODES",
    "PackedDataset",
    "ResumableSampler",
    "Tokenizer",
    "build_data",
    "build_dataloader",
    "collate_packed",
    "corpus_fingerprint",
    "default_cache_dir",
    "load_corpus",
    "load_tokenizer",
    "pack",
    "split_corpus",
    "stdlib_dir",
    "tokenizer_in",
]
