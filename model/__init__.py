"""GPT-2 / GPT-3 style decoder in Flax NNX with scan-stacked layers and logical sharding."""
from model.config import SIZES, ModelConfig
from model.export_hf import export_hf
from model.functional import abstract_params, init_params, make_apply, make_loss_fn
from model.gpt import GPT, PAD_LOGIT
from model.loss import next_token_loss, split_inputs_targets
from model.param_count import ParamCount, count_params
from model.sharding import (LOGICAL_RULES, constrain, logical_to_spec, make_mesh,
                            param_partition_specs, param_shardings)

__all__ = [
    "GPT", "LOGICAL_RULES", "PAD_LOGIT", "SIZES", "ModelConfig", "ParamCount",
    "abstract_params", "constrain", "count_params", "export_hf", "init_params",
    "logical_to_spec", "make_apply", "make_loss_fn", "make_mesh", "next_token_loss",
    "param_partition_specs", "param_shardings", "split_inputs_targets",
]
