"""The traced calendar against Python's own (proleptic Gregorian) calendar."""

from __future__ import annotations

import datetime as dt

import jax.numpy as jnp
import numpy as np

from aurora.civil_dates import civil_from_days, days_from_civil


def test_civil_dates_match_python_and_round_trip() -> None:
    """Every 3rd day from year 53 to 3886 (leap years, century rules, dates before 1970)."""
    days = np.arange(-700_000, 700_000, 3)
    year, month, day = (np.asarray(a) for a in civil_from_days(jnp.asarray(days, jnp.int32)))
    epoch = dt.date(1970, 1, 1)
    expected = [epoch + dt.timedelta(days=int(n)) for n in days]
    np.testing.assert_array_equal(year, [d.year for d in expected])
    np.testing.assert_array_equal(month, [d.month for d in expected])
    np.testing.assert_array_equal(day, [d.day for d in expected])
    np.testing.assert_array_equal(np.asarray(days_from_civil(year, month, day)), days)
