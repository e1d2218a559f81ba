"""m-sharpness on one device (`num_batch_splits`) on TensorFlow: the clean
pass run chunk by chunk, each chunk from the state before the step.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from keras_sam import variants
from keras_sam.step import merge_states, static_chunk_bounds
from keras_sam.backend import tensorflow as step
from keras_sam.backend import tf_gradients as gradients


def clean_pass_in_chunks(sam, x, y, sample_weight, splits, state_variables,
                          state_before):
    """Pass 1 on each of `splits` contiguous chunks of the batch, at w.

    Each chunk runs from the state before the step; the state then moves
    once: floating-point state (BatchNorm moving statistics) to the chunks'
    size-weighted mean, other state (seeds) as the first chunk left it. The
    reported loss is the size-weighted mean of the chunks' losses and the
    metrics see the chunks' predictions together.

    Returns (y_pred, loss, gradient = the chunks' weighted mean, chunks as
    [(x_c, y_c, sample_weight_c, gradients_c, size_c)]).
    """
    variables = list(sam.trainable_variables)
    n = step.static_batch_size(x)
    if n is None:
        n = step.batch_size(x)
    bounds = _chunk_bounds(n, splits)
    weights_now = [tf.identity(v.value) for v in variables]
    cut = lambda tree, a, b: keras.tree.map_structure(  # noqa: E731
        lambda t: None if t is None else t[a:b], tree)
    chunks, preds, losses, states = [], [], [], []
    for a, b in bounds:
        cx, cy = cut(x, a, b), cut(y, a, b)
        csw = None if sample_weight is None else cut(sample_weight, a, b)
        mapping = list(zip(variables, weights_now))
        mapping += list(zip(state_variables, state_before))
        with tf.GradientTape() as tape:
            tape.watch(weights_now)
            with keras.StatelessScope(state_mapping=mapping,
                                      collect_losses=True) as scope:
                y_pred, loss = step.forward(sam, cx, cy, csw)
                scaled = sam.optimizer.scale_loss(loss)
            states.append([_current(scope, v, old) for v, old in
                           zip(state_variables, state_before)])
        chunks.append((cx, cy, csw, tape.gradient(scaled, weights_now),
                       ops.cast(b - a, "float32")))
        preds.append(y_pred)
        losses.append(ops.cast(loss, "float32"))
    sizes = [c[4] for c in chunks]
    for v, value in zip(state_variables, merge_states(states, sizes)):
        v.assign(value)
    y_pred = keras.tree.map_structure(lambda *t: tf.concat(t, axis=0),
                                      *preds)
    # Per-output loss trackers, which the stateless chunks did not update.
    sam._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                      training=True)
    loss = variants.weighted_mean([[lo] for lo in losses], sizes)[0]
    live = [i for i, g in enumerate(chunks[0][3]) if g is not None]
    mean = variants.weighted_mean(
        [[gradients.densify(c[3])[i] for i in live] for c in chunks], sizes)
    grads = [None] * len(variables)
    for i, g in zip(live, mean):
        grads[i] = g
    chunks = [(cx, cy, csw, gradients.densify(g), size)
              for cx, cy, csw, g, size in chunks]
    return y_pred, loss, grads, chunks


def _current(scope, variable, default):
    value = scope.get_current_value(variable)
    return default if value is None else value


def _chunk_bounds(n, splits):
    if isinstance(n, int):   # static batch: Python bounds, XLA-friendly
        return static_chunk_bounds(n, splits)
    return variants.chunk_bounds(n, splits)
