"""scripts/sample.py greedy decoding == the exported Hugging Face model's greedy generate; a damaged
newest checkpoint is passed over as train.py passes it over; a checkpoint is read with the settings it
was trained with; bad arguments are one line each."""
import json
import shutil

import numpy as np
import pytest

from tests.helpers import damaged_copy, one_error_line, run_at_once, run_script, script


@pytest.fixture
def trained_run(tiny_run):
    return tiny_run


@pytest.mark.slow
def test_greedy_sample_matches_exported_hf_model(trained_run, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = script("export_hf").main(["--checkpoint", str(trained_run), "--out", str(tmp_path / "hf")])
    capsys.readouterr()
    prompt = "ROMEO: But soft, what light"
    ours = script("sample").main(["--checkpoint", str(trained_run), "--prompt", prompt,
                                  "--max-new-tokens", "12", "--temperature", "0"])
    printed = capsys.readouterr().out

    from data.tokenizer import gpt2_encoding
    prompt_ids = gpt2_encoding().encode(prompt)
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False,
                                pad_token_id=model.config.eos_token_id)
    assert ours == theirs[0].tolist()
    assert len(ours) == len(prompt_ids) + 12
    assert gpt2_encoding().decode(ours).startswith(prompt) and gpt2_encoding().decode(ours) in printed


def test_sampling_is_seeded_and_bad_input_refused(trained_run, capsys):
    sample = script("sample")
    args = ["--checkpoint", str(trained_run), "--prompt", "To be", "--max-new-tokens", "5",
            "--temperature", "1.0", "--top-k", "20"]
    a = sample.main([*args, "--seed", "1"])
    b = sample.main([*args, "--seed", "1"])
    assert a == b and len(a) == len(np.atleast_1d(a))
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        sample.main(["--checkpoint", str(trained_run.parent / "missing")])


@pytest.mark.slow
def test_generation_past_the_context_equals_recomputing_every_window(trained_run):
    """The cache serves the tokens that fit; past the context each token comes from the last window."""
    import jax
    import jax.numpy as jnp

    from model import make_apply
    from model.sampling import generate
    from recipes.train.run_params import load_run_params
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


def test_sample_passes_over_a_damaged_newest_checkpoint_as_train_does(trained_run, tmp_path, capsys):
    run_dir, newest, older = damaged_copy(trained_run, tmp_path)
    args = ["--prompt", "To be", "--max-new-tokens", "4", "--temperature", "0"]
    asked = run_script("sample", "--checkpoint", str(run_dir), "--step", str(newest), *args, tmp_path=tmp_path)
    assert asked.returncode == 1 and f"checkpoint {newest} in" in one_error_line(asked)
    assert (run_dir / "checkpoints" / str(newest)).is_dir()  # a step asked for is never moved aside

    fell_back = run_script("sample", "--checkpoint", str(run_dir), *args, tmp_path=tmp_path)
    assert fell_back.returncode == 0, fell_back.stderr[-3000:]
    notes = [line for line in fell_back.stderr.splitlines() if line.strip()]
    assert notes[0].startswith(f"checkpoint {newest} does not restore") and len(notes) == 2, notes
    assert notes[1] == f"using checkpoint {older}, the newest of {run_dir} that restores"
    assert (run_dir / "checkpoints.damaged" / str(newest)).is_dir()  # kept for inspection, as train.py keeps it
    script("sample").main(["--checkpoint", str(trained_run), "--step", str(older), *args])  # an older step, asked
    assert fell_back.stdout == capsys.readouterr().out


def test_bad_arguments_are_one_line_each_before_any_checkpoint_is_read(trained_run, tmp_path):
    cases = {("--prompt", ""): "error: --prompt must be a non-empty string, got ''",
             ("--temperature", "-0.5"): "error: --temperature must be a number >= 0, got -0.5",
             ("--top-k", "0"): "error: --top-k must be an int >= 1, got 0",
             ("--top-k", "-3"): "error: --top-k must be an int >= 1, got -3",
             ("--max-new-tokens", "-1"): "error: --max-new-tokens must be an int in [0, 10000], got -1",
             ("--max-new-tokens", "100000000000000000000"):
                 "error: --max-new-tokens must be an int in [0, 10000], got 100000000000000000000"}
    results = run_at_once({case: ["scripts/sample.py", "--checkpoint", str(trained_run), *case] for case in cases},
                          tmp_path)
    for case, result in results.items():
        assert result.returncode == 1 and one_error_line(result).startswith(cases[case]), (case, result.stderr[-2000:])


def test_a_checkpoint_is_read_with_the_settings_it_was_trained_with(trained_run, tmp_path, capsys, monkeypatch):
    """The older checkpoint records another head count (the same arrays, another function): sample and
    export read it with its own settings, not the newest checkpoint's."""
    from model.sampling import generate
    from recipes.train.run_params import load_run_params

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    older = min(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    record = run_dir / "checkpoints" / str(older) / "meta" / "metadata"
    meta = json.loads(record.read_text())
    assert meta["config"]["model"]["n_head"] == 4
    meta["config"]["model"]["n_head"] = 2
    record.write_text(json.dumps(meta))

    config, _, step = load_run_params(run_dir, older)
    assert step == older and config.model.n_head == 2
    assert load_run_params(run_dir)[0].model.n_head == 4  # the newest keeps its own

    sample = script("sample")
    used = []  # an untrained model's attention is near uniform, so its text hardly shows the head count

    def generate_recording(model_config, *args, **kwargs):
        used.append(model_config)
        return generate(model_config, *args, **kwargs)

    monkeypatch.setattr(sample, "generate", generate_recording)
    sample.main(["--checkpoint", str(run_dir), "--step", str(older), "--max-new-tokens", "2", "--temperature", "0"])
    assert [c.n_head for c in used] == [2]

    out = script("export_hf").main(["--checkpoint", str(run_dir), "--step", str(older), "--out", str(tmp_path / "hf")])
    assert json.loads((out / "config.json").read_text())["n_head"] == 2
    capsys.readouterr()
