"""Building blocks shared by the model families: tensor-parallel linears, norm, rotary, MLP,
embedding and the paged-attention call."""
from tandem.models.layers.attention import Attention
from tandem.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tandem.models.layers.linear import (
    PrepackedWeight,
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    TensorParallel,
    default_weight_loader,
)
from tandem.models.layers.mlp import SwiGLUMLP
from tandem.models.layers.norm import RMSNorm
from tandem.models.layers.rotary import RopeSpec, RotaryEmbedding, RotaryTables, rope_spec_from_config

__all__ = [
    "PrepackedWeight",
    "Attention",
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "RopeSpec",
    "RotaryEmbedding",
    "RotaryTables",
    "RowParallelLinear",
    "SwiGLUMLP",
    "TensorParallel",
    "VocabParallelEmbedding",
    "default_weight_loader",
    "rope_spec_from_config",
]
