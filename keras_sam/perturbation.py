"""The perturbation e of Sharpness-Aware Minimization, as pure functions.

SAM (Foret et al., 2021, arXiv:2010.01412) minimizes the worst loss in a ball
around the weights,

    L_SAM(w) = max_{||e||_2 <= rho} L(w + e),

and solves the inner maximization to first order:

    g    = grad L(w)
    e(w) = rho * g / ||g||_2          (||.||_2 is the global norm over all
                                       perturbed variables together)
    w   <- optimizer_update(w, grad L(w + e(w)))

Everything here takes and returns plain lists of tensors (dense gradients, or
the de-duplicated rows of sparse ones), so it is backend-neutral and has no
state. The training-loop plumbing lives in `keras_sam.backend`.
"""

from __future__ import annotations

from typing import Sequence

from keras import ops


def global_norm(tensors: Sequence) -> "ops.Tensor":
    """Euclidean norm of all `tensors` taken as one flat vector.

        ||g||_2 = sqrt(sum_i sum_j g_ij^2)

    Computed in float32 or wider, so float16 gradients cannot overflow the
    sum. Returns NaN or inf when any entry is non-finite; callers rely on
    that to detect a bad gradient with a single scalar check.
    """
    if not tensors:
        return ops.zeros((), dtype="float32")
    squares = []
    for t in tensors:
        dtype = "float32" if t.dtype in ("float16", "bfloat16") else t.dtype
        squares.append(ops.sum(ops.square(ops.cast(t, dtype))))
    squares = [ops.cast(s, "float32") for s in squares]
    return ops.sqrt(ops.sum(ops.stack(squares)))


def l2_scale(grad_norm, rho) -> "ops.Tensor":
    """The factor s with e = s * g for the L2 ball: s = rho / ||g||_2.

    A zero norm gives s = 0 (no perturbation) instead of a division by zero.
    A non-finite norm means a non-finite gradient: the training step then
    skips the update, so whatever e comes out never reaches a weight.
    """
    grad_norm = ops.cast(grad_norm, "float32")
    rho = ops.cast(rho, "float32")
    safe = ops.where(grad_norm > 0.0, grad_norm, ops.ones_like(grad_norm))
    return ops.where(grad_norm > 0.0, rho / safe, ops.zeros_like(grad_norm))


def sam_perturbation(grads: Sequence, rho, grad_norm=None
                     ) -> tuple[list, "ops.Tensor"]:
    """e(w) = rho * g / ||g||_2 for each gradient in `grads`.

    Args:
        grads: gradients of the loss at w, one tensor per perturbed variable
            (no `None` entries).
        rho: radius of the L2 ball, a float >= 0.
        grad_norm: ||g||_2 when the caller already has it (a backend may
            compute it with a fused kernel); `global_norm(grads)` otherwise.

    Returns:
        `(e, grad_norm)`: the perturbation of each variable, in each
        gradient's dtype, and ||g||_2 (float32). The norm is returned so that
        callers can check finiteness without another pass over the gradients.
    """
    if grad_norm is None:
        grad_norm = global_norm(grads)
    scale = l2_scale(grad_norm, rho)
    return [g * ops.cast(scale, g.dtype) for g in grads], grad_norm
