"""``MoBAConfig``: the MoBA settings of a model (which layers, block size, top-k, backend)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

LAYER_KEYS = ("block_size", "top_k")  # the settings a layer of ``MoBAConfig.layers`` may override


def repeated_layer(indices, num_layers: int) -> tuple[int, int] | None:
    """The first two entries of ``indices`` (layer indices, negative ones from the end) that name the same layer
    of a model of ``num_layers`` layers, as given (``(1, -3)`` of 4 layers); None when every layer is named once.
    Entries that are not ints in ``[-num_layers, num_layers)`` are skipped (their own check names them)."""
    seen = {}
    for i in indices:
        if isinstance(i, int) and not isinstance(i, bool) and -num_layers <= i < num_layers:
            if i % num_layers in seen:
                return seen[i % num_layers], i
            seen[i % num_layers] = i
    return None


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
        layers: per-layer overrides ``{layer index: {"block_size": ..., "top_k": ...}}`` (either key may be
            left out; negative indices count from the last layer); other layers use the fields above.
            ``for_layer`` gives a layer's own config, which ``moba_core.hf`` passes to every call.
        decode: attention of queries that follow a KV cache (generation, chunked prefill): "moba" (the
            same routing as a full forward; the default) or "full" (causal attention over the whole cache,
            what the paper's reference implementation does when decoding).

    Raises:
        ValueError: naming the setting (``moba.<field>``) and the bad value.
    """

    block_size: int = 512
    top_k: int = 3
    full_attn_layers: list[int] = field(default_factory=list)
    group_routing: bool = False
    backend: str = "auto"
    layers: dict[int, dict[str, int]] = field(default_factory=dict)
    decode: str = "moba"

    def __post_init__(self):
        from .attention import BACKENDS

        if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size % 16:
            raise ValueError(f"moba.block_size={self.block_size!r} must be a positive multiple of 16")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"moba.top_k={self.top_k!r} must be an integer >= 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"moba.backend={self.backend!r} must be one of {BACKENDS}")
        if self.decode not in ("moba", "full"):
            raise ValueError(f"moba.decode={self.decode!r} must be 'moba' or 'full'")
        if any(not isinstance(i, int) for i in self.full_attn_layers):
            raise ValueError(f"moba.full_attn_layers={self.full_attn_layers!r} must be a list of layer indices")
        for i, over in self.layers.items():
            if not isinstance(i, int) or not isinstance(over, dict) or not over or set(over) - set(LAYER_KEYS):
                raise ValueError(f"moba.layers: layer {i!r} sets {over!r}; give a layer index and some of "
                                 f"{LAYER_KEYS}")
            try:
                replace(self, **over, layers={})
            except ValueError as e:
                raise ValueError(f"moba.layers: layer {i}: {e}") from None

    def moba_layers(self, num_layers: int) -> list[int]:
        """Indices of the layers that run MoBA in a model of ``num_layers`` layers.

        Raises:
            ValueError: a ``full_attn_layers`` index outside ``[-num_layers, num_layers)``; a ``layers`` index
                outside it, set twice, or kept full.
        """
        full = set()
        for i in self.full_attn_layers:
            if not -num_layers <= i < num_layers:
                raise ValueError(
                    f"moba.full_attn_layers contains {i}, outside a model of {num_layers} layers"
                )
            full.add(i % num_layers)
        for i in self.layers:
            if not -num_layers <= i < num_layers:
                raise ValueError(f"moba.layers sets layer {i}, outside a model of {num_layers} layers")
            if i % num_layers in full:
                raise ValueError(f"moba.layers sets layer {i}, which moba.full_attn_layers keeps full")
        twice = repeated_layer(self.layers, num_layers)
        if twice:
            raise ValueError(f"moba.layers sets layer {twice[1] % num_layers} twice (as {twice[0]} and {twice[1]})")
        return [i for i in range(num_layers) if i not in full]

    def for_layer(self, layer: int, num_layers: int) -> MoBAConfig:
        """The settings layer ``layer`` (0-based) of a model of ``num_layers`` layers runs with: these
        fields with the layer's entry of ``layers`` applied (``layers`` of the result is empty)."""
        over = {}
        for i, o in self.layers.items():
            if i % num_layers == layer:
                over = o
        return replace(self, **over, layers={})
