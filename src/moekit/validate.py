"""Field checks shared by every config dataclass (a leaf module: any tier may import it).

Each error names the field as `<owner>.<name>` (owner: the config class, or the section a user
types in `--set`, such as `optim`), says what is allowed and shows what was given. Type errors
raise TypeError and range errors ValueError, unless the caller passes its own `error` class
(the converters raise ConversionError for both).
"""

from __future__ import annotations

import math
from typing import Any


def _label(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_int(owner: str, name: str, value: Any, minimum: int | None = None, *, allow_none: bool = False,
              error: type[Exception] | None = None) -> None:
    """An int (not a bool) >= minimum; None too when `allow_none`."""
    if value is None and allow_none:
        return
    label = _label(owner, name)
    if isinstance(value, bool) or not isinstance(value, int):
        none = " or None" if allow_none else ""
        raise (error or TypeError)(f"{label} must be an integer{none}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise (error or ValueError)(f"{label} must be >= {minimum}, got {value}")


def check_float(owner: str, name: str, value: Any, *, minimum: float | None = 0.0, strict: bool = True,
                maximum: float | None = None, allow_none: bool = False, error: type[Exception] | None = None) -> None:
    """A finite int or float above `minimum` (strictly when `strict`) and at most `maximum`."""
    if value is None and allow_none:
        return
    label = _label(owner, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        none = " or None" if allow_none else ""
        raise (error or TypeError)(f"{label} must be a finite number{none}, got {value!r}")
    low = minimum is not None and (value <= minimum if strict else value < minimum)
    high = maximum is not None and value > maximum
    if not (low or high):
        return
    if maximum is None:
        raise (error or ValueError)(f"{label} must be {'>' if strict else '>='} {_num(minimum)}, got {value}")
    left = "-inf" if minimum is None else _num(minimum)
    bracket = "(" if strict or minimum is None else "["
    raise (error or ValueError)(f"{label} must be in {bracket}{left}, {_num(maximum)}], got {value}")


def check_bool(owner: str, name: str, value: Any, *, error: type[Exception] | None = None) -> None:
    if not isinstance(value, bool):
        raise (error or TypeError)(f"{_label(owner, name)} must be True or False, got {value!r}")


def check_choice(owner: str, name: str, value: Any, allowed: tuple | list, *,
                 error: type[Exception] | None = None) -> None:
    if value not in allowed:
        raise (error or ValueError)(f"{_label(owner, name)} must be one of {list(allowed)}, got {value!r}")
