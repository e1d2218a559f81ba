"""The SAM step as a function of the model's state (JAX and PyTorch).

JAX differentiates functions and PyTorch differentiates tensors; neither
needs a variable to move for a gradient at w + e. The step takes the state
as values (weights w, layer state s such as BatchNorm statistics and seeds,
optimizer and metric state) and returns the update's direction and the new
state; the backend file applies it (`optimizer.stateless_apply` on JAX,
`optimizer.apply` on PyTorch):

    pass 1   g, s' = grad L_B(w; s)        s' replaces s: state moves once
    e        = e(g)                        keras_sam.step.climb
    pass 2   g_s   = grad L_B(w + e; s)    from s; what it writes is dropped
    d        = g_s, or a variant's d       keras_sam.step.combine

Momentum-SAM takes e from the optimizer's first moment instead of pass 1,
and a random e (keras_sam.noise) draws it; their one pass at w + e moves
the state: g, s' = grad L_B(w + e; s).

Both passes run `Model.__call__` and `compute_loss` inside a
`keras.StatelessScope` that maps every variable to a value, so both see the
same seeds (the same dropout masks) and the same `model.losses`.

A backend passes an `Autodiff`: how to take (value, aux), gradient of a
function of the weights, how to branch on a traced boolean, and (JAX) how
to map a function over the devices' shards of the batch, for per-device e
(m-sharpness) under `keras.distribution.DataParallel`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import keras
from keras import ops

from keras_sam import momentum, noise, objective, step, variants
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
        state = [s if id(v) in kept else _current(scope, v, s)
                 for v, s in zip(state_vars, non_trainable)]
        metrics = [_current(scope, v, m) for v, m in zip(metric_vars,
                                                         metric_values)]
        return scaled, (ops.cast(loss, "float32"), y_pred, state, metrics)

    return fn


def sam_step(sam, variables: Variables, trainable, non_trainable,
             optimizer_values, metric_values, data, autodiff: Autodiff,
             shards: int = 1) -> Result:
    """The SAM step's direction and new state for one batch (see module)."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    options, optimizer = sam.options, sam.optimizer
    trainable_vars, state_vars, optimizer_vars, _ = variables
    step.check_trainable(sam, trainable_vars)
    ascent_ids = [i for i, m in enumerate(sam.perturbed_mask(trainable_vars))
                  if m]
    other_ids = [i for i in range(len(trainable_vars)) if i not in ascent_ids]
    with keras.StatelessScope(state_mapping=[] if autodiff.live else list(
            zip(optimizer_vars, optimizer_values))):
        iteration = ops.convert_to_tensor(optimizer.iterations)
        rho = options.rho_at(iteration)
        # 1 / the loss scale, read here where the optimizer's variables
        # hold the step's values.
        inverse_scale = step.unscaled(ops.ones((), "float32"), optimizer)
    sam_now = (False if options.off else True if options.sam_every == 1
               else variants.is_sam_step(iteration, options.sam_every))
    if not isinstance(sam_now, bool) and autodiff.decide is not None:
        sam_now = autodiff.decide(sam_now)
    loss_at = loss_function(sam, variables, non_trainable, optimizer_values,
                            metric_values, live=autodiff.live)
    if options.momentum and not options.off:
        return _one_point_step(loss_at, _momentum_climb(
            sam, variables, trainable, optimizer_values, autodiff, rho,
            ascent_ids), data, autodiff, rho)
    if options.random and not options.off:
        climbed, frozen = _random_climb(sam, variables, trainable,
                                        non_trainable, iteration, rho)
        loss_at = loss_function(sam, variables, non_trainable,
                                optimizer_values, metric_values,
                                live=autodiff.live, frozen=frozen)
        return _one_point_step(loss_at, climbed, data, autodiff, rho)
    own = _looksam_positions(sam, state_vars)
    stored = [non_trainable[k] for k in own[:-1]]
    stored_norm = non_trainable[own[-1]] if own else None
    if options.sync_perturbation or autodiff.map_shards is None:
        shards = 1
    batch = _batch_size(x) // shards
    bounds = step.static_chunk_bounds(batch, options.splits)
    sizes = [float(b - a) for a, b in bounds]

    def chunks(bx, by, bsw):
        cut = lambda t, a, b: keras.tree.map_structure(  # noqa: E731
            lambda v: None if v is None else v[a:b], t)
        return [(cut(bx, a, b), cut(by, a, b),
                 None if bsw is None else cut(bsw, a, b)) for a, b in bounds]

    def clean_block(bx, by, bsw):
        """Pass 1 chunk by chunk on one shard, each chunk from s."""
        losses, preds, states, metrics, grads = [], [], [], [], []
        for cx, cy, csw in chunks(bx, by, bsw):
            (_, (loss, y_pred, s, m)), g = autodiff.value_and_grad(
                loss_at, trainable, cx, cy, csw)
            losses.append(loss), preds.append(y_pred), states.append(s)
            metrics.append(m), grads.append(list(g))
        # ||g_c|| of the perturbed variables, reused by e; every entry of
        # g must be finite.
        norms = [autodiff.norm([g[i] for i in ascent_ids]) for g in grads]
        finite = ops.all(ops.stack(
            [ops.isfinite(n) for n in norms]
            + ([step.norm_is_finite([g[i] for i in other_ids])
                for g in grads] if other_ids else [])))
        if len(grads) > 1:
            clean = variants.weighted_mean(grads, sizes)
            loss = variants.weighted_mean([[lo] for lo in losses], sizes)[0]
        else:
            clean, loss = grads[0], losses[0]
        return dict(
            loss=loss,
            y_pred=_concat(preds), state=step.merge_states(states, sizes),
            metrics=metrics[0], grads=grads, clean=clean, finite=finite,
            norms=norms)

    def sam_block(bx, by, bsw, grads, clean, norms):
        """Pass 2 per chunk at w + e_c, from s; the update's direction."""
        results = []
        for (cx, cy, csw), g, norm in zip(chunks(bx, by, bsw), grads, norms):
            climbed = step.climb(trainable, [g[i] for i in ascent_ids],
                                 ascent_ids, rho, options, grad_norm=norm,
                                 add=autodiff.add)
            (_, (perturbed_loss, _, _, _)), g_s = autodiff.value_and_grad(
                loss_at, climbed, cx, cy, csw)
            results.append((perturbed_loss, list(g_s)))
        return step.combine(options, clean, results, sizes)

    def one_pass_block(clean):
        direction = step.one_pass(options, clean, stored, stored_norm)
        no_loss = ops.zeros((), "float32") + float("nan")   # no pass 2
        return no_loss, direction, list(stored)

    if shards == 1:
        first = clean_block(x, y, sample_weight)
        on_shards = lambda fn, batch, more: fn(*batch, *more)  # noqa: E731
    else:
        def on_shards(fn, batch, per_shard):
            return keras.tree.map_structure(
                lambda t: ops.mean(t, axis=0),
                autodiff.map_shards(fn, shards, batch, per_shard))
        first = autodiff.map_shards(clean_block, shards,
                                    (x, y, sample_weight))
        first = dict(
            loss=ops.mean(first["loss"]),
            y_pred=keras.tree.map_structure(
                lambda t: ops.reshape(t, (-1,) + tuple(t.shape[2:])),
                first["y_pred"]),
            state=step.merge_states(
                [[s[k] for s in first["state"]] for k in range(shards)],
                [1.0] * shards),
            metrics=None, grads=first["grads"], clean=first["clean"],
            finite=ops.all(first["finite"]), norms=first["norms"])
    if shards > 1 or len(bounds) > 1:
        first["metrics"] = None   # the per-output trackers see the batch

    def sam_branch():
        return on_shards(sam_block, (x, y, sample_weight),
                         (first["grads"], first["clean"], first["norms"]))

    def one_pass_branch():
        return on_shards(one_pass_block, (), (first["clean"],))

    finite = _and(first["finite"], step.rho_is_valid(rho))
    if sam_now is True:
        perturbed_loss, direction, new_looksam = sam_branch()
        took_sam_step = finite
    elif sam_now is False:   # decided on the host: a step without pass 2
        perturbed_loss, direction, new_looksam = one_pass_branch()
        took_sam_step = ops.logical_not(ops.ones_like(finite))
    else:   # every-k and LookSAM: pass 2 on SAM steps only
        perturbed_loss, direction, new_looksam = autodiff.cond(
            sam_now, sam_branch, one_pass_branch)
        took_sam_step = ops.logical_and(finite, sam_now)
    return Result(loss=first["loss"], y_pred=first["y_pred"],
                  state=first["state"], metrics=first["metrics"],
                  direction=list(direction), finite=finite,
                  took_sam_step=took_sam_step,
                  perturbed_loss=perturbed_loss,
                  grad_norm=None if sam._gradient_norm_tracker is None
                  else inverse_scale * ops.mean(ops.stack(
                      [ops.mean(n) for n in first["norms"]])),
                  looksam=list(new_looksam))


def _momentum_climb(sam, variables: Variables, trainable, optimizer_values,
                    autodiff: Autodiff, rho, ascent_ids) -> list:
    """Momentum-SAM's w + e: e = -rho u / ||u|| from the optimizer's first
    moment u = sign m (keras_sam.momentum)."""
    positions, sign = momentum.moment_positions(sam.optimizer,
                                                variables.trainable)
    moments = [optimizer_values[positions[i]] for i in ascent_ids]
    # e = perturbation(m, -sign rho): the ball's formula with u for g.
    return step.climb(trainable, moments, ascent_ids, -sign * rho,
                      sam.options, grad_norm=autodiff.norm(moments),
                      add=autodiff.add)


def _random_climb(sam, variables: Variables, trainable, non_trainable,
                  iteration, rho) -> tuple:
    """A random e's w + e, and the (LoRA W, W + e) pairs of the frozen
    weights it moves (keras_sam.noise)."""
    targets = noise.targets(sam.model, variables.trainable,
                            sam.perturbed_mask(variables.trainable))
    value = {id(v): t for v, t in zip(variables.trainable, trainable)}
    value.update({id(v): s for v, s in zip(variables.state, non_trainable)})
    eps = noise.draw(targets, lambda v: value[id(v)], rho, sam.noise_seed,
                     iteration)
    where = {id(v): i for i, v in enumerate(variables.trainable)}
    climbed, frozen = list(trainable), []
    for t, e in zip(targets, eps):
        if id(t.variable) in where:
            i = where[id(t.variable)]
            climbed[i] = climbed[i] + e
        else:
            frozen.append((t.variable, value[id(t.variable)] + e))
    return climbed, frozen


def _one_point_step(loss_at, climbed, data, autodiff: Autodiff,
                    rho) -> Result:
    """The step's only pass, at w + e (Momentum-SAM, a random e); its state
    moves as a clean pass's would."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    (_, (loss, y_pred, state, metrics)), grads = autodiff.value_and_grad(
        loss_at, climbed, x, y, sample_weight)
    finite = _and(ops.isfinite(autodiff.norm(list(grads))),
                  step.rho_is_valid(rho))
    return Result(loss=loss, y_pred=y_pred, state=state, metrics=metrics,
                  direction=list(grads), finite=finite,
                  took_sam_step=ops.logical_not(ops.ones_like(finite)),
                  perturbed_loss=loss, grad_norm=None, looksam=[])


def new_state(sam, variables: Variables, result: Result,
              non_trainable) -> list:
    """The non-trainable values after the step: s' from pass 1, and
    LookSAM's g_v and ||g_v|| where a SAM step was applied."""
    state = list(result.state)
    own = _looksam_positions(sam, variables.state)
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
    n = _batch_size(x)   # a Python int, as Keras's own step passes it
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
    return logs, [_current(scope, v, m) for v, m in zip(metric_vars,
                                                        metric_values)]


def _looksam_positions(sam, state_vars) -> list:
    """Positions of LookSAM's g_v buffers, then of ||g_v||, among the
    non-trainable variables ([] without LookSAM)."""
    if sam.looksam_state is None:
        return []
    where = {id(v): k for k, v in enumerate(state_vars)}
    own = sam.looksam_state.directions + [sam.looksam_state.norm]
    return [where[id(v)] for v in own]


def _and(flag, more):
    return flag if more is True else ops.logical_and(flag, more)


def _current(scope, variable, default):
    value = scope.get_current_value(variable)
    return default if value is None else value


def _concat(parts):
    if len(parts) == 1:
        return parts[0]
    return keras.tree.map_structure(lambda *t: ops.concatenate(t, axis=0),
                                    *parts)


def _batch_size(x) -> int:
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    return int(first.shape[0])
