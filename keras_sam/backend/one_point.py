"""The one pass of Momentum-SAM and of a random e (JAX and PyTorch): the
step's only gradient, at w + e, with e from the optimizer's first moment
(keras_sam.momentum) or drawn (keras_sam.noise); its layer state moves as
a clean pass's would:

    g, s' = grad L_B(w + e; s)        d = g
"""

from __future__ import annotations

import keras
from keras import ops

from keras_sam import momentum, noise, step
from keras_sam.backend.functional import Autodiff, Result, Variables, both


def momentum_climb(sam, variables: Variables, trainable, optimizer_values,
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


def random_climb(sam, variables: Variables, trainable, non_trainable,
                 iteration, rho) -> tuple:
    """A random e's w + e, and the (LoRA W, W + e) pairs of the frozen
    weights it moves (keras_sam.noise)."""
    targets = noise.targets(sam.model, variables.trainable,
                            sam.perturbed_mask(variables.trainable))
    value = {id(v): t for v, t in zip(variables.trainable, trainable)}
    value.update({id(v): s for v, s in zip(variables.state, non_trainable)})
    eps = noise.draw(targets, lambda v: value[id(v)], rho, sam.noise_seed,
                     iteration)
    return noise.shift(targets, eps, variables.trainable, trainable,
                       lambda v: value[id(v)])


def one_point_step(loss_at, climbed, data, autodiff: Autodiff,
                   rho) -> Result:
    """The step's only pass, at w + e (Momentum-SAM, a random e); its state
    moves as a clean pass's would."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    (_, (loss, y_pred, state, metrics)), grads = autodiff.value_and_grad(
        loss_at, climbed, x, y, sample_weight)
    finite = both(ops.isfinite(autodiff.norm(list(grads))),
                  step.rho_is_valid(rho))
    return Result(loss=loss, y_pred=y_pred, state=state, metrics=metrics,
                  direction=list(grads), finite=finite,
                  took_sam_step=ops.logical_not(ops.ones_like(finite)),
                  perturbed_loss=loss, grad_norm=None, looksam=[])
