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

import keras
from keras import ops

from keras_sam import step, variants
from keras_sam.backend import one_point
from keras_sam.backend.functional import (Autodiff, Result, Variables,
                                          batch_size, both, loss_function,
                                          looksam_positions)


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
        return one_point.one_point_step(loss_at, one_point.momentum_climb(
            sam, variables, trainable, optimizer_values, autodiff, rho,
            ascent_ids), data, autodiff, rho)
    if options.random and not options.off:
        climbed, frozen = one_point.random_climb(sam, variables, trainable,
                                        non_trainable, iteration, rho)
        loss_at = loss_function(sam, variables, non_trainable,
                                optimizer_values, metric_values,
                                live=autodiff.live, frozen=frozen)
        return one_point.one_point_step(loss_at, climbed, data, autodiff,
                                        rho)
    own = looksam_positions(sam, state_vars)
    stored = [non_trainable[k] for k in own[:-1]]
    stored_norm = non_trainable[own[-1]] if own else None
    if options.sync_perturbation or autodiff.map_shards is None:
        shards = 1
    batch = batch_size(x) // shards
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

    finite = both(first["finite"], step.rho_is_valid(rho))
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


def _concat(parts):
    if len(parts) == 1:
        return parts[0]
    return keras.tree.map_structure(lambda *t: ops.concatenate(t, axis=0),
                                    *parts)
