"""Export to Hugging Face GPT2LMHeadModel: the loaded model computes our logits. scripts/export_hf.py
writes only into a new or empty directory, an earlier export of the same run, or with --overwrite, and
passes over a damaged newest checkpoint as train.py does."""
import json
import os
import shutil
import stat

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from model import ModelConfig, export_hf, init_params, make_apply
from tests.helpers import damaged_copy, one_error_line, run_script, script


def _perturbed_params(config, seed):
    """Init, then noise on everything: zero biases and unit LN scales would hide mix-ups."""
    graphdef, params = init_params(config, seed=seed)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return graphdef, jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("bias", [True, False])
def test_hf_logits_match(tmp_path, bias):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
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


def snapshot(directory) -> dict:
    """name -> (bytes, mode) of every file in ``directory``."""
    return {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in sorted(directory.iterdir())}


def test_export_refuses_a_foreign_directory_and_a_file_and_changes_nothing(tiny_run, tmp_path):
    users = tmp_path / "users_model"
    users.mkdir()
    (users / "config.json").write_text('{"mine": true}\n')
    (users / "model.safetensors").write_bytes(b"the user's weights")
    os.chmod(users / "config.json", 0o600)
    os.chmod(users / "model.safetensors", 0o640)
    before = snapshot(users)
    refused = run_script("export_hf", "--checkpoint", str(tiny_run), "--out", str(users), tmp_path=tmp_path)
    assert refused.returncode == 1
    assert "holds files no export of" in one_error_line(refused) and "--overwrite" in one_error_line(refused)
    assert snapshot(users) == before  # same files, same bytes, same modes: no marker, no temporary left

    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for out in (a_file, a_file / "below"):
        refused = run_script("export_hf", "--checkpoint", str(tiny_run), "--out", str(out), tmp_path=tmp_path)
        assert refused.returncode == 1 and "is a file, not a directory" in one_error_line(refused), refused.stderr
    assert a_file.read_text() == "mine"


def test_reexport_into_the_runs_own_export_and_overwrite(tiny_run, tmp_path):
    out = tmp_path / "hf"
    first = run_script("export_hf", "--checkpoint", str(tiny_run), "--out", str(out), tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out / ".celo2_export.json").read_text()) == {"run_dir": str(tiny_run.resolve()), "step": 8}
    again = run_script("export_hf", "--checkpoint", str(tiny_run), "--step", "4", "--out", str(out), tmp_path=tmp_path)
    assert again.returncode == 0 and "exported step 4" in again.stdout, again.stderr[-3000:]
    assert json.loads((out / ".celo2_export.json").read_text())["step"] == 4
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    other_run = tmp_path / "other_run"  # another run, by its directory
    shutil.copytree(tiny_run, other_run)
    refused = run_script("export_hf", "--checkpoint", str(other_run), "--out", str(out), tmp_path=tmp_path)
    assert refused.returncode == 1 and "holds an export of another run" in one_error_line(refused)

    (out / "README.md").write_text("the user's notes")
    forced = run_script("export_hf", "--checkpoint", str(other_run), "--out", str(out), "--overwrite",
                        tmp_path=tmp_path)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert json.loads((out / ".celo2_export.json").read_text()) == {"run_dir": str(other_run.resolve()), "step": 8}
    assert (out / "README.md").read_text() == "the user's notes"  # only the export's own files are replaced
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o644


def test_export_passes_over_a_damaged_newest_checkpoint_as_train_does(tiny_run, tmp_path):
    run_dir, newest, older = damaged_copy(tiny_run, tmp_path)
    result = run_script("export_hf", "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf"), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint {newest} does not restore" in result.stdout
    assert f"using checkpoint {older}, the newest of {run_dir} that restores" in result.stdout
    assert f"exported step {older} of" in result.stdout
    assert (run_dir / "checkpoints.damaged" / str(newest)).is_dir()
    script("export_hf").main(["--checkpoint", str(tiny_run), "--step", str(older), "--out", str(tmp_path / "older")])
    exported = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("hf", "older")]
    assert exported[0] == exported[1]  # the older checkpoint's weights
