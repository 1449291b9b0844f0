"""The model's parameters per rank, read from ``OlmoHybridModel`` built on the meta device.

Letters: TP tensor-parallel size, PP pipeline stages, D hidden size, V padded vocabulary.

``stage_parameters`` gives the (name, elements on one TP rank) of one pipeline stage in the order
of the trainer's ``named_parameters()``; the names, the shapes and which dimension TP splits all
come from the model the trainer builds (``megatron_hybrid/model.py``), not from a second list.

How, without a process group (the tuner is an offline tool and must not need
``torch.distributed``):

- The stage is built as a model of its own layers on the meta device (no memory, no init:
  ``perform_initialization=False``), with ``pre_process`` / ``post_process`` for the first / last
  stage. The layers and ``OlmoHybridModel`` read TP and PP sizes and ranks from megatron-core's
  ``parallel_state``, which asserts without groups: ``offline_parallel_state`` sets
  megatron-core's own overrides (``set_tensor_model_parallel_world_size`` and the rank / PP
  equivalents, those its unit tests use) for the build and restores them. ``GPTModel`` gets a
  ``ProcessGroupCollection`` without groups (its default collects ``parallel_state``'s groups).
- The build is at TP = 1: megatron-core's parallel linears take their TP size from the group
  (``get_pg_size`` is 1 while ``torch.distributed`` is not initialised), so a TP > 1 build
  needs real groups. A rank's shard is then the module's own split, megatron-core's contract
  (``set_tensor_model_parallel_attributes`` of ``tensor_parallel/layers.py``): column-parallel
  linears and the vocab-parallel embedding split dim 0 of the weight (and the bias),
  row-parallel linears dim 1 of the weight; the project's other split tensors (GDN ``conv1d``,
  ``A_log``, ``dt_bias``; the QK-norm weights) carry ``tensor_model_parallel`` /
  ``partition_dim``; everything else (the RMSNorms, the GDN output norm) is replicated.
  megatron-core sets those attributes on its own linears only when it initialises them, hence
  the rule by module class. A TP that does not divide a split dimension keeps the floor (the
  trainer refuses it; ``plans.refusal`` does so before memory is computed).
- Tied embeddings: a stage built alone cannot see the other stages, so the tied output layer is
  ``shared_embedding`` when PP > 1, as megatron-core's ``setup_embeddings_and_output_layer``
  marks it (``shared_names``).

Cost: megatron-core takes about 2 s to import (imported on the first call only, so
``--help`` does not pay it) and a build about 3 ms per layer, while a search asks for hundreds of
(TP, stages, rank). So a stage's list is assembled from one small build per (config, first
stage, last stage) holding one layer of each kind: the parameters before the layers (the
embedding), each layer kind's, those after (final norm, output layer), in ``GPTModel``'s module
order (embedding, ``decoder.layers``, ``decoder.final_layernorm``, ``output_layer``);
``tests/tuner/test_meta_model.py`` checks it against the full build of real stages. The pieces
are cached per config and the lists per (config, TP, stage sizes, rank).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence

import torch

from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.config.layout import HybridLayout

#: (name, number of elements on this TP rank)
Param = tuple[str, int]
#: (name with the layer prefix removed, shape at TP = 1, the dimension TP splits or None)
_Piece = tuple[str, tuple[int, ...], "int | None"]

LAYER_PREFIX = "decoder.layers."
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"


@contextlib.contextmanager
def offline_parallel_state() -> Iterator[None]:
    """megatron-core's ``parallel_state`` reads TP = PP = 1, rank 0, without process groups.

    The overrides are module globals of ``megatron.core.parallel_state``; their previous values
    are restored on exit (a trainer in the same process keeps its own).
    """
    from megatron.core import parallel_state as ps

    names = ("_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE", "_MPU_TENSOR_MODEL_PARALLEL_RANK",
             "_MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE", "_MPU_PIPELINE_MODEL_PARALLEL_RANK")
    saved = {n: getattr(ps, n) for n in names}
    ps.set_tensor_model_parallel_world_size(1)
    ps.set_tensor_model_parallel_rank(0)
    ps.set_pipeline_model_parallel_world_size(1)
    ps.set_pipeline_model_parallel_rank(0)
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(ps, n, v)


def build_meta_stage(cfg: OlmoHybridConfig, layer_types: Sequence[str], pre_process: bool,
                     post_process: bool) -> torch.nn.Module:
    """``OlmoHybridModel`` of these layers (``"G"`` / ``"*"``) at TP = 1 on the meta device.

    ``pre_process`` / ``post_process``: the stage holds the embedding / the final norm and the
    output layer (tied at ``pre_process and post_process``: no output-layer weight). Parameter
    names are stage-local (``decoder.layers.0.`` is the stage's first layer), as on a trainer
    rank. Raises ConfigError / LayoutError for a config the model rejects.
    """
    with warnings.catch_warnings():
        # megatron-core's import warns that Transformer Engine / Apex kernels are missing and
        # TransformerConfig about CUDA-graph defaults: nothing runs here, so they do not apply
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.process_groups_config import ProcessGroupCollection

        from megatron_hybrid.model import OlmoHybridModel

        types = tuple(layer_types)
        stage = dataclasses.replace(cfg, num_layers=len(types),
                                    hybrid_layer_pattern=HybridLayout(types).pattern())
        tcfg = stage.to_transformer_config(1, 1, perform_initialization=False)
        groups = ProcessGroupCollection(**{k: None for k in ("tp", "pp", "cp", "embd",
                                                             "pos_embd")})
        with offline_parallel_state(), torch.device("meta"):
            return OlmoHybridModel(stage, tcfg, pre_process=pre_process,
                                   post_process=post_process, pg_collection=groups)


def _split_dim(module: torch.nn.Module, name: str, param: torch.nn.Parameter) -> int | None:
    """The dimension of ``module.<name>`` that TP splits, None when replicated (module doc).

    Raises: RuntimeError when a megatron-core parallel module was built with TP > 1 (this
    process has initialised model-parallel groups of that size: the build reads them).
    """
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    sizes = {ColumnParallelLinear: ("output_size", "output_size_per_partition"),
             RowParallelLinear: ("input_size", "input_size_per_partition"),
             VocabParallelEmbedding: ("num_embeddings", "num_embeddings_per_partition")}
    for cls, (whole, part) in sizes.items():
        if isinstance(module, cls) and getattr(module, whole) != getattr(module, part):
            raise RuntimeError(
                f"meta build of {type(module).__name__}: {part} {getattr(module, part)} != "
                f"{whole} {getattr(module, whole)}; megatron-core took TP > 1 from the "
                f"process's initialised model-parallel groups (call the tuner from a process "
                f"without them, or with TP = 1)")
    if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
        return 0
    if isinstance(module, RowParallelLinear):
        return 1 if name == "weight" else None
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim)
    return None


def model_pieces(model: torch.nn.Module) -> list[_Piece]:
    """(name, TP = 1 shape, split dimension) of every parameter, in ``named_parameters`` order."""
    out = []
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{name}" if mod_name else name
            out.append((full, tuple(p.shape), _split_dim(module, name, p)))
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    if sorted(order) != sorted(n for n, _, _ in out):
        raise RuntimeError("model_pieces: named_modules and named_parameters disagree "
                           "(a parameter shared between modules?)")
    return sorted(out, key=lambda piece: order[piece[0]])


def rank_numel(shape: Sequence[int], dim: int | None, tp: int) -> int:
    """Elements of one TP rank's shard of a tensor of ``shape`` split on ``dim`` (None: whole)."""
    if dim is None:
        return math.prod(shape)
    return math.prod(s // tp if i == dim else s for i, s in enumerate(shape))


@dataclasses.dataclass(frozen=True)
class _StagePieces:
    """One build's parameters: before the layers, per layer kind (local names), after."""

    head: tuple[_Piece, ...]
    layers: dict
    tail: tuple[_Piece, ...]


def _split_pieces(pieces: list[_Piece], types: Sequence[str]) -> _StagePieces:
    head, tail, layers = [], [], {}
    for name, shape, dim in pieces:
        if not name.startswith(LAYER_PREFIX):
            (tail if layers else head).append((name, shape, dim))
            continue
        index, rest = name[len(LAYER_PREFIX):].split(".", 1)
        layers.setdefault(types[int(index)], []).append((rest, shape, dim))
    return _StagePieces(tuple(head), {k: tuple(v) for k, v in layers.items()}, tuple(tail))


_PIECES: dict = {}
_STAGES: dict = {}


_CFG_KEYS: dict = {}


def cfg_key(cfg: OlmoHybridConfig) -> tuple:
    """A hashable key of every field of the config (memoised per object, which is kept alive so
    that its id is not reused)."""
    hit = _CFG_KEYS.get(id(cfg))
    if hit is None or hit[0] is not cfg:
        hit = (cfg, tuple(sorted((k, str(v)) for k, v in cfg.to_dict().items())))
        _CFG_KEYS[id(cfg)] = hit
    return hit[1]


def _stage_pieces(cfg: OlmoHybridConfig, key: tuple, pre: bool, post: bool) -> _StagePieces:
    """Pieces of a build with one layer of each kind of ``cfg`` (cached per config)."""
    hit = _PIECES.get((key, pre, post))
    if hit is None:
        kinds = tuple(dict.fromkeys(cfg.layout.layer_types))
        model = build_meta_stage(cfg, kinds, pre, post)
        hit = _PIECES[(key, pre, post)] = _split_pieces(model_pieces(model), kinds)
    return hit


def stage_parameters(cfg: OlmoHybridConfig, tp: int, stage_sizes: Sequence[int],
                     pp_rank: int, key: tuple | None = None) -> list[Param]:
    """Parameters of pipeline stage ``pp_rank`` on one TP rank, in ``named_parameters`` order.

    ``stage_sizes``: layers per stage; layer names are stage-local (megatron-core numbering).
    ``key``: ``cfg_key(cfg)`` when the caller has it. Returns [(name, elements)].
    """
    key = cfg_key(cfg) if key is None else key
    skey = (key, tp, tuple(stage_sizes), pp_rank)
    hit = _STAGES.get(skey)
    if hit is None:
        start = sum(stage_sizes[:pp_rank])
        types = cfg.layout.layer_types[start:start + stage_sizes[pp_rank]]
        pieces = _stage_pieces(cfg, key, pp_rank == 0, pp_rank == len(stage_sizes) - 1)
        out = [(n, rank_numel(s, d, tp)) for n, s, d in pieces.head]
        for i, kind in enumerate(types):
            out += [(f"{LAYER_PREFIX}{i}.{n}", rank_numel(s, d, tp))
                    for n, s, d in pieces.layers[kind]]
        out += [(n, rank_numel(s, d, tp)) for n, s, d in pieces.tail]
        hit = _STAGES[skey] = tuple(out)
    return list(hit)


def layer_numel(cfg: OlmoHybridConfig, tp: int, kind: str) -> int:
    """Elements of one layer of ``kind`` (``"G"`` / ``"*"``) on one TP rank."""
    pieces = _stage_pieces(cfg, cfg_key(cfg), True, True)
    return sum(rank_numel(s, d, tp) for _, s, d in pieces.layers[kind])


def embedding_numel(cfg: OlmoHybridConfig, tp: int) -> int:
    """Elements of the input embedding (V/TP x D) on one TP rank."""
    pieces = _stage_pieces(cfg, cfg_key(cfg), True, True)
    return sum(rank_numel(s, d, tp) for n, s, d in pieces.head if n == EMBEDDING)


def shared_names(cfg: OlmoHybridConfig, pp: int) -> tuple[str, ...]:
    """Parameters megatron-core marks ``shared_embedding`` (tied embeddings under PP > 1): they
    get their own DDP bucket."""
    if cfg.untie_embeddings_and_output_weights or pp == 1:
        return ()
    return (EMBEDDING, OUTPUT_LAYER)
