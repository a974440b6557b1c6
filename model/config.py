"""Model hyperparameters: a frozen, validated config and the named sizes."""
from __future__ import annotations

import difflib
import typing
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from model.config_base import Bool, ConfigError, Float, Int, Must, config_class

ComputeDtype = Literal["float32", "bfloat16"]
COMPUTE_DTYPES = typing.get_args(ComputeDtype)
AttentionImpl = Literal["auto", "xla", "cudnn"]
ATTENTION_IMPLS = typing.get_args(AttentionImpl)

# (n_layer, d_model, n_head, context_length). GPT-2 sizes follow Radford et al. 2019,
# gpt3_xl follows Brown et al. 2020 (Table 2.1); tiny/mini are for CPU runs and tests.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, d_model=64, n_head=4, context_length=64),
    "mini": dict(n_layer=4, d_model=256, n_head=4, context_length=256),
    "gpt2_small": dict(n_layer=12, d_model=768, n_head=12, context_length=1024),
    "gpt2_medium": dict(n_layer=24, d_model=1024, n_head=16, context_length=1024),
    "gpt2_large": dict(n_layer=36, d_model=1280, n_head=20, context_length=1024),
    "gpt2_xl": dict(n_layer=48, d_model=1600, n_head=25, context_length=1024),
    "gpt3_xl": dict(n_layer=24, d_model=2048, n_head=16, context_length=2048),
}

PositiveInt = Annotated[Int, Field(gt=0), Must("a positive int")]
PositiveFloat = Annotated[Float, Field(gt=0), Must("a positive number")]
Flag = Annotated[Bool, Must("a bool")]


def _remat_from_bool(value):
    # Configs written before the policies existed say true (recompute everything) or false.
    return ("full" if value else "none") if isinstance(value, bool) else value


@config_class("ModelConfig.", extra_keys={"size": f"a named size, one of {list(SIZES)}; the other keys override it"})
class ModelConfig:
    """GPT-2 style decoder; parameters are float32. From a mapping, ``size`` picks a preset from SIZES."""

    n_layer: PositiveInt = Field(2, description="transformer blocks")
    n_head: PositiveInt = Field(4, description="attention heads per block")
    d_model: PositiveInt = Field(64, description="width of the residual stream")
    context_length: PositiveInt = Field(64, description="the most positions the model reads")
    vocab_size: PositiveInt = Field(50257, description="token ids the model embeds and predicts")
    pad_vocab_multiple: PositiveInt = Field(64, description="embedding rows are padded to a multiple of this")
    bias: Flag = Field(True, description="biases in the linear layers and LayerNorms")
    compute_dtype: ComputeDtype = Field("float32", description="matmul precision")
    remat: Annotated[Literal["none", "dots", "full"], BeforeValidator(_remat_from_bool)] = Field(
        "none", description="what the backward pass keeps of a layer: all of it, its matmuls' outputs, or its input")
    residual_dtype: Literal["float32", "bfloat16"] = Field("float32", description="the residual stream's dtype "
                                                          "(bfloat16 halves the activations kept)")
    unroll_layers: Flag = Field(False, description="trace each layer on its own, not one scan (compiles longer)")
    layer_norm_eps: PositiveFloat = Field(1e-5, description="LayerNorm's epsilon")
    init_std: PositiveFloat = Field(0.02, description="standard deviation of the initial weights")
    attention_impl: AttentionImpl = Field("auto", description="auto: cuDNN's fused kernel on GPU in bfloat16, else XLA")
    loss_chunk_tokens: PositiveInt = Field(8192, description="positions per device whose float32 logits the loss "
                                           "holds at once")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, values):
        if not isinstance(values, dict) or "size" not in values:
            return values
        values = dict(values)
        size = values.pop("size")
        if size is None:
            return values
        if not isinstance(size, str) or size not in SIZES:
            close = difflib.get_close_matches(str(size), list(SIZES), n=1)
            raise ConfigError(f"model.size={size!r} is not a known size"
                              f"{f' (did you mean {close[0]!r}?)' if close else ''}; sizes: {list(SIZES)}")
        return {**SIZES[size], **values}

    @model_validator(mode="after")
    def _consistent(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        return self

    @classmethod
    def named(cls, size: str, **overrides) -> ModelConfig:
        """A named size (see SIZES) with any field overridden, e.g. named('tiny', bias=False)."""
        return cls(**cls._preset({"size": size, **overrides}))

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def d_mlp(self) -> int:
        return 4 * self.d_model
