"""Export to a Hugging Face `GPT2LMHeadModel` directory: weights, configs and GPT-2's tokenizer.

Writing the files needs only numpy and safetensors; loading them needs transformers.
A bias=False model is exported with zero biases: HF's GPT-2 always has biases, and
zeros compute exactly the same function.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from data.files import atomic_path
from data.tokenizer import EOT_TEXT, EOT_TOKEN, VOCAB_SIZE, gpt2_vocab_files
from model.config import ModelConfig


def _to_numpy_tree(params) -> dict:
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    # np.asarray gathers sharded arrays onto the host.
    return {k: _to_numpy_tree(v) if isinstance(v, dict) else np.asarray(v, dtype=np.float32)
            for k, v in params.items()}


def hf_state_dict(params, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our parameters (GPT module, nnx.State or its pure dict) as HF GPT-2 tensors."""
    p = _to_numpy_tree(params)
    d = config.d_model

    def bias(node: dict, width: int, n_layer: int | None = None) -> np.ndarray:
        if "bias" in node:
            return node["bias"]
        return np.zeros((width,) if n_layer is None else (n_layer, width), np.float32)

    blocks = p["blocks"]
    stacked = {  # HF name -> (n_layer, ...) array; Conv1D weights are (fan_in, fan_out) like ours
        "ln_1.weight": blocks["ln_1"]["scale"],
        "ln_1.bias": bias(blocks["ln_1"], d, config.n_layer),
        "attn.c_attn.weight": blocks["attn"]["qkv"]["kernel"],
        "attn.c_attn.bias": bias(blocks["attn"]["qkv"], 3 * d, config.n_layer),
        "attn.c_proj.weight": blocks["attn"]["proj"]["kernel"],
        "attn.c_proj.bias": bias(blocks["attn"]["proj"], d, config.n_layer),
        "ln_2.weight": blocks["ln_2"]["scale"],
        "ln_2.bias": bias(blocks["ln_2"], d, config.n_layer),
        "mlp.c_fc.weight": blocks["mlp"]["fc"]["kernel"],
        "mlp.c_fc.bias": bias(blocks["mlp"]["fc"], config.d_mlp, config.n_layer),
        "mlp.c_proj.weight": blocks["mlp"]["proj"]["kernel"],
        "mlp.c_proj.bias": bias(blocks["mlp"]["proj"], d, config.n_layer),
    }
    tensors = {
        # Drop the vocab padding rows; lm_head is tied to wte, so HF rebuilds it.
        "transformer.wte.weight": p["wte"][: config.vocab_size],
        "transformer.wpe.weight": p["wpe"],
        "transformer.ln_f.weight": p["ln_f"]["scale"],
        "transformer.ln_f.bias": bias(p["ln_f"], d),
    }
    for name, value_NxS in stacked.items():
        if value_NxS.shape[0] != config.n_layer:
            raise ValueError(f"{name}: expected {config.n_layer} stacked layers, "
                             f"got shape {value_NxS.shape}")
        for i in range(config.n_layer):
            tensors[f"transformer.h.{i}.{name}"] = value_NxS[i]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}


def hf_config(config: ModelConfig) -> dict:
    """config.json contents for transformers' GPT2Config."""
    eos = min(50256, config.vocab_size - 1)  # GPT-2's <|endoftext|> when the vocab has it
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_embd": config.d_model,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": config.init_std,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "use_cache": True,
        "dtype": "float32",
    }


def generation_config(config: ModelConfig) -> dict:
    del config  # generation settings do not depend on the shape; the context length is in config.json
    return {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN, "do_sample": True, "temperature": 0.8}


def tokenizer_files(config: ModelConfig) -> dict[str, Callable[[Path], None]]:
    """GPT-2's tokenizer files, from the offline copies the data pipeline verified: name -> writer."""
    encoder_json, vocab_bpe = gpt2_vocab_files()
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    return {
        "vocab.json": lambda path: shutil.copyfile(encoder_json, path),
        "merges.txt": lambda path: shutil.copyfile(vocab_bpe, path),
        "special_tokens_map.json": _json_file(special),
        "tokenizer_config.json": _json_file({
            **special, "tokenizer_class": "GPT2Tokenizer", "model_max_length": config.context_length,
            "add_prefix_space": False}),
    }


def _json_file(value: dict) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(value, indent=2) + "\n")


def export_hf(params, config: ModelConfig, out_dir: str | Path, tokenizer: bool | None = None) -> Path:
    """Write a directory that `transformers` loads offline: `model.safetensors`, `config.json`,
    `generation_config.json` and, for the GPT-2 vocabulary (``tokenizer=None``) or when asked,
    the tokenizer files, so `AutoTokenizer` and `pipeline("text-generation")` work from it alone.
    Each file is written under a temporary name and renamed into place, readable by all (0644);
    other files in out_dir are left as they are. Returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(params, config)
    files = {"model.safetensors": lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
             "config.json": _json_file(hf_config(config)),
             "generation_config.json": _json_file(generation_config(config))}
    if tokenizer or (tokenizer is None and config.vocab_size == VOCAB_SIZE):
        files.update(tokenizer_files(config))
    for name, write in files.items():
        with atomic_path(out_dir / name) as tmp:
            write(tmp)
            tmp.chmod(0o644)  # a model directory is meant to be shared
    return out_dir
