"""What `SAMModel` checks about how it is used, at no cost to the step.

At construction: a way to train without SAM that wrapping cannot prevent
(a compiled wrapped model).

After each epoch of `SAMModel.fit`, on the host: two ways a run can go wrong
without an error.

- A rho schedule that returns a negative or non-finite value. Such a step
  is skipped on every backend, like a non-finite gradient (the weights stay
  as they were); TensorFlow stops with an error naming the iteration, and
  on JAX and PyTorch, whose compiled or queued steps cannot raise, this
  check warns after the epoch, naming the first bad iteration and value.
- A training loss that did not go down over an epoch at the start of
  training (the first three epochs of the optimizer's iterations, whether
  they ran as one `fit` or as several). With Adam on Transformers, SAM at a constant rho from the first step can hold the loss
  at the constant-predictor level (ln 2 for two classes) for good, while
  plain training learns (`benchmarks/transformer_case.py --study`); the
  warning says what to try.

Each warning is given once per SAMModel and names the user's `fit` line.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from keras_sam import _keras_compat, _warnings

# A training loss that did not go down by this share from one epoch to the
# next has stalled. In the study (benchmarks/transformer_case.py --study)
# every run that ended at chance had, from epoch 2 to 3, a loss that fell by
# less than this or rose; runs that learned fell by 20% or more once they
# left the plateau.
STALL = 0.005


def bad_rho(rho, iterations) -> tuple | None:
    """(iteration, value) of the first iteration in `iterations` at which
    the schedule `rho` is negative or not finite, or None."""
    for t in iterations:
        t = int(t)
        try:
            value = float(_keras_compat.to_numpy(rho(t)))
        except Exception:   # a schedule that needs a tensor: not checked
            return None
        if not math.isfinite(value) or value < 0.0:
            return t, value
    return None


@dataclasses.dataclass
class Record:
    """The start of training as the checks see it, kept on the SAMModel
    across `fit` calls: the loss of each epoch so far and the optimizer
    iteration at which the last one ended. An epoch that begins anywhere
    else (a new optimizer, weights loaded, steps run outside `fit`) begins
    a new record, so one `fit(epochs=5)` and five `fit(epochs=1)` are the
    same run to the checks."""
    losses: list = dataclasses.field(default_factory=list)
    end: int | None = None
    stall_warned: bool = False


class Watch(keras.callbacks.Callback):
    """Added by `SAMModel.fit`: after each epoch, the two checks above."""

    def __init__(self, sam):
        super().__init__()
        self.sam = sam
        self.start = None

    def on_epoch_begin(self, epoch, logs=None):
        self.start = iterations(self.sam)
        record = getattr(self.sam, "_watch_record", None)
        if record is None or record.end != self.start:
            # Not a layer, variable or config: Keras does not track it.
            object.__setattr__(self.sam, "_watch_record", Record())

    def on_epoch_end(self, epoch, logs=None):
        end = iterations(self.sam)
        self.check_rho(end)
        record = self.sam._watch_record
        record.end = end
        loss = (logs or {}).get("loss")     # a 0-d tensor on PyTorch
        if loss is None or not math.isfinite(loss := float(loss)):
            return
        record.losses.append(loss)
        # The start of training only: later, a loss that settles is fine.
        if 2 <= len(record.losses) <= 3 and not record.stall_warned:
            before, now = record.losses[-2], record.losses[-1]
            if now >= before - STALL * abs(before):
                record.stall_warned = True
                _warnings.warn(
                    f"The training loss did not go down over an epoch "
                    f"({before:.4g} -> {now:.4g}). If the same model learns "
                    "without SAM, SAM is holding it where it started (seen "
                    "with Adam on Transformers): try `adaptive=True` (ASAM) "
                    "or a smaller rho, or start SAM once plain training has "
                    "left this loss (a rho schedule that is 0 for the first "
                    "epochs). See the README, 'Transformers and Adam'.")

    def check_rho(self, end: int) -> None:
        rho = self.sam.options.rho
        if isinstance(rho, float) or getattr(self.sam, "_rho_warned", False):
            return
        # At most 1000 iterations per epoch, both ends included.
        found = bad_rho(rho, np.unique(np.linspace(
            self.start, max(self.start, end - 1), 1000).astype(int)))
        if found is not None:
            object.__setattr__(self.sam, "_rho_warned", True)
            _warnings.warn(
                f"`rho` returned {found[1]} at iteration {found[0]}: a "
                "rho schedule must give a finite value >= 0. Such steps "
                "were skipped (the weights did not move on them). Fix "
                "the schedule, e.g. clip it: `lambda t: "
                "keras.ops.maximum(schedule(t), 0.0)`.")


def iterations(sam) -> int:
    """The optimizer's step count, read on the host (0 before it is built).

    Through `keras_sam._keras_compat.to_numpy`: no DeprecationWarning, and
    a copy of the array rather than a scalar read (`.item()`), which the
    PyTorch sync tests count as work of the step."""
    optimizer = getattr(sam, "optimizer", None)
    if optimizer is None or not optimizer.built:
        return 0
    return int(_keras_compat.to_numpy(optimizer.iterations))


def warn_about_bypassed_training(model, compiled: bool) -> None:
    """A way to train without SAM that wrapping cannot prevent: compile
    settings someone chose for the wrapped model (`compiled`; a KerasHub
    task's own defaults are not)."""
    if compiled:
        _warnings.warn(
            f"'{model.name}' is compiled: `{model.name}.fit(...)` would train "
            "it without SAM. Train through the wrapper: `sam_model.compile("
            "...)` compiles the wrapped model again with the loss and metrics "
            "it is given (they replace the model's own), and "
            "`sam_model.fit(...)` trains it with SAM.")


def with_watch(sam, callbacks):
    """`callbacks` (None, a list or a CallbackList) with a `Watch` of `sam`."""
    if isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks.append(Watch(sam))
        return callbacks
    return list(callbacks or []) + [Watch(sam)]
