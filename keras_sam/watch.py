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
- A training loss that stays where it started while the gradient
  vanishes: at epoch 2 or 3 of the optimizer's iterations (whether they ran
  as one `fit` or as several), a loss that did not go down over the epoch
  (by STALL or more) and is still within LEFT of the first epoch's, while
  the mean norm of the clean gradient g over the epoch fell to COLLAPSE of
  the first epoch's or less. The model has gone flat at its starting loss,
  a near-constant prediction, which SAM's objective favours: with Adam on
  Transformers, SAM at a constant rho from the first step holds the loss at
  the constant-predictor level (ln 2 for two classes) for good, its mean
  ||g|| a quarter of the first epoch's, while plain training from the same
  start learns (`benchmarks/stall_evidence.py`). A loss that stays while g
  does not shrink (a learning rate too small to move it, a plateau plain
  training shares) is not this, and gets no warning; nor does rho = 0. The
  step keeps the mean of ||g|| (which e is computed from) on the device;
  this check reads it once after the epoch.

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
# A loss still within this share of the first epoch's has not left where
# it started.
LEFT = 0.02
# A mean ||g|| at or below this share of the first epoch's has collapsed.
# In benchmarks/stall_evidence.py the stalled runs fell to 0.23-0.28 of it,
# runs that learned or that nothing moved kept 0.74 or more.
COLLAPSE = 0.5
GUIDE = ("docs/guides/transformers-adam.md ('Transformers and Adam' in the "
         "documentation)")


def stall_message(losses: list, norms: list) -> str | None:
    """The warning after the epoch whose training loss is `losses[-1]`, or
    None. `losses` and `norms` hold, per epoch since the first, the loss
    and the mean ||g|| (NaN where no step measured it)."""
    first, before, now = losses[0], losses[-2], losses[-1]
    if now < before - STALL * abs(before) or now < first - LEFT * abs(first):
        return None
    if not (math.isfinite(norms[0]) and math.isfinite(norms[-1])
            and norms[0] > 0.0 and norms[-1] <= COLLAPSE * norms[0]):
        return None
    epoch = len(losses)
    if now > before:
        seen = f"rose over epoch {epoch} ({before:.6g} -> {now:.6g})"
    elif now == before:
        seen = f"did not change over epoch {epoch} ({now:.6g})"
    else:
        seen = (f"fell by only {100.0 * (before - now) / abs(before):.2g}% "
                f"over epoch {epoch} ({before:.6g} -> {now:.6g})")
    return (
        f"The training loss {seen}, still where it started (epoch 1: "
        f"{first:.4g}), while the clean gradient shrank: its mean norm "
        f"||g|| fell from {norms[0]:.3g} in epoch 1 to {norms[-1]:.3g}. The "
        "model has gone flat at its starting loss (a near-constant "
        "prediction), which SAM's objective favours; with Adam on "
        "Transformers SAM holds such a model there for good, while plain "
        "training from the same start learns. Train the same model without "
        "SAM for as many epochs: if it learns, try `adaptive=True` (ASAM) or "
        "a smaller rho, or start SAM once plain training has left this loss "
        "(a rho schedule that is 0 for the first epochs). See "
        f"{GUIDE}.")


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
    across `fit` calls: the loss and mean ||g|| of each epoch so far, and
    the optimizer iteration at which the last one ended. An epoch that
    begins anywhere else (a new optimizer, weights loaded, steps run
    outside `fit`) begins a new record, so one `fit(epochs=5)` and five
    `fit(epochs=1)` are the same run to the checks."""
    losses: list = dataclasses.field(default_factory=list)
    norms: list = dataclasses.field(default_factory=list)
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
        tracker = self.sam._gradient_norm_tracker
        if tracker is not None:   # this epoch's mean
            tracker.reset_state()
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
        record.norms.append(gradient_norm_seen(self.sam))
        # The start of training only: later, a loss that settles is fine.
        if 2 <= len(record.losses) <= 3 and not record.stall_warned:
            message = stall_message(record.losses, record.norms)
            if message is not None:
                record.stall_warned = True
                _warnings.warn(message)

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


def gradient_norm_seen(sam) -> float:
    """The mean ||g|| over the epoch's steps, read on the host once; NaN
    where no step measured it (rho = 0, Momentum-SAM, all skipped)."""
    tracker = sam._gradient_norm_tracker
    if tracker is None:
        return float("nan")
    count = float(_keras_compat.to_numpy(tracker.count))
    if not count:
        return float("nan")
    return float(_keras_compat.to_numpy(tracker.total)) / count


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
