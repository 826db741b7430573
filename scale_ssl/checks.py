"""Argument checks shared by every part: one clear error naming the owner, the field and what it
must be (the ground floor: imports nothing of scale_ssl)."""

from __future__ import annotations


def check_int(owner: str, name: str, value, minimum: int) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``; else ``ValueError`` saying
    ``"<owner>: <name> must be an int >= <minimum>, got <value>"``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return value
