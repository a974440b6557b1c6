"""The loop both trainers run (recipes.train.loop) on a toy step: when each hook is called, what it
is given, and the clock."""
import time

from recipes.train.loop import Clock, Hooks, Loop


def count(state, item):
    return state + 1, {"loss": float(state + 1)}


def test_hooks_come_at_their_cadence_and_metrics_are_read_after_the_next_step_is_dispatched():
    events = []

    def step(state, item):
        events.append(("dispatch", state + 1))
        return count(state, item)

    hooks = Hooks()
    hooks.add(lambda info: events.append(("metrics", info.step, info.metrics["loss"])), every=1, metrics=True)
    hooks.add(lambda info: events.append(("start", info.step)), at_start=True)
    hooks.add(lambda info: events.append(("every 2", info.step)), every=2, last=True, after_metrics=True)
    hooks.add(lambda info: events.append(("end", info.step)), at_end=True)
    info = Loop(step, hooks).run(0, 0, 3, range(3))
    assert info.step == info.state == 3
    assert events == [("start", 0), ("dispatch", 1), ("dispatch", 2), ("metrics", 1, 1.0), ("metrics", 2, 2.0),
                      ("every 2", 2), ("dispatch", 3), ("metrics", 3, 3.0), ("every 2", 3), ("end", 3)]


def test_a_stop_skips_the_rest_of_its_step_and_still_reads_its_metrics():
    events = []
    hooks = Hooks()
    hooks.add(lambda info: events.append(("metrics", info.step)), every=1, metrics=True)
    hooks.add(lambda info: info.stop("enough") if info.step == 2 else None, every=1)
    hooks.add(lambda info: events.append(("after", info.step)), every=1)
    hooks.add(lambda info: events.append(("stop", info.step, info.stop_reason)), on_stop=True)
    hooks.add(lambda info: events.append(("end", info.step)), at_end=True)
    info = Loop(count, hooks).run(0, 0, 10, range(10))
    assert info.step == 2
    assert events == [("after", 1), ("metrics", 1), ("metrics", 2), ("stop", 2, "enough"), ("end", 2)]

    stepped = []
    hooks = Hooks()
    hooks.add(lambda info: info.stop("at once"), at_start=True)
    info = Loop(lambda state, item: stepped.append(item) or count(state, item), hooks).run(5, 5, 10, range(5))
    assert info.step == 5 and info.stop_reason == "at once" and not stepped


def test_the_clock_leaves_out_compiling_and_paused_time(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    clock = Clock(before=7.0)
    now[0] += 30  # the first step, compiling
    clock.start()
    now[0] += 2
    with clock.paused():  # an evaluation
        now[0] += 5
    now[0] += 1
    assert clock.training_time() == 7.0 + 3
    assert clock.lap() == 30 + 3  # throughput's window: since the clock began, pauses left out
    now[0] += 4
    assert clock.lap() == 4


def test_a_repeated_sigterm_counts_once_and_a_second_ctrl_c_stops_at_once():
    """Real signals to this process: the first asks for a stop; more SIGTERMs change nothing during
    the loop; a second Ctrl-C raises StopNow, saying it came during training."""
    import os
    import signal

    import pytest

    from recipes.train.stop import StopNow, StopRequest, stop_at_once_on_signals
    saved = {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS}
    try:
        stop_at_once_on_signals()
        with StopRequest() as request:
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGTERM)
            assert request.signal_name == "SIGTERM"
            with pytest.raises(StopNow) as raised:
                os.kill(os.getpid(), signal.SIGINT)
            assert raised.value.phase == "during"
        for sig in StopRequest.SIGNALS:  # after the loop: at once again, saying the run was saved
            with pytest.raises(StopNow) as raised:
                os.kill(os.getpid(), sig)
            assert raised.value.phase == "after"
        # A trainer's command line, which exits after its loop, keeps ignoring SIGTERM once one stopped it.
        StopRequest.process_exits_after = True
        with StopRequest():
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        StopRequest.phase, StopRequest.process_exits_after = "before", False
