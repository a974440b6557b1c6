"""The error type every layer raises for a setting that cannot be used, and the wording of numeric
limits in its messages.

Both are defined with the config classes' base in model.config_base, the lowest layer with
settings, so the model and the optimizer library raise it without importing the trainer; the
command-line entry points turn it into one `error:` line. Messages read "<key> must be <what>, got <value>".
"""

from __future__ import annotations

import math

from model.config_base import ConfigError, bounds_text

__all__ = ["ConfigError", "bounds_text", "check_number"]


def check_number(where: str, value, *, integer: bool = False, low=None, high=None, low_open: bool = False,
                 high_open: bool = False, optional: bool = False, hint: str = "") -> None:
    """Raises ConfigError unless ``value`` is a finite number (an int if ``integer``; bools are
    neither) within the bounds; ``optional`` also accepts None. ``hint`` ends the message."""
    if value is None and optional:
        return
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    ok = ok and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        kind = "an int" if integer else "a number"
        allowed = f"{kind}{bounds_text(low, high, low_open, high_open)}" + (" or null" if optional else "")
        raise ConfigError(f"{where} must be {allowed}, got {value!r}" + (f"; {hint}" if hint else ""))
