"""Checked values: what a regress target and a classify task's labels may be.

A value that f32 arithmetic cannot hold passes every type check and then fakes
a divergence (``nan``, ``inf``) or overflows at evaluation (``1e38``); a
classify task of one class trains a head that can say only one thing. Both stop
here, at load, naming where the value sits. The functions check one value or one
task's labels, so any reader (a whole file, a streamed batch, a hub dataset)
calls them as it goes.
"""

import math
from typing import Any, Iterable
# Regress targets meet float32 arithmetic in the head's mean and standard
# deviation and in the summed squared error of a batch and of a split. Two
# targets of magnitude at most B differ by at most 2B, so 2**24 squared errors
# sum to at most 2**24 * 4 * B**2, which float32 holds (3.4e38) for B up to
# sqrt(3.4e38 / 2**26) = 2.25e15. The bound is that, rounded down to a number
# a user can read.
MAX_REGRESS_MAGNITUDE = 1e15


def regress_target(value: Any, source: str, place: str) -> float:
    """Returns ``value`` as a float a regress head can train on.

    Args:
      value: the cell as read (a number, or text such as ``"2.5"``).
      source: what holds it, as the message starts (``"Task file 'a.csv'"``).
      place: where in it (``"on line 3"``, ``"in row 3"``).

    Raises:
      ValueError: one sentence naming ``source``, ``place`` and the value, when
        the value is empty, not a number, not finite, or of magnitude over
        ``MAX_REGRESS_MAGNITUDE``.
    """
    accepted = f"a finite number of magnitude at most {MAX_REGRESS_MAGNITUDE:g} is accepted"
    if value is None:
        # pandas reads a CSV cell "nan" as a missing value, so the two are one case here.
        raise ValueError(f"{source} has an empty or NaN 'value' {place}; {accepted}.")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{source} has value {value!r} {place}; {accepted}.") from None
    if not math.isfinite(number) or abs(number) > MAX_REGRESS_MAGNITUDE:
        raise ValueError(f"{source} has value {value!r} {place}, which float32 training cannot hold; {accepted}.")
    return number


def check_classes(labels: Iterable[str], source: str) -> None:
    """Stops a classify task whose labels hold fewer than two classes.

    Raises:
      ValueError: one sentence naming ``source`` and the one label it found.
    """
    found = sorted(set(labels))
    if len(found) < 2:
        what = f"only the label {found[0]!r}" if found else "no labels"
        raise ValueError(f"{source} has {what}; a classify task needs at least two distinct labels.")
