"""The hybrid layer layout string: one validated description of the whole stack.

Grammar (megatron-core's hybrid grammar, ``docs/design.md`` §4): one symbol per sublayer,

- ``G``: a Gated DeltaNet mixer,
- ``*``: a full causal attention mixer,
- ``-``: an MLP; every Olmo layer is a mixer immediately followed by its MLP,
- ``|``: a pipeline-stage boundary (optional; when present there are exactly PP stages).

The Olmo Hybrid 7B is ``G-G-G-*-`` repeated 8 times. Whitespace is ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

GDN = "G"
ATTENTION = "*"
MLP = "-"
STAGE = "|"

#: layer kinds as the HF ``layer_types`` config key spells them
HF_LAYER_TYPES = {GDN: "linear_attention", ATTENTION: "full_attention"}


class LayoutError(ValueError):
    """A layout string that does not follow the grammar; the message names the position."""


@dataclass(frozen=True)
class HybridLayout:
    """A parsed layout: the mixer kind of each layer and the layers of each pipeline stage.

    Attributes:
        layer_types: one of ``"G"`` / ``"*"`` per layer, in order.
        stage_sizes: number of layers in each explicit pipeline stage, or None when the
            string had no ``|`` (stages are then split evenly by megatron-core).
    """

    layer_types: tuple[str, ...]
    stage_sizes: tuple[int, ...] | None = None

    @property
    def num_layers(self) -> int:
        """Number of layers (mixers)."""
        return len(self.layer_types)

    def pattern(self, with_stages: bool = True) -> str:
        """The canonical layout string (``G-G-G-*-...``), with ``|`` when stages are explicit."""
        parts, i = [], 0
        sizes = self.stage_sizes if (with_stages and self.stage_sizes) else (self.num_layers,)
        for n in sizes:
            parts.append("".join(t + MLP for t in self.layer_types[i:i + n]))
            i += n
        return STAGE.join(parts)

    def hf_layer_types(self) -> list[str]:
        """HF ``layer_types`` (``linear_attention`` / ``full_attention`` per layer)."""
        return [HF_LAYER_TYPES[t] for t in self.layer_types]

    def describe(self) -> str:
        """One line per layer, for the start-up log."""
        names = {GDN: "GDN mixer + MLP (pre-norm)", ATTENTION: "attention mixer + MLP (post-norm)"}
        return "\n".join(f"  layer {i:3d}: {names[t]}" for i, t in enumerate(self.layer_types))


def parse_layout(pattern: str, num_layers: int | None = None) -> HybridLayout:
    """Parse and validate a hybrid layout string.

    Args:
        pattern: e.g. ``"G-G-G-*-G-G-G-*-"`` or with stage boundaries ``"G-G-|G-*-"``.
        num_layers: if given, the number of mixers must equal it (``--num-layers``).

    Returns:
        HybridLayout.

    Raises:
        LayoutError: unknown symbol, a mixer not followed by its MLP, an MLP without a
            mixer, an empty stage, or a layer count that disagrees with ``num_layers``;
            the message gives the 0-based character position.
    """
    text = "".join(pattern.split())
    if not text:
        raise LayoutError("--hybrid-layer-pattern is empty; expected e.g. 'G-G-G-*-'")
    types: list[str] = []
    stages: list[int] = []
    in_stage = 0
    i = 0
    while i < len(text):
        c = text[i]
        if c in (GDN, ATTENTION):
            if i + 1 >= len(text) or text[i + 1] != MLP:
                raise LayoutError(
                    f"--hybrid-layer-pattern {pattern!r}: mixer {c!r} at position {i} is not "
                    f"followed by its MLP '-' (every Olmo layer is a mixer then an MLP)")
            types.append(c)
            in_stage += 1
            i += 2
        elif c == MLP:
            raise LayoutError(
                f"--hybrid-layer-pattern {pattern!r}: MLP '-' at position {i} has no mixer before it")
        elif c == STAGE:
            if in_stage == 0:
                raise LayoutError(
                    f"--hybrid-layer-pattern {pattern!r}: empty pipeline stage before position {i}")
            stages.append(in_stage)
            in_stage = 0
            i += 1
        else:
            raise LayoutError(
                f"--hybrid-layer-pattern {pattern!r}: unknown symbol {c!r} at position {i}; "
                f"expected 'G' (GDN), '*' (attention), '-' (MLP) or '|' (stage boundary)")
    if stages:
        if in_stage == 0:
            raise LayoutError(f"--hybrid-layer-pattern {pattern!r}: empty last pipeline stage")
        stages.append(in_stage)
    if num_layers is not None and len(types) != num_layers:
        raise LayoutError(
            f"--hybrid-layer-pattern {pattern!r} has {len(types)} mixers but --num-layers is "
            f"{num_layers}")
    return HybridLayout(tuple(types), tuple(stages) if stages else None)


def pattern_from_attention_freq(num_layers: int, linear_attention_freq: int) -> str:
    """Expand ``--linear-attention-freq N``: attention at layer indices i % N == N - 1.

    ``N = 4`` gives the Olmo 3:1 pattern ``G-G-G-*-``. Raises LayoutError for N < 1.
    """
    if linear_attention_freq < 1:
        raise LayoutError(f"--linear-attention-freq must be >= 1, got {linear_attention_freq}")
    return "".join(
        (ATTENTION if i % linear_attention_freq == linear_attention_freq - 1 else GDN) + MLP
        for i in range(num_layers))


def pattern_from_hf_layer_types(layer_types: list[str]) -> str:
    """Build a layout string from HF ``layer_types``; raises LayoutError for unknown kinds."""
    inverse = {v: k for k, v in HF_LAYER_TYPES.items()}
    out = []
    for i, t in enumerate(layer_types):
        if t not in inverse:
            raise LayoutError(
                f"config.json layer_types[{i}] = {t!r}; expected 'linear_attention' or "
                f"'full_attention'")
        out.append(inverse[t] + MLP)
    return "".join(out)
