"""The Medusa-2 heads-loss schedules at hand-computed steps."""

import math

import pytest

from medusa_train.schedules import ramp_fraction, schedule_value


@pytest.mark.parametrize("name, step, total, expected", [
    ("constant", 0, 100, 1.0),
    ("constant", 99, 100, 1.0),
    ("linear", 0, 100, 0.0),
    ("linear", 25, 100, 0.25),
    ("linear", 99, 100, 0.99),
    ("sine", 0, 100, 0.0),
    ("sine", 50, 100, math.sqrt(0.5)),  # sin(pi/4)
    ("sine", 100, 100, 1.0),
    ("sine", 1, 3, 0.5),  # sin(pi/6)
    ("sine_0.5", 0, 100, 0.0),
    ("sine_0.5", 25, 100, math.sqrt(0.5)),  # half-way through the ramp: sin(pi/4)
    ("sine_0.5", 50, 100, 1.0),  # the ramp is over
    ("sine_0.5", 80, 100, 1.0),
    ("sine_0.1", 5, 100, math.sqrt(0.5)),
    ("sine_0.1", 10, 100, 1.0),
    ("sine_1", 50, 100, math.sqrt(0.5)),  # r = 1 is plain sine
])
def test_schedule_values(name, step, total, expected):
    assert schedule_value(name, step, total) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", ["cosine", "sine_", "sine_0", "sine_1.5", "sine_x", "linear_0.5", "Sine"])
def test_unknown_schedules_are_refused(name):
    with pytest.raises(ValueError, match="schedule"):
        ramp_fraction(name)


def test_ramp_fraction():
    assert ramp_fraction("sine_0.25") == 0.25
    assert ramp_fraction("constant") is None


def test_total_steps_must_be_positive():
    with pytest.raises(ValueError, match="total_steps"):
        schedule_value("linear", 0, 0)
