"""Train a GPT model: python train.py [--config NAME.yaml] [--section.key=value ...] [--dry-run]

A bare NAME resolves in configs/; without --config the default recipe trains. train.out_dir is the run directory: it receives the
resolved config, the optimizer's routing table, metrics.jsonl and the checkpoints, and
rerunning into it resumes from its latest checkpoint. SIGTERM or Ctrl-C saves a
checkpoint and exits cleanly.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from recipes.errors import ConfigError
from recipes.files import atomic_write
from recipes.train import config as config_lib
from recipes.train import mesh as mesh_lib
from recipes.train.build import build_program
from recipes.train.checkpoint import Checkpointer
from recipes.train.dry_run import dry_run_report
from recipes.train.metrics import MetricsLog, json_safe, mfu, progress_bar
from recipes.train.report import summary_lines
from recipes.train.run_dir import RunDirLock, check_resumable, keep_config_history, resume_records, write_summary
from recipes.train.stop import StopRequest


DEFAULT_RECIPE = "shakespeare_celo2.yaml"  # a small GPT on the bundled corpus, minutes on a CPU


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--config", default=DEFAULT_RECIPE,
                        help=f"YAML recipe: a path or a name in configs/ (default: {DEFAULT_RECIPE})")
    parser.add_argument("--dry-run", action="store_true",
                        help="build everything abstractly, print sizes as JSON (last line) and exit")
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


def log0(*args) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


def main(argv: list[str] | None = None) -> dict:
    held_locks: list[RunDirLock] = []
    try:
        return _main(argv, held_locks)
    finally:
        for lock in held_locks:
            lock.release()


def _main(argv: list[str] | None, held_locks: list) -> dict:
    began = time.perf_counter()
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    notes = []
    config = config_lib.load_config(args.config, overrides, notes)
    for note in notes:
        log0(note)
    mesh_lib.init_distributed(config.mesh)
    # Everything is built from shapes first; parameters are allocated only when training.
    # A dry run needs no Celo2 weights on disk: a placeholder of the right shapes stands in.
    program = build_program(config, shapes_only=args.dry_run)
    mesh, table, state_abstract = program.mesh, program.routing, program.state_abstract
    seq_len, accum, micro_batch = config.seq_len, program.micro_batches, program.micro_batch
    total_steps = config.train.steps

    if args.dry_run:
        report = dry_run_report(config, table, state_abstract, mesh)
        log0(table.format())
        print(json.dumps(report), flush=True)
        return report

    # Data: each process reads only its rows of every global batch.
    from data.loader import TokenLoader, data_directory
    eval_batch = config.eval.batch_size or micro_batch
    mesh_lib.check_batch(eval_batch, eval_batch, mesh, what="eval.batch_size")
    loader = TokenLoader.open(data_directory(config.data.path), seq_len=seq_len,
                              global_batch=config.data.global_batch,
                              seed=config.train.seed if config.data.seed is None else config.data.seed,
                              val_global_batch=eval_batch, vocab_size=config.model.vocab_size)
    eval_batches = min(config.eval.batches, loader.num_val_batches)
    if eval_batches == 0:
        log0(f"note: the val split holds no full batch of {eval_batch} x {seq_len + 1} tokens, so this run "
             "reports no validation loss; lower eval.batch_size or data.seq_len, or prepare more val data")
    elif eval_batches < config.eval.batches:
        log0(f"note: the val split holds {eval_batches} batches of {eval_batch}; evaluating on those")

    # The run directory records what this run is: config, routing, then metrics and checkpoints.
    run_dir = Path(config.train.out_dir).absolute()
    check_resumable(run_dir, config, state_abstract, log=log0)  # before anything in it is rewritten
    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # one trainer per run directory
        lock = RunDirLock(run_dir)
        try:
            lock.acquire(log=log0)
        except RuntimeError as error:
            raise ConfigError(str(error)) from None
        held_locks.append(lock)
    if jax.process_index() == 0:
        keep_config_history(run_dir, config_lib.to_yaml(config))
        table.save(run_dir / "routing.json")
        atomic_write(run_dir / "routing.txt", table.format() + "\n")
    log0(table.format())
    log0(f"mesh {mesh_lib.describe(mesh)} on {mesh.size} {jax.devices()[0].device_kind} device(s), "
         f"{jax.process_count()} process(es); {config.tokens_per_step:,} tokens/step "
         f"({config.data.global_batch} x {seq_len}, {accum} micro-batch(es)), {total_steps:,} steps")

    # State: the latest checkpoint of the run directory, else fresh.
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.train.keep_checkpoints)
    latest, state = checkpointer.restore_newest(state_abstract, log=log0)
    if latest is not None:
        log0(f"resumed {run_dir} at step {latest}")
    else:
        state = program.init_state()
    start = int(jax.device_get(state["step"]))
    stop = config.train.stop_at_step or total_steps
    if start >= stop and (run_dir / "summary.json").is_file():
        finished = json.loads((run_dir / "summary.json").read_text())
        log0(f"{run_dir} is already at step {start} of {stop}: nothing to train (its summary.json is kept)")
        log0(json.dumps(finished))
        return finished

    train_step, eval_step = program.train_step, program.eval_step

    def evaluate(params) -> float:
        losses = [eval_step(params, mesh_lib.global_batch_array(b, mesh)) for b in loader.val_batches(eval_batches)]
        return float(np.mean(jax.device_get(losses)))

    metrics_log = MetricsLog(run_dir, wandb_mode=config.logging.wandb, project=config.logging.wandb_project,
                             name=config.logging.wandb_name or run_dir.name, config=config_lib.to_dict(config),
                             resume_step=latest)
    summary = {"start_step": start, "train_loss": None, "val_loss": None, "stopped_by": None,
               "skipped_steps": 0}
    target = config.train.target_val_loss
    before_resume, reached = resume_records(metrics_log.records, target)
    # Training wall time: evaluation and each invocation's first (compiling) step excluded.
    clock = {"start": time.perf_counter(), "paused": 0.0, "before_resume": before_resume}

    def wall_time() -> float:
        return clock["before_resume"] + time.perf_counter() - clock["start"] - clock["paused"]

    if target is not None:
        summary.update(target_val_loss=target, target_step=None, target_tokens=None, target_wall_time_s=None)
        if reached is not None:
            summary.update(reached)
            if config.train.stop_at_target:
                log0(f"{run_dir} reached val loss {target} at step {summary['target_step']} "
                     "(train.stop_at_target): nothing to train")
                metrics_log.close()
                checkpointer.close()
                return summary
    first_val_loss = []  # the first evaluation of this invocation, for the closing summary
    show_bar = config.logging.progress and jax.process_index() == 0
    streak = 0  # consecutive non-finite steps
    recent_losses = collections.deque(maxlen=50)  # for the spike guard

    def loss_reference() -> float:
        """Recent typical loss: the median of the last 50, or a fresh model's ln(vocab) before there are 5."""
        return float(np.median(recent_losses)) if len(recent_losses) >= 5 else math.log(config.model.vocab_size)

    health = {"clean": True, "trusted_step": latest}  # clean: every step since the last checkpoint was healthy
    window = {"time": time.perf_counter(), "steps": 0, "losses": [], "paused": 0.0}  # since the last record
    devices = list(mesh.devices.flat)

    def record(step: int, metrics) -> None:
        """Host side of step `step` (1-based count of steps done), read one step late."""
        nonlocal streak
        m = jax.device_get(metrics)
        if not m["finite"]:
            streak += 1
            health["clean"] = False
            summary["skipped_steps"] += 1
            log0(f"step {step}: non-finite loss {float(m['loss'])} or gradient norm "
                 f"{float(m['grad_norm'])}; skipped ({streak} in a row)")
            if streak >= config.train.max_nonfinite_steps:
                trusted = health["trusted_step"]
                summary.update(step=step, stopped_by="nonfinite", trusted_step=trusted)
                raise NonFiniteError(
                    f"{streak} consecutive non-finite steps (train.max_nonfinite_steps="
                    f"{config.train.max_nonfinite_steps}), last at step {step}. The run stopped; "
                    + (f"its checkpoint at step {trusted} holds the last trusted state, and rerunning resumes "
                       "from it: " if trusted is not None else "no trusted checkpoint was written: ")
                    + "lower optimizer.lr, add optimizer.grad_clip_norm, or check the data")
            return
        streak = 0
        loss_value = float(m["loss"])
        factor = config.train.spike_factor
        if factor is not None and loss_value > factor * loss_reference():
            health["clean"] = False
            log0(f"step {step}: loss {loss_value:.4g} is over {factor:g}x the recent median "
                 f"{loss_reference():.4g}; no checkpoint until the steps are healthy again")
        else:
            recent_losses.append(loss_value)
        window["steps"] += 1
        window["losses"].append(float(m["loss"]))
        summary["train_loss"] = float(m["loss"])
        if step % config.logging.every and step != stop:
            return
        elapsed = time.perf_counter() - window["time"] - window["paused"]  # evaluation excluded
        tokens_per_s = window["steps"] * config.tokens_per_step / max(elapsed, 1e-9)
        entry = {"step": step, "loss": float(np.mean(window["losses"])), "grad_norm": float(m["grad_norm"]),
                 "lr": float(m["lr"]), "tokens": step * config.tokens_per_step,
                 "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, config.model, seq_len, devices),
                 "skipped_steps": summary["skipped_steps"], "wall_time_s": round(wall_time(), 3)}
        entry.update({k: float(v) for k, v in m.get("diagnostics", {}).items()})
        metrics_log.log(entry)
        postfix = {"loss": f"{entry['loss']:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if entry["mfu"] is not None:
            postfix["mfu"] = f"{entry['mfu']:.1%}"
        bar.set_postfix(postfix, refresh=False)
        window.update(time=time.perf_counter(), steps=0, losses=[], paused=0.0)

    def run_eval(step: int) -> None:
        if eval_batches == 0:
            return
        began = time.perf_counter()
        summary["val_loss"] = evaluate(state["params"])
        if not first_val_loss:
            first_val_loss.append(summary["val_loss"])
        metrics_log.log({"step": step, "val_loss": summary["val_loss"]})
        (bar.write if show_bar else log0)(f"step {step}: val loss {summary['val_loss']:.4f}")
        window["paused"] += time.perf_counter() - began
        clock["paused"] += time.perf_counter() - began
        if target is not None and summary["target_step"] is None and summary["val_loss"] <= target:
            summary.update(target_step=step, target_tokens=step * config.tokens_per_step,
                           target_wall_time_s=round(wall_time(), 3))
            metrics_log.log({"step": step, "target_val_loss": target, "target_step": step,
                             "target_tokens": summary["target_tokens"],
                             "target_wall_time_s": summary["target_wall_time_s"]})
            (bar.write if show_bar else log0)(
                f"step {step}: reached the target val loss {target} ({summary['target_tokens']:,} tokens, "
                f"{summary['target_wall_time_s']:.1f} s of training)")

    probe_batch = []  # the first validation batch, read once when the first checkpoint is judged

    def save(step: int) -> None:
        """Saves only a state the run trusts: every step since the last checkpoint was finite and
        spike-free, and the saved parameters' own loss (on the first validation batch) is too: a
        step's loss is measured before its update, so this catches an update that blew up."""
        probe = 0.0
        if eval_batches > 0:
            if not probe_batch:
                probe_batch.append(mesh_lib.global_batch_array(next(iter(loader.val_batches(1))), mesh))
            probe = float(eval_step(state["params"], probe_batch[0]))
        factor = config.train.spike_factor
        blown = not np.isfinite(probe) or (factor is not None and probe > factor * loss_reference())
        if not health["clean"] or blown:
            reason = (f"its loss after the update is {probe:.4g}" if blown
                      else "a non-finite step or a loss spike since the last checkpoint")
            log0(f"step {step}: not saving a checkpoint: {reason} "
                 f"(the newest trusted checkpoint is step {health['trusted_step']})")
            health["clean"] = not blown  # a blown state stays untrusted; otherwise judge the next interval afresh
            return
        checkpointer.save(step, state, {"step": step, "config": config_lib.to_dict(config)})
        health["trusted_step"] = step

    with jax.set_mesh(mesh), StopRequest() as stop_request, \
            loader.iter_from(start, stop_step=stop, prefetch=config.data.prefetch) as batches, \
            progress_bar(start, stop, show_bar) as bar:
        if start == 0 and config.eval.at_start and start < stop:
            run_eval(0)
        pending = None
        step = start
        try:
            for index, tokens_local in batches:
                # Dispatch this step before reading the last one's metrics, so the device never idles.
                state, metrics = train_step(state, mesh_lib.global_batch_array(tokens_local, mesh))
                step = index + 1
                if step == start + 1:  # compilation is not training time
                    jax.block_until_ready(metrics)
                    clock.update(start=time.perf_counter(), paused=0.0)
                if pending is not None:
                    record(*pending)
                pending = (step, metrics)
                bar.update(1)
                if step % config.eval.every == 0 or step == stop:
                    record(*pending)
                    pending = None
                    run_eval(step)
                    if config.train.stop_at_target and summary.get("target_step") == step:
                        summary["ended_at_target"] = True
                        break
                checkpointer.check()  # a failed write stops the run now, not at the next save
                stopping = stop_request.agreed(check_others=step % config.logging.every == 0)
                if (step % config.train.checkpoint_every == 0 or stopping) and pending is not None:
                    record(*pending)  # the guard must see the step it would save
                    pending = None
                if step % config.train.checkpoint_every == 0 and step != stop and not stopping:
                    save(step)
                if stopping:
                    summary["stopped_by"] = stop_request.signal_name
                    log0(f"{stop_request.signal_name} received: saving a checkpoint at step {step} and exiting")
                    break
            if pending is not None:
                record(*pending)
            if step > start or latest is None:
                save(step)
        except NonFiniteError:
            summary.update(total_steps=total_steps, finished=False, run_dir=str(run_dir))
            write_summary(run_dir, summary)
            raise
        finally:
            checkpointer.close()
            metrics_log.close()
    summary.update(step=step, total_steps=total_steps, run_dir=str(run_dir), trusted_step=health["trusted_step"],
                   finished=step >= total_steps or bool(summary.get("ended_at_target")),
                   wall_time_s=round(wall_time(), 3))
    write_summary(run_dir, summary)
    log0(json.dumps(json_safe(summary)))
    if jax.process_index() == 0:
        tokens = (step - start) * config.tokens_per_step
        for line in summary_lines(summary, (first_val_loss or [None])[0], tokens, time.perf_counter() - began,
                                  run_dir / "checkpoints", config.sample.prompt):
            print(line, flush=True)
        if config.sample.max_new_tokens and jax.process_count() == 1:
            print(f"--- a sample ({config.sample.max_new_tokens} new tokens, temperature "
                  f"{config.sample.temperature:g}) ---\n{sample_text(config, state['params'])}", flush=True)
    return summary


def sample_text(config, params) -> str:
    from data.tokenizer import gpt2_encoding
    from model.sampling import generate

    encoding = gpt2_encoding()
    s = config.sample
    prompt_ids = encoding.encode(s.prompt, allowed_special={"<|endoftext|>"})
    ids = generate(config.model, params, prompt_ids, s.max_new_tokens, s.temperature, s.top_k, s.seed)
    return encoding.decode(ids)


if __name__ == "__main__":
    from recipes.train.cli import EXIT_CODES, one_line, ordinary_errors, quiet_library_logs

    quiet_library_logs()
    try:
        result = main()
        # Saved but unfinished: exit as the signal would, so a scheduler reruns. A finished run
        # exits 0 even when a signal came during its last step (else reruns would never end).
        if result.get("stopped_by") and not result.get("finished"):
            import signal
            sys.exit(128 + int(getattr(signal, result["stopped_by"], signal.SIGTERM)))
    except (*ordinary_errors(), NonFiniteError) as error:
        if os.environ.get("CELO2_DEBUG"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        code = EXIT_CODES["nonfinite"] if isinstance(error, NonFiniteError) else EXIT_CODES["error"]
        # After a failed write, orbax's writer threads would print their own tracebacks while the
        # interpreter shuts down; the one line above says it all, and everything is closed.
        from recipes.train.checkpoint import CheckpointWriteError

        if isinstance(error, (OSError, CheckpointWriteError)):
            os._exit(code)
        sys.exit(code)
