"""Watching sharpness during training."""

from __future__ import annotations

import keras

from keras_sam.analysis import hessian_eigenvalues, hessian_trace, sharpness

__all__ = ["SharpnessMonitor"]


class SharpnessMonitor(keras.callbacks.Callback):
    """Every `every` epochs, measures the model on a fixed batch and adds
    the results to the epoch's `logs`, so that `History`, `CSVLogger` and
    `TensorBoard` show them like `loss`:

        eval_sharpness           max_{||e|| <= rho} L(w + e) - L(w)
                                 (`keras_sam.analysis.sharpness`)
        hessian_max_eigenvalue   the top eigenvalue of the Hessian of L
        hessian_trace            Hutchinson's estimate (when `trace_probes`)

    on the data given here, in inference mode; on the epochs in between
    they are NaN (`CSVLogger` fixes its columns at the first epoch). Works
    on any compiled model,
    SAM-trained or not. Place it before the loggers in `callbacks` (Keras
    calls callbacks in order; `History` always comes last).

    Args:
        x: a fixed batch (or a small dataset) to measure on; the same
            forms as `keras_sam.analysis.sharpness` takes.
        y: the targets for array `x`; None for a dataset.
        every: measure after every `every`-th epoch (1-based: epochs
            every, 2 * every, ...).
        rho: the radius for the sharpness.
        ascent_steps: ascent steps for the sharpness (1: SAM's e).
        hessian: also measure the top Hessian eigenvalue.
        max_iter: the most Lanczos iterations for the eigenvalue.
        tol: the relative residual at which the eigenvalue counts as
            converged.
        trace_probes: Hutchinson probes for the trace; 0 skips it.
        batch_size: to split (x, y) into batches.

    Raises:
        ValueError: `every` below 1.

    Example:

    ```python
    monitor = keras_sam.callbacks.SharpnessMonitor(x_probe, y_probe, every=5)
    history = sam_model.fit(x, y, epochs=50, callbacks=[
        monitor, keras.callbacks.CSVLogger("log.csv")])
    history.history["eval_sharpness"]
    ```
    """

    def __init__(self, x, y=None, every: int = 1, rho: float = 0.05,
                 ascent_steps: int = 1, hessian: bool = True,
                 max_iter: int = 20, tol: float = 1e-2,
                 trace_probes: int = 0, batch_size: int = 128):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be an integer >= 1; received "
                             f"{every!r}.")
        self.x, self.y = x, y
        self.every, self.rho, self.ascent_steps = every, rho, ascent_steps
        self.hessian, self.max_iter, self.tol = hessian, max_iter, tol
        self.trace_probes, self.batch_size = trace_probes, batch_size

    def measure(self) -> dict:
        """The measurements at the model's current weights."""
        logs = {"eval_sharpness": sharpness(
            self.model, self.x, self.y, rho=self.rho,
            ascent_steps=self.ascent_steps, batch_size=self.batch_size)}
        if self.hessian:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # a capped estimate is fine
                top = hessian_eigenvalues(
                    self.model, self.x, self.y, k=1, max_iter=self.max_iter,
                    tol=self.tol, batch_size=self.batch_size)
            logs["hessian_max_eigenvalue"] = float(top[0])
        if self.trace_probes:
            logs["hessian_trace"] = hessian_trace(
                self.model, self.x, self.y, probes=self.trace_probes,
                batch_size=self.batch_size)[0]
        return logs

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if (epoch + 1) % self.every:
            # Not measured this epoch: NaN, so that loggers that fix their
            # columns at the first epoch (CSVLogger) have them from there.
            logs.update(dict.fromkeys(self._names(), float("nan")))
            return
        logs.update(self.measure())

    def _names(self) -> list:
        return (["eval_sharpness"]
                + (["hessian_max_eigenvalue"] if self.hessian else [])
                + (["hessian_trace"] if self.trace_probes else []))
