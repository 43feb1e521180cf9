"""Option values as they arrive from JSON configs, Python callers or the command line.

``python -m monai.bundle run ... --pretrained false`` hands the config the *string* "false", which
Python counts as true; these helpers turn each accepted spelling into the value it means and
reject everything else with a message naming the option, so a flag can never silently mean its
opposite.
"""

from __future__ import annotations

from typing import Any

TRUE_WORDS = ("true", "1")
FALSE_WORDS = ("false", "0")


def as_bool(value: Any, name: str) -> bool:
    """``value`` as a bool: True/False, 1/0 and the strings true/false/True/False/1/0; ``ValueError`` otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ValueError(f"{name} must be true or false (true/false/True/False/1/0), got {value!r}")


def as_bool_or_word(value: Any, name: str, words: tuple[str, ...], described: str) -> bool | str:
    """``value`` as one of ``words`` (case and spaces ignored), else as ``as_bool``; ``ValueError`` naming the option,
    ``described`` (what the words are) and the value otherwise."""
    if isinstance(value, str) and value.strip().lower() in words:
        return value.strip().lower()
    try:
        return as_bool(value, name)
    except ValueError:
        raise ValueError(f"{name} must be true, false or {described}, got {value!r}") from None


def optional_size(value: Any, name: str) -> int | None:
    """A size in pixels, or None for "not set" (also the command line's "None"/"null" strings)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number of pixels or None, got {value!r}") from None
