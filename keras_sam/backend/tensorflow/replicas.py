"""TensorFlow's replicas in the SAM step: agreeing on skips and overflows,
all-reduces, the conditional update under `merge_call` strategies, and the
update that is rolled back when it leaves a non-finite weight (rho = 0).

On one replica every function here is the identity (or the plain check), so
the single-device step compiles as if they were not there.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def num_replicas() -> int:
    """The replicas in sync in the current replica context (1 outside)."""
    ctx = tf.distribute.get_replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


def needs_merge_call() -> bool:
    """Whether the strategy synchronizes updates through `merge_call`."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return False
    return not tf.__internal__.distribute.strategy_supports_no_merge_call()


def apply_if(flag, apply, grads) -> None:
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


def all_replicas(flag: tf.Tensor) -> tf.Tensor:
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


def mean_over_replicas(tensors):
    """All-reduce (MEAN) across replicas; a no-op on one replica."""
    ctx = tf.distribute.get_replica_context()
    if not tensors or ctx is None or ctx.num_replicas_in_sync == 1:
        return tensors
    return ctx.all_reduce(tf.distribute.ReduceOp.MEAN, tensors)


def sum_over_replicas(grads):
    """All-reduce (SUM) of per-replica gradients: Keras already divides each
    replica's loss by the replica count, so the sum is the full-batch
    gradient. A no-op outside a multi-replica strategy."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return grads
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)


def agree_on_overflow(grads, pass1_finite=True):
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
    ok = tf.logical_and(pass1_finite, all_replicas(all_finite(present)))
    return scale_first(grads, tf.where(ok, 1.0, float("nan")))


def scale_first(grads, factor):
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


def all_finite(grads) -> tf.Tensor:
    checks = [
        tf.reduce_all(tf.math.is_finite(
            g.values if isinstance(g, tf.IndexedSlices) else g))
        for g in grads
    ]
    return tf.reduce_all(tf.stack(checks))


def apply_or_roll_back(optimizer, grads, variables, layer_state=(),
                       layer_state_before=()) -> None:
    """`optimizer.apply(grads, variables)` as Keras's own step calls it (the
    gradient read by the update alone), then undone where it did not take:
    where it left a non-finite weight, the variables and the optimizer's own
    go back to their values before the step (a LossScaleOptimizer skips such
    a step itself, its iterations unchanged), and `layer_state` (BatchNorm
    statistics, written by the forward pass) to `layer_state_before`, on
    every replica alike. The step keeps one copy of them while it runs."""
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    own = [] if scaled else list(variables) + list(optimizer.variables)
    state = own + list(layer_state)
    before = [tf.identity(v.value) for v in own] + list(layer_state_before)
    iterations = tf.identity(optimizer.iterations.value)
    optimizer.apply(grads, variables)
    if scaled:
        took = optimizer.iterations.value > iterations
    else:
        took = all_replicas(tf.reduce_all(tf.stack(
            [tf.reduce_all(tf.math.is_finite(v.value)) for v in variables])))

    def roll_back():
        for v, old in zip(state, before):
            v.assign(old)
        return tf.constant(False)

    tf.cond(took, lambda: tf.constant(True), roll_back)
