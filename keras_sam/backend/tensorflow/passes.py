"""The passes of the TensorFlow step: pass 1 on the whole batch, or chunk
by chunk for m-sharpness on one device (`num_batch_splits`), each chunk from
the state before the step; a stateless pass at given weights (pass 2, the
chunks); the one pass at w + e of Momentum-SAM and of a random e.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from keras_sam import momentum, noise, objective, step, variants
from keras_sam.step import merge_states, static_chunk_bounds
from keras_sam.backend.tensorflow import gradients


def clean_pass(sam, x, y, sample_weight):
    """Pass 1 on the whole batch, with its state updates: (y_pred, loss,
    scaled gradients of every trainable variable)."""
    with tf.GradientTape() as tape:
        y_pred, loss = forward(sam, x, y, sample_weight)
        scaled_loss = sam.optimizer.scale_loss(loss)
    return y_pred, loss, tape.gradient(scaled_loss, sam.trainable_variables)


def forward(sam, x, y, sample_weight):
    """y_pred and the training loss (compiled loss plus `model.losses`)."""
    y_pred = sam(x, training=True)
    loss = sam._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )
    return y_pred, loss


def static_batch_size(x):
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    return first.shape[0]


def batch_size(x):
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    return tf.shape(first)[0]


def stateless_pass(sam, weights, state_variables, state_values, x, y,
                   sample_weight, watch=None):
    """Forward and backward with every trainable variable read as
    `weights` and `state_variables` as `state_values`; no variable is
    written. Returns (y_pred, loss, scaled-loss gradients of the weights at
    `watch` (default all), the values `state_variables` were left at)."""
    variables = list(sam.trainable_variables)
    watched = list(weights) if watch is None else [weights[i] for i in watch]
    mapping = list(zip(variables, weights))
    mapping += list(zip(state_variables, state_values))
    with tf.GradientTape() as tape:
        tape.watch(watched)
        y_pred, loss, scaled, scope = objective.stateless_loss(
            sam, mapping, list(state_variables) + list(sam.metrics_variables),
            x, y, sample_weight)
        state = [_current(scope, v, old)
                 for v, old in zip(state_variables, state_values)]
    return y_pred, loss, tape.gradient(scaled, watched), state


def momentum_pass(sam, x, y, sample_weight, rho, perturbed_mask,
                  state_variables):
    """Momentum-SAM's only pass, at w + e with e = -rho u / ||u|| from the
    optimizer's first moment u (keras_sam.momentum). Returns (y_pred,
    loss, gradients at w + e)."""
    variables = list(sam.trainable_variables)
    optimizer = sam.optimizer
    if not optimizer.built:
        optimizer.build(variables)
    positions, sign = momentum.moment_positions(optimizer, variables)
    ids = [i for i, m in enumerate(perturbed_mask) if m]
    moments = [optimizer.variables[positions[i]].value for i in ids]
    weights = [tf.identity(v.value) for v in variables]
    # e(w) = perturbation(m, -sign rho) = -rho u / ||u|| (u = sign m).
    climbed = step.climb(weights, moments, ids, -sign * rho, sam.options,
                         grad_norm=gradients.fused_norm(moments))
    return _one_point_pass(sam, climbed, {}, state_variables, x, y,
                           sample_weight)


def random_pass(sam, x, y, sample_weight, rho, perturbed_mask,
                state_variables):
    """The only pass of a random e (keras_sam.noise), at w + e; a LoRA
    layer's frozen W is read as W + e. Returns (y_pred, loss, gradients
    at w + e)."""
    variables = list(sam.trainable_variables)
    targets = noise.targets(sam.model, variables, perturbed_mask)
    eps = noise.draw(targets, lambda v: v.value, rho, sam.noise_seed,
                     sam.optimizer.iterations)
    weights, frozen = noise.shift(
        targets, eps, variables, [tf.identity(v.value) for v in variables],
        lambda v: v.value)
    frozen = {id(v): value for v, value in frozen}
    return _one_point_pass(sam, weights, frozen, state_variables, x, y,
                           sample_weight)


def _one_point_pass(sam, weights, frozen, state_variables, x, y,
                    sample_weight):
    """The step's only pass, at `weights`, with the non-trainable variables
    whose ids `frozen` maps read as its values. Layer state and metrics move
    as a clean pass's would; the frozen variables keep their values."""
    written = list(state_variables) + list(sam.metrics_variables)
    y_pred, loss, grads, values = stateless_pass(
        sam, weights, written,
        [frozen.get(id(v), v.value) for v in written], x, y, sample_weight)
    for v, value in zip(written, values):
        if id(v) not in frozen:
            v.assign(value)
    return y_pred, loss, grads


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
    n = static_batch_size(x)
    if n is None:
        n = batch_size(x)
    bounds = _chunk_bounds(n, splits)
    weights_now = [tf.identity(v.value) for v in variables]
    cut = lambda tree, a, b: keras.tree.map_structure(  # noqa: E731
        lambda t: None if t is None else t[a:b], tree)
    chunks, preds, losses, states = [], [], [], []
    for a, b in bounds:
        cx, cy = cut(x, a, b), cut(y, a, b)
        csw = None if sample_weight is None else cut(sample_weight, a, b)
        y_pred, loss, grads, state = stateless_pass(
            sam, weights_now, state_variables, state_before, cx, cy, csw)
        states.append(state)
        chunks.append((cx, cy, csw, grads, ops.cast(b - a, "float32")))
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
