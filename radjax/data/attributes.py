"""Attributes: what an example records about its film and patient beside its labels (view, sex,
age band, site), as text, for subgroup evaluation (``radjax evaluate --by``)."""

from __future__ import annotations

import math

# Upper bounds (exclusive, years) and names: the bands fairness audits of chest X-ray models use.
AGE_BANDS = ((50.0, "<50"), (65.0, "50-64"), (80.0, "65-79"), (math.inf, "80+"))


def age_band(age: float | None) -> str:
  """The ``AGE_BANDS`` name of an age in years; "" (missing) for None or NaN."""
  if age is None or math.isnan(age):
    return ""
  return next(name for upper, name in AGE_BANDS if age < upper)
