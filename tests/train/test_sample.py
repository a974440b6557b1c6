"""scripts/sample.py greedy decoding == the exported Hugging Face model's greedy generate."""
import importlib

import numpy as np
import pytest

import train
from tests.train.test_train import TINY



def script(name):
    return importlib.import_module(f"scripts.{name}")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sample") / "run"
    train.main([*TINY, "--train.steps=8", f"--train.out_dir={run_dir}", "--eval.at_start=false"])
    return run_dir


def test_greedy_sample_matches_exported_hf_model(trained_run, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = script("export_hf").main(["--checkpoint", str(trained_run), "--out", str(tmp_path / "hf")])
    prompt = "ROMEO: But soft, what light"
    ours = script("sample").main(["--checkpoint", str(trained_run), "--prompt", prompt,
                                  "--max-new-tokens", "12", "--temperature", "0"])
    assert capsys.readouterr().out.splitlines()[-1].startswith(prompt)

    from data.tokenizer import gpt2_encoding
    prompt_ids = gpt2_encoding().encode(prompt)
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False,
                                pad_token_id=model.config.eos_token_id)
    assert ours == theirs[0].tolist()
    assert len(ours) == len(prompt_ids) + 12


def test_sampling_is_seeded_and_bad_input_refused(trained_run, capsys):
    sample = script("sample")
    args = ["--checkpoint", str(trained_run), "--prompt", "To be", "--max-new-tokens", "5",
            "--temperature", "1.0", "--top-k", "20"]
    a = sample.main([*args, "--seed", "1"])
    b = sample.main([*args, "--seed", "1"])
    assert a == b and len(a) == len(np.atleast_1d(a))
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        sample.main(["--checkpoint", str(trained_run.parent / "missing")])


def test_generation_past_the_context_equals_recomputing_every_window(trained_run):
    """The cache serves the tokens that fit; past the context each token comes from the last window."""
    import jax
    import jax.numpy as jnp

    from model import make_apply
    from model.sampling import generate
    from recipes.train.checkpoint import load_run_params
    from recipes.train.state import abstract_param_dict

    config, params, _ = load_run_params(trained_run)
    width = config.model.context_length
    prompt = list(range(100, 100 + width - 5))
    ours = generate(config.model, params, prompt, 12, temperature=0)  # crosses the context after 5 tokens
    apply = jax.jit(make_apply(abstract_param_dict(config.model)[0]))
    reference = list(prompt)
    for _ in range(12):
        window = reference[-width:]
        logits = apply(params, jnp.asarray([window]))[0, -1, :config.model.vocab_size]
        reference.append(int(jnp.argmax(logits)))
    assert ours == reference
