"""Export to Hugging Face GPT2LMHeadModel: the loaded model computes our logits."""
import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from model import ModelConfig, export_hf, init_params, make_apply

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _perturbed_params(config, seed):
    """Init, then noise on everything: zero biases and unit LN scales would hide mix-ups."""
    graphdef, params = init_params(config, seed=seed)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return graphdef, jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("bias", [True, False])
def test_hf_logits_match(tmp_path, bias):
    config = ModelConfig.named("tiny", vocab_size=100, bias=bias)
    graphdef, params = _perturbed_params(config, seed=int(bias))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, config.context_length))
    ours = np.asarray(jax.jit(make_apply(graphdef))(params, tokens))

    export_hf(params, config, tmp_path)
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path, output_loading_info=True, local_files_only=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    hf.eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.numpy()

    assert theirs.shape == (2, config.context_length, config.vocab_size)  # padding removed
    max_abs_diff = float(np.abs(ours[..., : config.vocab_size] - theirs).max())
    assert max_abs_diff < 1e-4, max_abs_diff
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied


def test_export_files(tmp_path):
    config = ModelConfig.named("tiny", vocab_size=100, bias=False)
    _, params = init_params(config, seed=0)
    export_hf(params, config, tmp_path / "out")
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_config["model_type"] == "gpt2"
    assert hf_config["activation_function"] == "gelu_new"
    assert hf_config["layer_norm_epsilon"] == 1e-5
    assert hf_config["tie_word_embeddings"] is True
    assert (hf_config["vocab_size"], hf_config["n_positions"], hf_config["n_embd"],
            hf_config["n_layer"], hf_config["n_head"]) == (100, 64, 64, 2, 4)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in tensors
    assert tensors["transformer.wte.weight"].shape == (100, 64)
    assert tensors["transformer.h.1.attn.c_attn.weight"].shape == (64, 192)
    assert tensors["transformer.h.1.mlp.c_proj.weight"].shape == (256, 64)
    np.testing.assert_array_equal(tensors["transformer.h.0.mlp.c_fc.weight"],
                                  params["blocks"]["mlp"]["fc"]["kernel"][...][0])
    # bias=False exports zero biases, which HF's always-biased GPT-2 computes identically.
    np.testing.assert_array_equal(tensors["transformer.h.0.attn.c_attn.bias"], 0.0)
    assert len([k for k in tensors if k.startswith("transformer.h.")]) == 2 * 12
