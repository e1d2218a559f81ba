"""The SAM step's state as values (JAX and PyTorch): what a backend
supplies (`Autodiff`), the variables in the order of their values
(`Variables`), the training loss as a function of the weights
(`loss_function`), and what a step returns (`Result`). The step itself is
`keras_sam.backend.stateless`; what it writes back, `writeback`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import keras
from keras import ops

from keras_sam import objective, step
from keras_sam.perturbation import global_norm


@dataclasses.dataclass
class Autodiff:
    """What a backend supplies to the stateless step.

    value_and_grad(fn, w, *args) -> ((fn's value, fn's aux), grad wrt w)
    cond(pred, true_fn, false_fn) -> the taken branch's result
    map_shards(fn, shards, batch, per_shard) -> fn mapped over the shards:
        `batch` (x, y, sw) cut into [shards, n / shards, ...], `per_shard`
        values with the shards' axis first (None: one shard only)
    norm(tensors) -> ||tensors||_2 in float32 (a fused kernel, or
        `global_norm`)
    add(weights, grads, s) -> [w + s g] (a fused kernel, or
        `step.add_scaled`)
    decide(pred) -> pred as a Python bool, read before pass 1 is queued
        (None: branch on the traced value with `cond`)
    live: whether the variables hold the values the step starts from
        (PyTorch): a pass then maps only the trainable variables to values
        and reads the others from the variables (JAX traces values: False)
    """
    value_and_grad: Callable
    cond: Callable
    map_shards: Optional[Callable] = None
    norm: Callable = global_norm
    add: Callable = step.add_scaled
    decide: Optional[Callable] = None
    live: bool = False


@dataclasses.dataclass
class Result:
    """One step's outcome, as values."""
    loss: Any              # L_B(w), unscaled, float32
    y_pred: Any
    state: list            # s' for every non-trainable variable
    metrics: Optional[list]   # metric state after pass 1 (one chunk only)
    direction: list        # d, one per trainable variable
    finite: Any            # whether g was finite (else: skip the step)
    took_sam_step: Any     # finite and pass 2 ran
    perturbed_loss: Any    # L_B(w + e) (NaN without pass 2)
    grad_norm: Any         # ||g|| of the perturbed variables (None: untracked)
    looksam: list          # LookSAM's g_v after the step ([] without)


class Variables(NamedTuple):
    """The model's variables in the order of the values the step takes
    (Keras's JAX state), collected once per step."""
    trainable: list
    state: list        # non-trainable: layer state, LookSAM's buffers
    optimizer: list
    metrics: list


def variable_lists(sam) -> Variables:
    return Variables(list(sam.trainable_variables),
                     list(sam.non_trainable_variables),
                     list(sam.optimizer.variables),
                     list(sam.metrics_variables))


def loss_function(sam, variables: Variables, non_trainable, optimizer_values,
                  metric_values, live: bool = False, frozen=()):
    """fn(w, x, y, sw) -> (scaled loss, (loss, y_pred, s', metric state)),
    the training loss (compiled loss plus `model.losses`) at weights w from
    layer state `non_trainable`; nothing is written to any variable.
    `frozen`: (variable, value) pairs of non-trainable variables read as
    that value and left in s' as they were (a random e on LoRA's W)."""
    trainable_vars, state_vars, optimizer_vars, metric_vars = variables
    fixed = []
    if not live:   # else the variables hold these values already
        fixed = list(zip(state_vars, non_trainable))
        fixed += list(zip(optimizer_vars, optimizer_values))
        fixed += list(zip(metric_vars, metric_values))
    fixed += list(frozen)   # mapped last: these values win
    kept = {id(v) for v, _ in frozen}

    def fn(trainable, x, y, sample_weight):
        mapping = list(zip(trainable_vars, trainable)) + fixed
        y_pred, loss, scaled, scope = objective.stateless_loss(
            sam, mapping, state_vars + metric_vars, x, y, sample_weight)
        state = [s if id(v) in kept else current(scope, v, s)
                 for v, s in zip(state_vars, non_trainable)]
        metrics = [current(scope, v, m) for v, m in zip(metric_vars,
                                                         metric_values)]
        return scaled, (ops.cast(loss, "float32"), y_pred, state, metrics)

    return fn


def looksam_positions(sam, state_vars) -> list:
    """Positions of LookSAM's g_v buffers, then of ||g_v||, among the
    non-trainable variables ([] without LookSAM)."""
    if sam.looksam_state is None:
        return []
    where = {id(v): k for k, v in enumerate(state_vars)}
    own = sam.looksam_state.directions + [sam.looksam_state.norm]
    return [where[id(v)] for v in own]


def both(flag, more):
    """flag and more, where `more` may be the Python True."""
    return flag if more is True else ops.logical_and(flag, more)


def current(scope, variable, default):
    """What `scope` holds for `variable`, else `default`."""
    value = scope.get_current_value(variable)
    return default if value is None else value


def batch_size(x) -> int:
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    return int(first.shape[0])
