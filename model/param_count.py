"""Parameter counts, computed from the abstract model (nothing is allocated)."""
from __future__ import annotations

import dataclasses
import math

import jax

from model.config import ModelConfig
from model.functional import abstract_params


@dataclasses.dataclass(frozen=True)
class ParamCount:
    total: int  # published convention: vocab padding rows excluded
    padded_total: int  # what is actually allocated
    non_embedding: int  # total without wte and wpe (the count scaling laws use)


def count_params(config: ModelConfig) -> ParamCount:
    _, abstract = abstract_params(config)
    padded_total = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    padding = (config.padded_vocab_size - config.vocab_size) * config.d_model
    total = padded_total - padding
    embedding = (config.vocab_size + config.context_length) * config.d_model
    return ParamCount(total=total, padded_total=padded_total, non_embedding=total - embedding)
