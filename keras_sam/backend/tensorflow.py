"""The SAM training step on the TensorFlow backend.

One step, for a batch B:

    pass 1   g = grad L_B(w)              clean weights; state (BatchNorm moving
                                          statistics, seeds) updates here, once
    e        = rho * g / ||g||_2          keras_sam.perturbation
    pass 2   g_sam = grad L_B(w + e)      evaluated statelessly: w is never written
    update   w <- optimizer(w, g_sam)     at the original w

Pass 2 runs inside a `keras.StatelessScope` that maps every trainable variable
to the tensor w + e and every non-trainable variable to its value before
pass 1. The variables themselves are never assigned, so there is nothing to
restore: w comes back bit for bit, replicas cannot drift apart, and whatever
pass 2 writes (BatchNorm statistics, metric states, seed states) is dropped.
Pass 2 sees the same seeds as pass 1, so both passes draw the same dropout
masks: pass 2 evaluates the very same stochastic loss at w + e.

A non-finite ||g|| (NaN or inf anywhere in g) skips pass 2 and the update.
Pass 2 and the update share one branch of that conditional, so the update's
arithmetic compiles exactly as in Keras's own `train_step` (rho = 0 is the
base optimizer bit for bit).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from keras_sam import _keras_compat
from keras_sam.perturbation import sam_perturbation


def train_step(sam, data):
    """One SAM step of `sam` (a `keras_sam.SAMModel`) on one batch."""
    _keras_compat.ensure_built(sam, data)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    optimizer = sam.optimizer
    variables = list(sam.trainable_variables)
    if not variables:
        raise ValueError(
            f"SAMModel '{sam.name}' has no trainable variables, so there is "
            "nothing to perturb or train. Unfreeze some layers of the wrapped "
            "model (`layer.trainable = True`) before calling `fit`."
        )
    state_variables = list(sam.non_trainable_variables)
    # State before pass 1 (seeds, moving statistics): pass 2 starts from it.
    state_before = [tf.identity(v.value) for v in state_variables]

    # Pass 1 at w: the loss, metrics and state updates that the logs report.
    with tf.GradientTape() as tape:
        y_pred, loss = _forward(sam, x, y, sample_weight)
        sam._loss_tracker.update_state(
            _keras_compat.unscale_loss_for_distribution(loss),
            sample_weight=_batch_size(x),
        )
        scaled_loss = optimizer.scale_loss(loss)
    grads = tape.gradient(scaled_loss, variables)
    live = [i for i, g in enumerate(grads) if g is not None]
    live_variables = [variables[i] for i in live]

    # e(w) = rho * g / ||g||_2 over the variables that have a gradient.
    rows = [_rows(grads[i], densify=sam.jit_compile is True) for i in live]
    values = [v for v, _ in rows]
    eps, grad_norm = sam_perturbation(values, sam.rho, _global_norm(values))
    finite = _all_replicas(tf.math.is_finite(grad_norm))

    def perturbed_step():
        # Climb to w + e(w): one tensor per variable; the variables keep w.
        perturbed = [tf.identity(v.value) for v in variables]
        for i, (_, indices), e in zip(live, rows, eps):
            w = perturbed[i]
            e = ops.cast(e, w.dtype)
            if indices is None:
                perturbed[i] = w + e
            else:
                perturbed[i] = tf.tensor_scatter_nd_add(w, indices[:, None], e)
        watched = [perturbed[i] for i in live]

        # Pass 2 at w + e, from the state pass 1 started from.
        mapping = list(zip(variables, perturbed))
        mapping += list(zip(state_variables, state_before))
        with tf.GradientTape() as tape:
            tape.watch(watched)
            with keras.StatelessScope(state_mapping=mapping,
                                      collect_losses=True):
                _, perturbed_loss = _forward(sam, x, y, sample_weight)
                scaled = optimizer.scale_loss(perturbed_loss)
        sam_grads = tape.gradient(scaled, watched)

        # w <- optimizer(w, g_sam), at the original w.
        pairs = [(g, v) for g, v in zip(sam_grads, live_variables)
                 if g is not None]
        optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
        return ops.cast(perturbed_loss, "float32")

    def skipped_step():
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            # Hand the overflowed gradient over: the loss scale drops.
            optimizer.apply([grads[i] for i in live], live_variables)
        return tf.constant(float("nan"))

    perturbed_loss = tf.cond(finite, perturbed_step, skipped_step)

    # sharpness = L(w + e) - L(w), first order, from the two passes.
    sharpness = _keras_compat.unscale_loss_for_distribution(
        perturbed_loss - ops.cast(loss, "float32")
    )
    counted = tf.logical_and(finite, tf.math.is_finite(sharpness))
    sam._sharpness_tracker.update_state(
        tf.where(counted, sharpness, 0.0),
        sample_weight=tf.where(counted, ops.cast(_batch_size(x), "float32"),
                               0.0),
    )
    return sam.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _forward(sam, x, y, sample_weight):
    """y_pred and the training loss (compiled loss plus `model.losses`)."""
    y_pred = sam(x, training=True)
    loss = sam._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )
    return y_pred, loss


def _global_norm(tensors) -> tf.Tensor:
    """||g||_2 with TensorFlow's fused sum of squares (`tf.nn.l2_loss`, no
    temporary g^2), accumulated in float32."""
    if not tensors:
        return tf.zeros((), tf.float32)
    halves = [tf.nn.l2_loss(t if t.dtype == tf.float32
                            else tf.cast(t, tf.float32)) for t in tensors]
    return tf.sqrt(2.0 * tf.add_n(halves))


def _all_replicas(flag: tf.Tensor) -> tf.Tensor:
    """True only where `flag` is true on every replica.

    Each replica takes or skips the step together with the others: a replica
    that skipped would leave the others waiting in the gradient all-reduce.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return flag
    votes = ctx.all_reduce(tf.distribute.ReduceOp.MIN,
                           tf.cast(flag, tf.float32))
    return votes > 0.5


def _rows(grad, densify: bool):
    """(values, indices) of a gradient: indices is None for a dense one.

    A sparse gradient (`tf.IndexedSlices`, from an Embedding) may list a row
    several times; its rows are summed per unique index, so that its norm and
    its perturbation are those of the dense gradient without building the
    dense table. Under XLA (no dynamic shapes) it is densified instead.
    """
    if not isinstance(grad, tf.IndexedSlices):
        return grad, None
    if densify:
        return tf.convert_to_tensor(grad), None
    unique, positions = tf.unique(grad.indices)
    values = tf.math.unsorted_segment_sum(
        grad.values, positions, tf.shape(unique)[0]
    )
    return values, unique


def _batch_size(x):
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    return tf.shape(first)[0]
