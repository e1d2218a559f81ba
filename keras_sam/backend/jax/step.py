"""The SAM training step on the JAX backend.

Keras's JAX trainer calls `train_step(state, data)` with the state as values,
(trainable, non_trainable, optimizer, metrics), inside its jitted function;
this step is a pure function of them and jits with it as one XLA program:

    pass 1   g, s' = grad L_B(w; s)             jax.value_and_grad
    e        = e(g)                             keras_sam.step
    pass 2   g_s   = grad L_B(w + e; s)         w + e is a value, not a write
    update   w, opt = optimizer.stateless_apply(opt, d, w)

(keras_sam.backend.stateless has the step; this file only says how JAX
differentiates, branches and maps over shards.) A non-finite g keeps every
value as it was (under a LossScaleOptimizer the optimizer skips the update
and lowers the scale itself).

Under `keras.distribution.DataParallel` the step sees the global batch.
`sync_perturbation=True` takes e from it (full-batch SAM); the default gives
each device the e of its own shard, as on TensorFlow: the batch is reshaped
to [devices, n / devices, ...] and both passes are `jax.vmap`-ed over the
devices' axis, which stays sharded, so each device works on its own shard.
"""

from __future__ import annotations

import jax
import keras
from keras import ops

from keras_sam.backend import functional, stateless, writeback


def _value_and_grad(fn, weights, *args):
    return jax.value_and_grad(fn, has_aux=True)(weights, *args)


def _map_shards(fn, shards, batch, per_shard=()):
    """jax.vmap of fn over the devices' shards: `batch` (x, y, sw) is
    reshaped to [shards, n / shards, ...]; `per_shard` values already have
    the shards' axis first (results of an earlier map)."""
    def split(t):
        if t is None:
            return None
        return ops.reshape(t, (shards, t.shape[0] // shards) + t.shape[1:])

    return jax.vmap(fn)(*keras.tree.map_structure(split, tuple(batch)),
                        *per_shard)


AUTODIFF = functional.Autodiff(value_and_grad=_value_and_grad,
                              cond=jax.lax.cond, map_shards=_map_shards)


def train_step(sam, state, data):
    """One SAM step of `sam` (a `keras_sam.SAMModel`): (logs, new state)."""
    trainable, non_trainable, optimizer_values, metric_values = state
    optimizer = sam.optimizer
    variables = functional.variable_lists(sam)
    result = stateless.sam_step(
        sam, variables, trainable, non_trainable, optimizer_values,
        metric_values, data, AUTODIFF, shards=_data_parallel_shards(data))
    direction = result.direction
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # A non-finite gradient makes the optimizer skip and lower the scale.
        direction = writeback.mark_non_finite(direction, result.finite)
        new_trainable, new_optimizer = optimizer.stateless_apply(
            optimizer_values, direction, trainable)
    else:
        # w <- optimizer(w, d) at the original w; a non-finite g keeps w.
        new_trainable, new_optimizer = optimizer.stateless_apply(
            optimizer_values, direction, trainable)
        new_trainable = _where(result.finite, new_trainable, trainable)
        new_optimizer = _where(result.finite, new_optimizer,
                               optimizer_values)
    # A skipped step keeps the layer state too (BatchNorm statistics).
    new_non_trainable = _where(result.finite, writeback.new_state(
        sam, variables, result, non_trainable), non_trainable)
    logs, metric_values = writeback.logs(sam, variables, result, trainable,
                                         non_trainable, metric_values, data)
    return logs, (new_trainable, new_non_trainable, new_optimizer,
                  metric_values)


def _where(keep_new, new, old) -> list:
    return [ops.where(keep_new, n, o) for n, o in zip(new, old)]


def _data_parallel_shards(data) -> int:
    """How many devices share the batch under the active distribution."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    axis = getattr(distribution, "batch_dim_name", None)
    if axis is None or axis not in mesh.axis_names:
        return 1
    return int(mesh.shape[mesh.axis_names.index(axis)])
