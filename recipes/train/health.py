"""The health guard: which steps count, when a run must stop, which states may be saved.

A non-finite step was already skipped on the device (params unchanged); the guard counts it
and stops the run after ``max_nonfinite_steps`` in a row. A loss over ``spike_factor`` times
the recent median is a spike. Only a state reached through healthy steps is trusted enough to
checkpoint, so a resume never starts from a blown-up state.
"""
from __future__ import annotations

import collections
import logging
import math

import numpy as np

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""

    def __init__(self, message: str, *, step: int, trusted_step: int | None):
        super().__init__(message)
        self.step, self.trusted_step = step, trusted_step


class HealthGuard:
    def __init__(self, *, max_nonfinite_steps: int, spike_factor: float | None, vocab_size: int,
                 trusted_step: int | None):
        self.max_nonfinite_steps, self.spike_factor = max_nonfinite_steps, spike_factor
        self.fresh_loss = math.log(vocab_size)  # a fresh model's loss, the reference before any history
        self.trusted_step = trusted_step  # the newest checkpoint whose state the run trusts
        self.clean = True  # every step since the last checkpoint was healthy
        self.streak = 0  # consecutive non-finite steps
        self.skipped_steps = 0
        self._recent = collections.deque(maxlen=50)

    def reference(self) -> float:
        """The recent typical loss: the median of the last 50, or ln(vocab) before there are 5."""
        return float(np.median(self._recent)) if len(self._recent) >= 5 else self.fresh_loss

    def is_spike(self, loss: float) -> bool:
        return self.spike_factor is not None and loss > self.spike_factor * self.reference()

    def observe(self, step: int, loss: float, grad_norm: float, finite: bool) -> bool:
        """Judges step ``step``; False for a skipped (non-finite) one. Raises NonFiniteError when
        ``max_nonfinite_steps`` came in a row."""
        if not finite:
            self.streak += 1
            self.skipped_steps += 1
            self.clean = False
            logger.info(f"step {step}: non-finite loss {loss} or gradient norm {grad_norm}; "
                        f"skipped ({self.streak} in a row)")
            if self.streak >= self.max_nonfinite_steps:
                raise self._too_many(step)
            return False
        self.streak = 0
        if self.is_spike(loss):
            self.clean = False
            logger.info(f"step {step}: loss {loss:.4g} is over {self.spike_factor:g}x the recent median "
                        f"{self.reference():.4g}; no checkpoint until the steps are healthy again")
        else:
            self._recent.append(loss)
        return True

    def may_save(self, step: int, probe_loss: float) -> bool:
        """Whether the state after step ``step`` may be checkpointed: every step since the last
        checkpoint was healthy, and the state's own loss ``probe_loss`` (measured after the update,
        which a step's loss is not) is finite and no spike."""
        blown = not np.isfinite(probe_loss) or self.is_spike(probe_loss)
        if self.clean and not blown:
            return True
        reason = (f"its loss after the update is {probe_loss:.4g}" if blown
                  else "a non-finite step or a loss spike since the last checkpoint")
        logger.info(f"step {step}: not saving a checkpoint: {reason} "
                    f"(the newest trusted checkpoint is step {self.trusted_step})")
        self.clean = not blown  # a blown state stays untrusted; otherwise judge the next interval afresh
        return False

    def _too_many(self, step: int) -> NonFiniteError:
        trusted = self.trusted_step
        return NonFiniteError(
            f"{self.streak} consecutive non-finite steps (train.max_nonfinite_steps={self.max_nonfinite_steps}), "
            f"last at step {step}. The run stopped; "
            + (f"its checkpoint at step {trusted} holds the last trusted state, and rerunning resumes from it: "
               if trusted is not None else "no trusted checkpoint was written: ")
            + "lower optimizer.lr, add optimizer.grad_clip_norm, or check the data",
            step=step, trusted_step=trusted)
