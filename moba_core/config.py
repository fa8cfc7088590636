"""``MoBAConfig``: the MoBA settings of a model (which layers, block size, top-k, backend)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MoBAConfig:
    """MoBA settings, checked on construction.

    Attributes:
        block_size: keys per block (tokens); a positive multiple of 16.
        top_k: blocks each query attends, counting its own (current) block; >= 1.
        full_attn_layers: layer indices that keep full causal attention (negative indices count from
            the last layer, so ``[-3, -2, -1]`` are the last three, the paper's Llama-8B-1M recipe).
        group_routing: route once per KV group instead of per query head.
        backend: "auto", "triton", "flash" or "reference".

    Raises:
        ValueError: naming the setting (``moba.<field>``) and the bad value.
    """

    block_size: int = 512
    top_k: int = 3
    full_attn_layers: list[int] = field(default_factory=list)
    group_routing: bool = False
    backend: str = "auto"

    def __post_init__(self):
        from .attention import BACKENDS

        if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size % 16:
            raise ValueError(f"moba.block_size={self.block_size!r} must be a positive multiple of 16")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"moba.top_k={self.top_k!r} must be an integer >= 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"moba.backend={self.backend!r} must be one of {BACKENDS}")
        if any(not isinstance(i, int) for i in self.full_attn_layers):
            raise ValueError(f"moba.full_attn_layers={self.full_attn_layers!r} must be a list of layer indices")

    def moba_layers(self, num_layers: int) -> list[int]:
        """Indices of the layers that run MoBA in a model of ``num_layers`` layers.

        Raises:
            ValueError: a ``full_attn_layers`` index outside ``[-num_layers, num_layers)``.
        """
        full = set()
        for i in self.full_attn_layers:
            if not -num_layers <= i < num_layers:
                raise ValueError(
                    f"moba.full_attn_layers contains {i}, outside a model of {num_layers} layers"
                )
            full.add(i % num_layers)
        return [i for i in range(num_layers) if i not in full]
