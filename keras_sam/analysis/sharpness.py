"""Measuring sharpness of a trained model.

The sharpness of the loss L at weights w, for a ball of radius rho, is

    S_rho(w) = max_{||e||_2 <= rho} L(w + e) - L(w),

or, with `adaptive=True`, over ASAM's scale-invariant ball
||e / T||_2 <= rho with T = |w| + eta (rescaling a layer's weights and
undoing it in the next layer leaves this sharpness unchanged).

`sharpness` estimates it batch by batch (m-sharpness, m = batch_size): the
inner maximum is approached by `ascent_steps` normalized gradient-ascent
steps, each projected back onto the ball; with one step, e = rho g / ||g||,
the first-order solution SAM itself uses. The estimate is a lower bound of
S_rho (the true maximum can only be higher).
"""

from __future__ import annotations

import keras
from keras import ops

from keras_sam._keras_compat import to_numpy
from keras_sam.analysis._data import Data, check_model, functions
from keras_sam.options import validate_rho
from keras_sam.perturbation import global_norm, l2_scale


def sharpness(
    model: keras.Model,
    x,
    y=None,
    rho: float = 0.05,
    batch_size: int = 128,
    ascent_steps: int = 1,
    sample_weight=None,
    steps: int | None = None,
    adaptive: bool = False,
    eta: float = 0.01,
) -> float:
    """Mean over batches of max_{||e||_2 <= rho} L_B(w + e) - L_B(w).

    Args:
        model: a compiled `keras.Model` (a `SAMModel` or a plain model); L is
            its compiled loss plus `model.losses`, in inference mode (no
            dropout, BatchNorm with its moving statistics).
        x: the data, in any form `model.evaluate` takes: NumPy arrays (or
            nested structures of them) with `y`, or a `tf.data.Dataset` /
            `keras.utils.PyDataset` yielding `(x, y)` or
            `(x, y, sample_weight)` batches.
        y: the targets for array `x`; None for a dataset.
        rho: radius of the L2 ball, a finite float >= 0.
        batch_size: m, the number of examples in each batch (arrays only; a
            dataset keeps its own batches).
        ascent_steps: normalized ascent steps of length rho / ascent_steps
            each, projected onto the ball; 1 gives SAM's e = rho g / ||g||.
        sample_weight: optional per-example weights for the loss (arrays).
        steps: how many batches to use; None for all.
        adaptive: measure over ASAM's ball ||e / T||_2 <= rho,
            T = |w| + eta (use ASAM's larger rho, e.g. 0.5 to 2).
        eta: ASAM's offset in T.

    Returns:
        The estimate, averaged over batches with weights equal to their sizes.
        The model's weights are not changed.

    Raises:
        ValueError: `rho` negative or not finite, `ascent_steps` below 1,
            no examples in the data, or labels that do not fit the compiled
            loss (one-hot labels with a sparse loss, say), said in one line.

    Example:

    ```python
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    keras_sam.analysis.sharpness(model, x_train, y_train, rho=0.05)
    keras_sam.analysis.sharpness(model, train_dataset, rho=0.05, steps=20)
    ```
    """
    rho = validate_rho(rho)
    if isinstance(ascent_steps, bool) or not isinstance(ascent_steps, int) \
            or ascent_steps < 1:
        raise ValueError(
            "`ascent_steps` must be a positive int (1 is SAM's first-order "
            f"step); received {ascent_steps!r}.")
    if not isinstance(adaptive, bool):
        raise TypeError(f"`adaptive` must be True or False; received "
                        f"{adaptive!r}.")
    if not eta >= 0:
        raise ValueError(f"`eta` must be >= 0; received {eta!r}.")
    check_model(model)
    data = Data(x, y, sample_weight, batch_size, steps)
    fns = functions(model)

    def batch_sharpness(xb, yb, swb):
        w = fns.weights()
        # T = |w| + eta for the adaptive ball, 1 otherwise; the ascent runs
        # in the coordinates e' = e / T, where the ball is round.
        scale = ([ops.abs(t) + eta for t in w] if adaptive
                 else [ops.ones_like(t) for t in w])
        clean = fns.loss(w, xb, yb, swb)
        e = [ops.zeros_like(t) for t in w]      # e', in scaled coordinates
        for _ in range(ascent_steps):
            point = [t + s * d for t, s, d in zip(w, scale, e)]
            _, g = fns.gradient(point, xb, yb, swb)
            g = [s * gi for s, gi in zip(scale, g)]
            # Step of length rho / ascent_steps along Tg / ||Tg||, ...
            step = l2_scale(global_norm(g), rho / ascent_steps)
            e = [d + gi * ops.cast(step, gi.dtype) for d, gi in zip(e, g)]
            # ... then back onto the ball ||e'|| <= rho.
            shrink = ops.minimum(1.0, l2_scale(global_norm(e), rho))
            e = [d * ops.cast(shrink, d.dtype) for d in e]
        perturbed = fns.loss([t + s * d for t, s, d in zip(w, scale, e)],
                             xb, yb, swb)
        return (float(to_numpy(perturbed))
                - float(to_numpy(clean)))

    unchecked = [True]

    def per_batch(xb, yb, swb):
        if unchecked:
            _check_labels(model, xb, yb, swb)
            unchecked.clear()
        return batch_sharpness(xb, yb, swb)

    return float(data.mean(per_batch))


def _check_labels(model, xb, yb, swb) -> None:
    """Evaluate the loss once, eagerly, so that labels that do not fit the
    compiled loss fail with a short message instead of inside a trace."""
    if yb is None:
        raise ValueError(
            "No labels: pass `y` with array inputs, or a dataset that yields "
            "(x, y) batches.")
    try:
        model.compute_loss(xb, yb, model(xb, training=False), swb,
                           training=False)
    except Exception as error:  # noqa: BLE001 - re-raised with context
        shapes = (f"labels of shape {tuple(keras.tree.flatten(yb)[0].shape)}"
                  if keras.tree.flatten(yb) else "no labels")
        raise ValueError(
            f"The model's compiled loss ({model.loss!r}) cannot take these "
            f"labels ({shapes}). A common cause: one-hot labels with a "
            "sparse loss (use `categorical_crossentropy`, or integer labels "
            "with `sparse_categorical_crossentropy`), or the reverse. Keras "
            f"said: {str(error).splitlines()[0][:300]}") from error
