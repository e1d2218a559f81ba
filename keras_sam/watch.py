"""What `SAMModel` checks about how it is used, at no cost to the step.

At construction: two ways to train without SAM that wrapping cannot prevent
(a wrapped model with its own `train_step`, a compiled wrapped model).

After each epoch of `SAMModel.fit`, on the host: two ways a run can go wrong
without an error.

- A rho schedule that returns a negative or non-finite value. Such a step
  is skipped on every backend, like a non-finite gradient (the weights stay
  as they were); TensorFlow stops with an error naming the iteration, and
  on JAX and PyTorch, whose compiled or queued steps cannot raise, this
  check warns after the epoch, naming the first bad iteration and value.
- A training loss that did not go down over an epoch at the start of
  training. With Adam on
  Transformers, SAM at a constant rho from the first step can hold the loss
  at the constant-predictor level (ln 2 for two classes) for good, while
  plain training learns (`benchmarks/transformer_case.py --study`); the
  warning says what to try.
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np

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
            value = float(keras.ops.convert_to_numpy(rho(t)))
        except Exception:   # a schedule that needs a tensor: not checked
            return None
        if not math.isfinite(value) or value < 0.0:
            return t, value
    return None


class Watch(keras.callbacks.Callback):
    """Added by `SAMModel.fit`: after each epoch, the two checks above."""

    def __init__(self, sam):
        super().__init__()
        self.sam = sam
        self.losses = []
        self.start = None
        self.warned = set()

    def on_epoch_begin(self, epoch, logs=None):
        self.start = _iterations(self.sam)

    def on_epoch_end(self, epoch, logs=None):
        rho = self.sam.options.rho
        if not isinstance(rho, float) and "rho" not in self.warned and \
                self.start is not None:
            end = _iterations(self.sam)
            # At most 1000 iterations per epoch, both ends included.
            found = bad_rho(rho, np.unique(np.linspace(
                self.start, max(self.start, end - 1), 1000).astype(int)))
            if found is not None:
                self.warned.add("rho")
                warnings.warn(
                    f"`rho` returned {found[1]} at iteration {found[0]}: a "
                    "rho schedule must give a finite value >= 0. Such steps "
                    "were skipped (the weights did not move on them). Fix "
                    "the schedule, e.g. clip it: `lambda t: "
                    "keras.ops.maximum(schedule(t), 0.0)`.", stacklevel=2)
        loss = (logs or {}).get("loss")
        if loss is None or not np.isfinite(loss):
            return
        self.losses.append(float(loss))
        # The start of training only: later, a loss that settles is fine.
        if 2 <= len(self.losses) <= 3 and "stall" not in self.warned:
            before, now = self.losses[-2], self.losses[-1]
            if now >= before - STALL * abs(before):
                self.warned.add("stall")
                warnings.warn(
                    f"The training loss did not go down over an epoch "
                    f"({before:.4g} -> {now:.4g}). If the same model learns "
                    "without SAM, SAM is holding it where it started (seen "
                    "with Adam on Transformers): try `adaptive=True` (ASAM) "
                    "or a smaller rho, or start SAM once plain training has "
                    "left this loss (a rho schedule that is 0 for the first "
                    "epochs). See the README, 'Transformers and Adam'.",
                    stacklevel=2)


def _iterations(sam) -> int | None:
    optimizer = getattr(sam, "optimizer", None)
    if optimizer is None or not optimizer.built:
        return None
    return int(keras.ops.convert_to_numpy(optimizer.iterations))


def warn_about_bypassed_training(model, compiled: bool) -> None:
    """Two ways to train without SAM that wrapping cannot prevent: a
    `train_step` of the model's own, and compile settings someone chose for
    the wrapped model (`compiled`; a KerasHub task's own defaults are
    not)."""
    if type(model).train_step is not keras.Model.train_step:
        warnings.warn(
            f"'{model.name}' ({type(model).__name__}) defines its own "
            "`train_step`, which SAMModel never calls: SAMModel runs its own "
            "step (two gradients of the compiled loss plus `model.losses`). "
            "Move what that train_step adds into the model's `call` (e.g. "
            "`self.add_loss(...)`) or its loss, or wrap a model without it.",
            stacklevel=3)
    if compiled:
        warnings.warn(
            f"'{model.name}' is compiled: `{model.name}.fit(...)` still "
            "trains it without SAM. Train through the wrapper "
            "(`sam_model.compile(...)`, `sam_model.fit(...)`); the wrapped "
            "model's own compile settings are not used.", stacklevel=3)


def with_watch(sam, callbacks):
    """`callbacks` (None, a list or a CallbackList) with a `Watch` of `sam`."""
    if isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks.append(Watch(sam))
        return callbacks
    return list(callbacks or []) + [Watch(sam)]
