"""The loss around the weights: 1-D curves and 2-D grids (Li et al., 2018).

Directions are random Gaussian, rescaled filter by filter so that each
filter (a convolution's output channel, a dense layer's output neuron: the
last axis of a Keras kernel) of the direction has the norm of the same
filter of w:

    d_j <- d_j * ||w_j|| / ||d_j||

Biases and other 1-D variables (normalization scales and offsets) get
d = 0. Without this, a random direction means different things for layers
of different scale, and pictures of two networks cannot be compared.

    1-D: L(w + a d),  a in [-extent, extent]
    2-D: L(w + a d1 + b d2) on a grid
    line: L(w + t (w_other - w)), t = 0 at w and 1 at the other weights
"""

from __future__ import annotations

import os

import keras
import numpy as np

from keras_sam.analysis._data import Data, check_model, float64, functions


def filter_normalized_direction(weights, seed: int = 0,
                                normalization: str = "filter") -> list:
    """A random Gaussian direction shaped like `weights`, normalized.

    Filter normalization (Li et al., 2018) rescales each filter d_f of the
    direction to the norm of the same filter of w, d_f <- d_f ||w_f|| /
    ||d_f||, so that networks of different scales compare; a filter is the
    last axis of a Keras kernel (a dense layer's neuron, a convolution's
    output channel).

    Args:
        weights: w, a list of arrays (e.g. `model.get_weights()` of the
            trainable variables).
        seed: of the Gaussian draw.
        normalization: "filter", "layer" (each variable to the norm of w's
            variable) or None (raw Gaussian). 1-D variables (biases,
            normalization parameters) get 0 under "filter" and "layer".

    Returns:
        A list of float64 arrays, one per weight.

    Raises:
        ValueError: an unknown `normalization`.

    Example:

    ```python
    w = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    d = keras_sam.analysis.filter_normalized_direction(w, seed=1)
    ```
    """
    if normalization not in ("filter", "layer", None):
        raise ValueError("`normalization` must be 'filter', 'layer' or None;"
                         f" received {normalization!r}.")
    rng = np.random.default_rng(seed)
    out = []
    for w in weights:
        w = float64(w)
        d = rng.standard_normal(w.shape)
        if normalization is None:
            pass
        elif w.ndim <= 1:
            d = np.zeros_like(w)
        elif normalization == "layer":
            d *= np.linalg.norm(w) / max(np.linalg.norm(d), 1e-30)
        else:
            axes = tuple(range(w.ndim - 1))
            w_norm = np.sqrt(np.sum(w * w, axis=axes, keepdims=True))
            d_norm = np.sqrt(np.sum(d * d, axis=axes, keepdims=True))
            d *= w_norm / np.maximum(d_norm, 1e-30)
        out.append(d)
    return out


def _weights_of(other, like) -> list:
    if isinstance(other, (str, os.PathLike)):
        other = _load_for_direction(os.fspath(other))
    if isinstance(other, keras.Model):
        other = other.trainable_variables
    elif not isinstance(other, (list, tuple)):
        raise TypeError(
            "`toward` must be a keras.Model of the same architecture, a "
            "list of its trainable weights (arrays), or the path of a "
            f"`.keras` file of such a model; received {type(other).__name__}"
            ".")
    values = [float64(v) for v in other]
    if len(values) != len(like) or any(
            v.shape != tuple(w.shape) for v, w in zip(values, like)):
        raise ValueError(
            "`toward` must have the trainable variables of `model` (the "
            "same architecture): expected shapes "
            f"{[tuple(w.shape) for w in like]}, received "
            f"{[v.shape for v in values]}.")
    return values


def _load_for_direction(path: str) -> keras.Model:
    if not path.endswith(".keras"):
        raise ValueError(
            f"`toward`='{path}': a path must name a `.keras` file (a model "
            "saved with `model.save`); for a weights file, build the model, "
            "`load_weights` it and pass the model.")
    from keras_sam.saving import load_model

    loaded = load_model(path, compile=False)
    return getattr(loaded, "model", loaded)   # a SAMModel: its wrapped model


def loss_landscape(model: keras.Model, x, y=None, *, dims: int = 1,
                   resolution: int = 21, extent: float = 1.0,
                   normalization: str | None = "filter", seed: int = 0,
                   toward=None, batch_size: int = 128, sample_weight=None,
                   steps: int | None = None) -> dict:
    """The loss of `model` around its weights, as arrays.

    Args:
        model: any compiled Keras model; the loss is its compiled loss plus
            `model.losses`, averaged over (x, y), in inference mode.
        x: the data, anything `evaluate` takes: arrays with `y`, a
            `tf.data.Dataset` or a `keras.utils.PyDataset` of batches.
        y: the targets for array `x`; None for a dataset.
        dims: 1 (a curve along one direction) or 2 (a grid over two).
        resolution: points per axis, >= 2.
        extent: the axis runs over [-extent, extent] in units of the
            direction, > 0.
        normalization: of the random directions, see
            `filter_normalized_direction`.
        seed: of the directions (the second uses seed + 1).
        toward: another model of the same architecture, the path of its
            `.keras` file, or a list of its
            trainable weights: the curve runs along the line from w (t = 0)
            to those weights (t = 1), over [-extent, 1 + extent] (1-D only).
        batch_size: examples per batch (arrays only).
        sample_weight: per-example weights of the loss (arrays only).
        steps: how many batches to use; None for all.

    Returns:
        1-D: {"alphas", "losses", "directions"}; 2-D: {"alphas", "betas",
        "losses" (resolution x resolution, losses[i, j] at alphas[i],
        betas[j]), "directions"}. "center_loss" is L(w). The weights are
        not changed.

    Raises:
        ValueError: `dims`, `resolution` or `extent` out of range; `toward`
            of another architecture, or with `dims=2`.
        TypeError: `toward` of a type it cannot read weights from.

    Example:

    ```python
    curve = keras_sam.analysis.loss_landscape(model, x, y)
    grid = keras_sam.analysis.loss_landscape(model, x, y, dims=2,
                                             resolution=25)
    line = keras_sam.analysis.loss_landscape(sgd_model, x, y,
                                             toward=sam_model)
    ```
    """
    check_model(model)
    if dims not in (1, 2):
        raise ValueError(f"`dims` must be 1 or 2; received {dims!r}.")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or \
            resolution < 2:
        raise ValueError("`resolution` must be an integer >= 2; received "
                         f"{resolution!r}.")
    if not extent > 0:
        raise ValueError(f"`extent` must be > 0; received {extent!r}.")
    fns = functions(model)
    w = fns.weights()
    w64 = [float64(t) for t in w]
    data = Data(x, y, sample_weight, batch_size, steps)

    def loss_at(offsets) -> float:
        values = [keras.ops.convert_to_tensor(a + o, t.dtype)
                  for a, o, t in zip(w64, offsets, w)]
        return float(data.mean(lambda xb, yb, swb: fns.loss(values, xb, yb,
                                                            swb)))

    center = float(data.mean(lambda xb, yb, swb: fns.loss(w, xb, yb, swb)))
    if toward is not None:
        if dims != 1:
            raise ValueError("`toward` draws a 1-D line: use dims=1.")
        d = [b - a for a, b in zip(w64, _weights_of(toward, w))]
        alphas = np.linspace(-extent, 1.0 + extent, resolution)
        losses = np.array([loss_at([a * di for di in d]) for a in alphas])
        return {"alphas": alphas, "losses": losses, "directions": [d],
                "center_loss": center}
    d1 = filter_normalized_direction(w64, seed, normalization)
    alphas = np.linspace(-extent, extent, resolution)
    if dims == 1:
        losses = np.array([loss_at([a * di for di in d1]) for a in alphas])
        return {"alphas": alphas, "losses": losses, "directions": [d1],
                "center_loss": center}
    d2 = filter_normalized_direction(w64, seed + 1, normalization)
    losses = np.array([[loss_at([a * u + b * v for u, v in zip(d1, d2)])
                        for b in alphas] for a in alphas])
    return {"alphas": alphas, "betas": alphas.copy(), "losses": losses,
            "directions": [d1, d2], "center_loss": center}
