"""Option values as they arrive from JSON configs, Python callers or the command line.

``python -m monai.bundle run ... --pretrained false`` hands the config the *string* "false", which
Python counts as true; these helpers turn each accepted spelling into the value it means and
reject everything else with a message naming the option, so a flag can never silently mean its
opposite. The module imports neither torch nor MONAI, so that ``python -m scripts`` checks its
options (and prints ``--help``) before spending seconds importing them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

TRUE_WORDS = ("true", "1")
FALSE_WORDS = ("false", "0")
LDCT_RANGE = (0.0, 4.0)  # the radiologists' scale of LDCTIQA: 0 (bad) to 4 (excellent)
AMP_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}  # name: torch's
AMP_WORDS = tuple(AMP_DTYPES)  # the autocast dtypes ``amp`` takes by name
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


class OptionError(ValueError):
    """A value an option cannot take, in a message that names the option and the value: ``python -m scripts``
    prints the message alone and exits 2."""


def as_bool(value: Any, name: str) -> bool:
    """``value`` as a bool: True/False, 1/0 and the strings true/false/True/False/1/0; ``OptionError`` otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise OptionError(f"{name} must be true or false (true/false/True/False/1/0), got {value!r}")


def as_bool_or_word(value: Any, name: str, words: tuple[str, ...], described: str) -> bool | str:
    """``value`` as one of ``words`` (case and spaces ignored), else as ``as_bool``; ``OptionError`` naming the option,
    ``described`` (what the words are) and the value otherwise."""
    if isinstance(value, str) and value.strip().lower() in words:
        return value.strip().lower()
    try:
        return as_bool(value, name)
    except ValueError:
        raise OptionError(f"{name} must be true, false or {described}, got {value!r}") from None


def optional_size(value: Any, name: str) -> int | None:
    """A size in pixels (a whole number of at least 1: 256, 256.0 or "256"), or None for "not set" (also the command
    line's "None"/"null" strings). 2.5, 0 and -1 are refused rather than truncated or passed on to fail in a resize."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    try:
        return whole_number(value, name, 1)
    except OptionError:
        raise OptionError(f"{name} must be a whole number of pixels (at least 1) or None, got {value!r}") from None


def whole_number(value: Any, name: str, minimum: int = 0) -> int:
    """``value`` as a whole number of at least ``minimum`` (3, 3.0 or "3"; not True, 2.5 or "three")."""
    try:
        number = int(value)
        whole = not isinstance(value, bool) and number == float(value) and number >= minimum
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise OptionError(f"{name} must be a whole number of at least {minimum}, got {value!r}")
    return number


def positive_number(value: Any, name: str) -> float:
    """``value`` as a finite number above 0 (64, 0.5 or "64")."""
    try:
        number = float(value)
        positive = not isinstance(value, bool) and math.isfinite(number) and number > 0
    except (TypeError, ValueError):
        positive = False
    if not positive:
        raise OptionError(f"{name} must be a number above 0, got {value!r}")
    return number


def optional_intercept(value: Any) -> float | None:
    """The ``slice_intercept`` id: None (also ``"none"``/``"null"``: TIFF/PNG slices are rendered) or a finite number
    (-32768, "-1024"), added to a slice's stored values to give HU."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        return None
    try:
        number = float(value)
        finite = not isinstance(value, bool) and math.isfinite(number)
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise OptionError(f"slice_intercept must be a number (HU = stored value + it) or none, got {value!r}")
    return number


def amp_choice(amp: Any) -> str | bool:
    """The ``amp`` id checked: a dtype's name (``AMP_WORDS``, lower case) or true/false; ``OptionError`` otherwise.
    ``scripts.engines.amp_dtype`` turns it into the dtype for a device."""
    if isinstance(amp, str) and amp.strip().lower() in AMP_WORDS:
        return amp.strip().lower()
    try:
        return as_bool(amp, "amp")
    except ValueError:
        raise OptionError(f"amp must be false, true, bf16 or fp16 (or 0/1), got {amp!r}") from None


def compile_mode(compile: Any) -> str | None:
    """The ``compile`` id: false (None), true (``"default"``) or one of ``torch.compile``'s modes by name, such as
    ``max-autotune`` (tunes each kernel: a longer first call) or ``reduce-overhead`` (CUDA graphs)."""
    modes = f"a torch.compile mode ({', '.join(COMPILE_MODES)})"
    choice = as_bool_or_word(compile, "compile", COMPILE_MODES, modes)
    if isinstance(choice, str):
        return choice
    return "default" if choice else None


def channels_last_choice(channels_last: Any) -> bool | str:
    """The ``channels_last`` id checked: true, false or ``"auto"``; ``OptionError`` otherwise.
    ``scripts.engines.wants_channels_last`` decides what ``"auto"`` means on a device."""
    return as_bool_or_word(channels_last, "channels_last", ("auto",), "auto")


def worker_count(num_workers: Any) -> int | str:
    """The ``num_workers`` id checked: ``"auto"`` or a number of processes (0 or more); ``OptionError`` otherwise.
    ``scripts.engines.reader_processes`` decides what ``"auto"`` means on a device."""
    if isinstance(num_workers, str) and num_workers.strip().lower() == "auto":
        return "auto"
    try:
        return whole_number(num_workers, "num_workers", 0)
    except OptionError:
        message = f"num_workers must be a number of processes (0 or more) or 'auto', got {num_workers!r}"
        raise OptionError(message) from None


def check_window(window: Any) -> tuple[float, float]:
    """``window`` as (low, high) HU; ``OptionError`` unless it is two finite numbers with low < high."""
    try:
        values = tuple(float(value) for value in window)
    except ValueError:  # text that is not a number ("abc,400")
        raise OptionError(f"window must be two HU values low, high, got {window!r}") from None
    if len(values) != 2 or not all(math.isfinite(value) for value in values) or values[0] >= values[1]:
        raise OptionError(f"window must be two HU values low, high with low < high, both finite, got {values}")
    return values[0], values[1]


def check_windows(window: Any) -> list[tuple[float, float]]:
    """One HU window ``[low, high]`` or several ``[[low, high], ...]`` (one per channel), each checked; ``OptionError``
    naming the value otherwise (a single number, text, a pair the wrong way round)."""
    try:
        values = list(window)
        several = bool(values) and all(isinstance(value, (list, tuple)) for value in values)
        return [check_window(pair) for pair in values] if several else [check_window(values)]
    except TypeError:
        raise OptionError(
            f"window must be two HU values low,high (e.g. -1000,400) or one pair per channel, got {window!r}"
        ) from None


def windows_text(windows: Sequence[tuple[float, float]]) -> str:
    """Windows as a reader writes them: ``[-1000, 400], [-160, 240]``."""
    return ", ".join(f"[{low:g}, {high:g}]" for low, high in windows)
