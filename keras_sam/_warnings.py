"""keras_sam's warnings, attributed to the user's line.

A warning raised in a callback that `fit` runs, or in a constructor, would
otherwise point into Keras (`callback_list.py`). `warn` walks up the stack
past the frames of keras_sam and of the libraries it runs inside, and
attributes the warning to the first frame beyond them: the user's `fit`,
`SAMModel(...)` or analysis call.
"""

from __future__ import annotations

import sys
import warnings

# Top-level packages whose frames lie between the user's call and keras_sam.
LIBRARIES = frozenset({
    "keras_sam", "keras", "keras_hub", "tensorflow", "jax", "jaxlib", "torch",
    "optree", "contextlib", "functools",
})


def user_stacklevel() -> int:
    """The `stacklevel` that names, for a `warnings.warn` in the caller, the
    first frame outside `LIBRARIES` (the outermost frame if none is)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and \
            frame.f_globals.get("__name__", "").split(".")[0] in LIBRARIES:
        frame, level = frame.f_back, level + 1
    return level


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn(message, category)` attributed to the user's line."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
