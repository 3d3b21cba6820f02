"""How the Medusa-2 heads' loss weight ramps over joint training.

    lambda(t) = heads_coefficient * schedule_value(schedule, t, T)

t is the number of optimizer steps already taken (0 for the first step's loss), T the
stage's total steps, as in the Medusa authors' trainer (`global_step / max_steps`):

    constant   1
    linear     t / T
    sine       sin(pi/2 * t / T)
    sine_<r>   sin(pi/2 * t / (r T)) while t / T < r, then 1   (0 < r <= 1)

A ramp that starts at 0 lets the backbone move away from its original next-token
distribution slowly while the heads' gradients into it are still large.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "sine", "sine_<r>")


def ramp_fraction(name: str) -> float | None:
    """r of `sine_<r>`; None for the other schedules. Raises ValueError on an unknown name."""
    if name in ("constant", "linear", "sine"):
        return None
    prefix, _, value = name.partition("_")
    try:
        r = float(value) if prefix == "sine" else math.nan
    except ValueError:
        r = math.nan
    if not 0 < r <= 1:  # also false for nan
        raise ValueError(f"unknown heads loss schedule {name!r}: use one of {', '.join(SCHEDULES)} "
                         "with 0 < r <= 1, e.g. sine_0.1")
    return r


def schedule_value(name: str, step: int, total_steps: int) -> float:
    """The schedule's factor in [0, 1] for the loss of step `step` (0-based) of `total_steps`."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    r = ramp_fraction(name)
    progress = step / total_steps
    if name == "constant":
        return 1.0
    if name == "linear":
        return progress
    if name == "sine":
        return math.sin(math.pi / 2 * progress)
    return math.sin(math.pi / 2 * progress / r) if progress < r else 1.0
