"""The reason a ``monai.bundle run`` failed, repeated as the last thing it prints.

MONAI wraps an error raised while a config is built (a bad label file, a missing weights file) in its own
"Failed to instantiate component ..." or "Failed to evaluate ...", and Python prints the whole chain, so the
reason a user needs sits in the middle of a long traceback while the last line names only MONAI's wrapper.
``install`` repeats the first error in the chain that MONAI did not raise at the end; it acts only in a
``python -m monai.bundle`` process, and only adds lines after Python's usual report.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from types import TracebackType

BUNDLE_CLI = ("monai", "bundle", "__main__.py")


def _raised_in(error: BaseException) -> Path | None:
    """The file of the line that raised ``error``."""
    trace = error.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    return Path(trace.tb_frame.f_code.co_filename) if trace is not None else None


def unwrapped(error: BaseException, wrapper_dir: Path) -> BaseException:
    """The first error along the chain of ``error`` (``raise ... from``) that code under ``wrapper_dir`` did not
    raise; ``error`` itself when none is."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        raised_in = _raised_in(current)
        if raised_in is None or wrapper_dir not in raised_in.parents:
            return current
        seen.add(id(current))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return error


def report_with_reason(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
    """Python's report of ``error``, then the error MONAI wrapped once more."""
    sys.__excepthook__(kind, error, trace)
    import monai

    reason = unwrapped(error, Path(monai.__file__).resolve().parent)
    if reason is not error:
        print("\nThe reason:\n" + "".join(traceback.format_exception_only(reason)).rstrip(), file=sys.stderr)


def install() -> None:
    """Use ``report_with_reason`` for uncaught errors when this process is ``python -m monai.bundle``."""
    if tuple(sys.argv[0].replace("\\", "/").split("/")[-3:]) == BUNDLE_CLI and sys.excepthook is sys.__excepthook__:
        sys.excepthook = report_with_reason
