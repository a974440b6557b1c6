"""Every test process sees 8 simulated CPU devices, so sharding tests run anywhere.

One persistent compilation cache serves the whole run (both xdist workers and every process a test
starts), every compilation kept however quick: most tests build the same tiny programs again, and a
program compiled once is then loaded instead. XLA:CPU's backend runs at optimization level 0:
the suite's time is mostly compiling small programs that then run a few steps, and LLVM's
optimizations cost more there than they save. The programs are the same; their results agree with
the optimized build's to float32 rounding (1e-7 relative on a tiny run), inside every tolerance here.

JAX_PLATFORMS=cpu is also set for the subprocesses tests start: with the TPU runtime
installed (the [tpu] extra, for compile checks), a JAX process without it probes for a
TPU and prints warnings that would land in the one-line errors the tests read.

Two tiers. `pytest -n 2 tests` runs everything (CI, and the README's command). A developer's loop
deselects the two markers below: `pytest -n 2 -m "not process and not slow" tests`, in-process
and a few minutes on 2 cores (config, model, optimizer, data, sharding, hooks, loss, collectives).
- `process` is set here, never by hand: a test is marked when its function, or any fixture it uses
  (directly or through other fixtures), names `subprocess`, `multiprocessing`, `Popen`, `fork` or
  `sys.executable` in its code (nested functions and lambdas included), or calls a function of
  tests/ that does, at any depth (helpers.train_process, run_script, run_at_once, a module's own
  start()...). So a new test that starts a real process (signals, kills, several processes, a
  script as a user runs it) is in the process tier without anyone remembering a marker. Code of
  the package under test that starts processes is not looked into: call it through a helper.
- `slow` is set by hand on an in-process test that takes more than about 10 s on 2 cores: whole
  tiny trainings end to end (resume, divergence, sweeps, meta-training equivalences, the device
  check, benchmarks). Keep in the fast tier at least one of each kind of check.
"""
import inspect
import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

# Set by the first process (pytest itself, or xdist's controller) and inherited by its workers.
RUN_ID = os.environ.setdefault("CELO2_GPT_TEST_RUN", str(os.getpid()))
COMPILATION_CACHE = Path(tempfile.gettempdir()) / f"celo2-gpt-tests-{RUN_ID}" / "jax_cache"

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(COMPILATION_CACHE)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_compilation_cache_dir", str(COMPILATION_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller, after every worker is done
        shutil.rmtree(COMPILATION_CACHE.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny trained run directory with checkpoints at steps 4 and 8, shared by the tests of the tools
    that read a run (sample, export): copy it before damaging it."""
    import train
    from tests.helpers import TINY

    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    train.main([*TINY, "--train.steps=8", "--train.checkpoint_every=4", f"--train.out_dir={run_dir}",
                "--eval.at_start=false"])
    return run_dir


# --- The two tiers -------------------------------------------------------------------------------

# Names whose appearance in a test's code means it starts a process: the modules, the class, and
# sys.executable (the interpreter a command line starts).
PROCESS_NAMES = frozenset({"subprocess", "multiprocessing", "Popen", "fork", "executable"})


def _codes(code):
    """A code object and every code object nested in it (inner functions, lambdas, comprehensions)."""
    yield code
    for const in code.co_consts:
        if inspect.iscode(const):
            yield from _codes(const)


def _starts_process(func, seen: dict) -> bool:
    """Whether FUNC, or a function of tests/ it names (transitively), names one of PROCESS_NAMES."""
    func = inspect.unwrap(getattr(func, "__func__", func))
    code = getattr(func, "__code__", None)
    if code is None:
        return False
    if code in seen:
        return seen[code]
    seen[code] = False  # a cycle adds nothing
    names = {name for c in _codes(code) for name in c.co_names}
    found = bool(names & PROCESS_NAMES)
    if not found:
        scopes = [getattr(func, "__globals__", {})]
        scopes += [value for value in map(scopes[0].get, names)
                   if inspect.ismodule(value) and value.__name__.startswith("tests")]
        for name in names:
            for scope in scopes:
                value = scope.get(name) if isinstance(scope, dict) else getattr(scope, name, None)
                if inspect.isfunction(value) and value.__module__.startswith("tests") \
                        and _starts_process(value, seen):
                    found = True
                    break
            if found:
                break
    seen[code] = found
    return found


def pytest_collection_modifyitems(config, items):
    """Mark `process` every test that starts a real process (see the module's docstring)."""
    seen = {}
    for item in items:
        if item.get_closest_marker("process"):
            continue
        functions = [getattr(item, "function", None)]
        fixtureinfo = getattr(item, "_fixtureinfo", None)
        for name in getattr(item, "fixturenames", ()):
            for fixturedef in (fixtureinfo.name2fixturedefs.get(name, ()) if fixtureinfo else ()):
                functions.append(fixturedef.func)
        if any(f is not None and _starts_process(f, seen) for f in functions):
            item.add_marker(pytest.mark.process)
