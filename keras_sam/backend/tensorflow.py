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

    # e(w) = rho * g / ||g||_2 over the variables that have a gradient:
    # from this replica's shard, or from the whole batch when synchronized.
    ascent = [grads[i] for i in live]
    if sam.sync_perturbation:
        ascent = _sum_over_replicas(ascent)
    rows = [_rows(g, densify=sam.jit_compile is True) for g in ascent]
    values = [v for v, _ in rows]
    grad_norm = _global_norm(values)
    finite = _all_replicas(tf.math.is_finite(grad_norm))

    is_lso = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def second_pass():
        """(L(w + e), g_sam): pass 2 at w + e, from the state pass 1 saw."""
        eps, _ = sam_perturbation(values, sam.rho, grad_norm)
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
        mapping = list(zip(variables, perturbed))
        mapping += list(zip(state_variables, state_before))
        with tf.GradientTape() as tape:
            tape.watch(watched)
            with keras.StatelessScope(state_mapping=mapping,
                                      collect_losses=True):
                _, perturbed_loss = _forward(sam, x, y, sample_weight)
                scaled = optimizer.scale_loss(perturbed_loss)
        return ops.cast(perturbed_loss, "float32"), tape.gradient(scaled,
                                                                 watched)

    def apply(sam_grads):
        # w <- optimizer(w, g_sam), at the original w.
        pairs = [(g, v) for g, v in zip(sam_grads, live_variables)
                 if g is not None]
        optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])

    if _needs_merge_call():
        # The update cannot sit inside a conditional in replica context
        # (MirroredStrategy synchronizes through `merge_call`): pass 2 always
        # runs, and the skip is decided in cross-replica context.
        perturbed_loss, sam_grads = second_pass()
        if is_lso:
            apply(_agree_on_overflow(sam_grads, finite))
        else:
            _apply_if(finite, apply, sam_grads)
    else:
        def perturbed_step():
            perturbed_loss, sam_grads = second_pass()
            apply(_agree_on_overflow(sam_grads) if is_lso else sam_grads)
            return perturbed_loss

        def skipped_step():
            if is_lso:
                # Hand over a gradient marked non-finite on every replica
                # (some may have overflowed alone): the step is skipped
                # everywhere and the loss scale drops.
                apply(_scale_first([grads[i] for i in live], float("nan")))
            return tf.constant(float("nan"))

        # Pass 2 and the update share one branch, so the update compiles
        # exactly as in Keras's own train_step.
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


def _needs_merge_call() -> bool:
    """Whether the strategy synchronizes updates through `merge_call`."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return False
    return not tf.__internal__.distribute.strategy_supports_no_merge_call()


def _apply_if(flag, apply, grads) -> None:
    """`apply(grads)` on every replica when `flag` (equal on all replicas)
    holds, decided in cross-replica context as the strategy requires."""

    def cross_replica(strategy, flag, grads):
        decision = strategy.experimental_local_results(flag)[0]
        tf.cond(
            decision,
            lambda: strategy.extended.call_for_each_replica(
                apply, args=(grads,)),
            lambda: None,
        )

    tf.distribute.get_replica_context().merge_call(
        cross_replica, args=(flag, grads))


def _all_replicas(flag: tf.Tensor) -> tf.Tensor:
    """True only where `flag` is true on every replica.

    Each replica takes or skips the step together with the others: a replica
    that skipped would leave the others waiting in the gradient all-reduce.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return flag
    dissent = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                             1.0 - tf.cast(flag, tf.float32))
    return dissent < 0.5


def _sum_over_replicas(grads):
    """All-reduce (SUM) of per-replica gradients: Keras already divides each
    replica's loss by the replica count, so the sum is the full-batch
    gradient. A no-op outside a multi-replica strategy."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return grads
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)


def _agree_on_overflow(grads, pass1_finite=True):
    """Make an overflow on any replica (or in pass 1, where `pass1_finite`
    is False) visible to the LossScaleOptimizer on every replica.

    Keras's LossScaleOptimizer decides per replica (or, on strategies that
    need `merge_call`, from replica 0 alone) whether the gradient overflowed;
    an overflow on another replica would then reach the all-reduced update.
    Here a NaN is planted in the first gradient of every replica when any
    replica overflowed, so all of them skip the step together. Multiplying
    by 1.0 otherwise leaves the gradient bit for bit as it was. On one
    replica there is nothing to agree on: the gradients come back unchanged
    (only the multi-replica path passes `pass1_finite`).
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return grads
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    ok = tf.logical_and(pass1_finite, _all_replicas(_all_finite(present)))
    return _scale_first(grads, tf.where(ok, 1.0, float("nan")))


def _scale_first(grads, factor):
    """`grads` with its first gradient multiplied by the scalar `factor`."""
    grads = list(grads)
    first = next(i for i, g in enumerate(grads) if g is not None)
    g = grads[first]
    if isinstance(g, tf.IndexedSlices):
        grads[first] = tf.IndexedSlices(
            g.values * tf.cast(factor, g.values.dtype), g.indices,
            g.dense_shape)
    else:
        grads[first] = g * tf.cast(factor, g.dtype)
    return grads


def _all_finite(grads) -> tf.Tensor:
    checks = [
        tf.reduce_all(tf.math.is_finite(
            g.values if isinstance(g, tf.IndexedSlices) else g))
        for g in grads
    ]
    return tf.reduce_all(tf.stack(checks))


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
