"""What the JAX and PyTorch steps write back after `stateless.sam_step`:
the layer state (s' from pass 1, LookSAM's g_v where a SAM step was
applied), the direction a LossScaleOptimizer must skip, and the logs
(loss, compiled metrics, sharpness) as the wrapped model would report them.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_sam import step
from keras_sam.backend.functional import (Result, Variables, batch_size,
                                          current, looksam_positions)
from keras_sam.perturbation import global_norm


def new_state(sam, variables: Variables, result: Result,
              non_trainable) -> list:
    """The non-trainable values after the step: s' from pass 1, and
    LookSAM's g_v and ||g_v|| where a SAM step was applied."""
    state = list(result.state)
    own = looksam_positions(sam, variables.state)
    if own:
        took = result.took_sam_step
        for k, g_v in zip(own[:-1], result.looksam):
            state[k] = ops.where(took, ops.cast(g_v, state[k].dtype),
                                 non_trainable[k])
        state[own[-1]] = ops.where(took, global_norm(result.looksam),
                                   non_trainable[own[-1]])
    return state


def mark_non_finite(direction, finite) -> list:
    """The direction for a LossScaleOptimizer: unchanged when `finite`, else
    with a NaN in its first tensor, so that the optimizer skips the step and
    lowers the loss scale (on every device alike)."""
    first = direction[0]
    return [ops.where(finite, first, first * float("nan"))] + \
        list(direction[1:])


def logs(sam, variables: Variables, result: Result, trainable,
         non_trainable, metric_values, data, live: bool = False) -> tuple:
    """(logs, metric state): loss, compiled metrics and sharpness, as the
    wrapped model would report them."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    metric_vars = variables.metrics
    if result.metrics is not None:
        metric_values = result.metrics
    mapping = list(zip(metric_vars, metric_values))
    if not live or result.metrics is None:   # compute_loss reads weights
        mapping += list(zip(variables.trainable, trainable))
        mapping += list(zip(variables.state, non_trainable))
    n = batch_size(x)   # a Python int, as Keras's own step passes it
    with keras.StatelessScope(state_mapping=mapping,
                              collect_losses=True) as scope:
        if result.metrics is None:   # per-output loss trackers
            sam._compute_loss(x=x, y=y, y_pred=result.y_pred,
                              sample_weight=sample_weight, training=True)
        sam._loss_tracker.update_state(result.loss, sample_weight=n)
        # sharpness = L(w + e) - L(w), first order, from the two passes.
        step.track_sharpness(sam._sharpness_tracker,
                             result.perturbed_loss - result.loss,
                             result.took_sam_step, n)
        step.track_gradient_norm(sam._gradient_norm_tracker,
                                 result.grad_norm, result.finite)
        logs = sam.compute_metrics(x, y, result.y_pred, sample_weight)
    return logs, [current(scope, v, m) for v, m in zip(metric_vars,
                                                        metric_values)]
