"""What the analysis tools share: checking the model and the data, and
averaging per-batch results over a whole dataset in float64."""

from __future__ import annotations

import keras
import numpy as np

from keras_sam import _keras_compat, objective


def check_model(model) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a compiled keras.Model; received "
                        f"{type(model).__name__}.")
    if not objective.has_loss(model):
        raise ValueError(
            "`model` must be compiled with a loss (or define its own "
            "`compute_loss`): the analysis measures the model's loss. Call "
            "`model.compile(loss=...)` first.")
    if not model.trainable_variables:
        raise ValueError(f"'{model.name}' has no trainable variables.")


def functions(model):
    """The backend's loss / gradient / Hessian-vector product of `model`.

    One instance per model, kept on it while its trainable variables and
    compiled loss stay the same: TensorFlow then traces its functions once,
    not at every measurement (a `SharpnessMonitor` measures every epoch).
    """
    key = (tuple(id(v) for v in model.trainable_variables),
           id(model.loss), id(getattr(model, "_compile_loss", None)))
    cached = model.__dict__.get("_keras_sam_functions")
    if cached is not None and cached[0] == key:
        return cached[1]
    made = _new_functions(model)
    # Not a tracked attribute: Keras neither saves nor serializes it.
    object.__setattr__(model, "_keras_sam_functions", (key, made))
    return made


def _new_functions(model):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from keras_sam.backend.tensorflow.analysis import ModelFunctions
    elif backend == "jax":
        from keras_sam.backend.jax.analysis import ModelFunctions
    elif backend == "torch":
        from keras_sam.backend.torch.analysis import ModelFunctions
    else:
        raise NotImplementedError(
            "keras_sam.analysis runs on the TensorFlow, JAX and PyTorch "
            f"backends; the active backend is '{backend}'.")
    return ModelFunctions(model)


class Data:
    """Re-iterable (x, y, sample_weight) batches of anything `evaluate`
    takes, so that a dataset larger than memory is streamed on each pass."""

    def __init__(self, x, y=None, sample_weight=None, batch_size=128,
                 steps=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) \
                or batch_size < 1:
            raise ValueError("`batch_size` must be a positive int; received "
                             f"{batch_size!r}.")
        self.args = (x, y, sample_weight, batch_size)
        self.steps = steps

    def __iter__(self):
        for i, batch in enumerate(_keras_compat.batches(*self.args)):
            if self.steps is not None and i >= self.steps:
                return
            yield batch

    def mean(self, per_batch):
        """Example-weighted mean over all batches of `per_batch(x, y, sw)`
        (a scalar or a list of tensors), in float64."""
        total, count = None, 0
        for xb, yb, swb in self:
            n = int(keras.ops.shape(keras.tree.flatten(xb)[0])[0])
            if n == 0:
                continue
            if yb is None:
                raise ValueError(
                    "No labels: pass `y` with array inputs, or data that "
                    "yields (x, y) batches.")
            out = keras.tree.map_structure(lambda t: float64(t) * n,
                                           per_batch(xb, yb, swb))
            total = out if total is None else keras.tree.map_structure(
                np.add, total, out)
            count += n
        if count == 0:
            raise ValueError(
                "The data holds no examples: the analysis needs at least "
                "one batch.")
        return keras.tree.map_structure(lambda t: t / count, total)


def float64(x) -> np.ndarray:
    """A tensor, variable or array as a float64 NumPy array."""
    return np.asarray(_keras_compat.to_numpy(x), np.float64)


def flatten(arrays) -> np.ndarray:
    return np.concatenate([np.ravel(float64(a)) for a in arrays])


def unflatten(vector, like) -> list:
    out, start = [], 0
    for w in like:
        size = int(np.prod(w.shape))
        out.append(vector[start:start + size].reshape(tuple(w.shape)))
        start += size
    return out
