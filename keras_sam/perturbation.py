"""The perturbation e of Sharpness-Aware Minimization, as pure functions.

SAM (Foret et al., 2021, arXiv:2010.01412) minimizes the worst loss in a ball
around the weights,

    L_SAM(w) = max_{||e||_p <= rho} L(w + e),

and solves the inner maximization to first order. With g = grad L(w) and
q = p / (p - 1) the dual exponent (1/p + 1/q = 1):

    e(w) = rho * sign(g) * |g|^(q-1) / ||g||_q^(q-1)
           p = 2:    e = rho * g / ||g||_2        (the default)
           p = inf:  e = rho * sign(g)
    w   <- optimizer_update(w, grad L(w + e(w)))

ASAM (Kwon et al., 2021) takes the same step in a ball scaled per weight by
T = |w| + eta (element-wise), which makes it invariant to rescaling weights:
solve in the coordinates e' = e / T with gradient T g, then map back:

    e(w) = rho * T * sign(Tg) * |Tg|^(q-1) / ||Tg||_q^(q-1)
           p = 2:    e = rho * T^2 g / ||Tg||_2

Norms are global: over all perturbed variables together, not per layer.
Everything here takes and returns plain lists of tensors (dense gradients, or
the de-duplicated rows of sparse ones, with the matching rows of w), so it is
backend-neutral and has no state. The training-loop plumbing lives in
`keras_sam.backend`; the variants that change the update (GSAM, LookSAM)
live in `keras_sam.variants`.
"""

from __future__ import annotations

import math
from typing import Sequence

from keras import ops


def _wide(t):
    """`t` in float32 or wider, so that sums of float16 squares cannot
    overflow."""
    return ops.cast(t, "float32") if t.dtype in ("float16", "bfloat16") else t


def scalar_like(value, like) -> "ops.Tensor":
    """`value` as a float32 scalar tensor beside `like` (a float32 scalar).

    A Python number is multiplied into ones on the device instead of being
    copied from the host, which on a GPU would wait for the queued work.
    """
    if isinstance(value, (int, float)):
        return ops.ones_like(like) * value
    return ops.cast(value, "float32")


def global_norm(tensors: Sequence, p: float = 2.0) -> "ops.Tensor":
    """The p-norm of all `tensors` taken as one flat vector (float32).

        ||g||_p = (sum_i sum_j |g_ij|^p)^(1/p),   ||g||_inf = max |g_ij|

    Computed in float32 or wider.

    Args:
        tensors: a list of tensors (gradients, weights), any shapes.
        p: the norm, >= 1, or `float("inf")` for the largest magnitude.

    Returns:
        A float32 scalar tensor; 0 for an empty list, NaN or inf when any
        entry is non-finite (one scalar check finds a bad gradient).

    Example:

    ```python
    grads = [keras.ops.ones((2, 2)), keras.ops.ones((4,))]
    keras_sam.global_norm(grads)            # sqrt(8) = 2.828
    keras_sam.global_norm(grads, p=float("inf"))   # 1.0
    ```
    """
    if not tensors:
        return ops.zeros((), dtype="float32")
    if p == 2:
        parts = [ops.sum(ops.square(_wide(t))) for t in tensors]
        return ops.sqrt(ops.sum(ops.stack([ops.cast(s, "float32")
                                           for s in parts])))
    if math.isinf(p):
        parts = [ops.max(ops.abs(_wide(t))) for t in tensors]
        return ops.max(ops.stack([ops.cast(s, "float32") for s in parts]))
    parts = [ops.sum(ops.power(ops.abs(_wide(t)), p)) for t in tensors]
    total = ops.sum(ops.stack([ops.cast(s, "float32") for s in parts]))
    return ops.power(total, 1.0 / p)


def global_dot(a: Sequence, b: Sequence) -> "ops.Tensor":
    """<a, b> = sum_i sum_j a_ij b_ij over matching lists, in float32."""
    if not a:
        return ops.zeros((), dtype="float32")
    parts = [ops.cast(ops.sum(_wide(x) * ops.cast(_wide(y), _wide(x).dtype)),
                      "float32") for x, y in zip(a, b)]
    return ops.sum(ops.stack(parts))


def l2_scale(grad_norm, rho) -> "ops.Tensor":
    """The factor s with e = s * g for the L2 ball: s = rho / ||g||_2.

    A zero norm gives s = 0 (no perturbation) instead of a division by zero.
    A non-finite norm means a non-finite gradient: the training step then
    skips the update, so whatever e comes out never reaches a weight.
    """
    grad_norm = ops.cast(grad_norm, "float32")
    rho = scalar_like(rho, grad_norm)
    safe = ops.where(grad_norm > 0.0, grad_norm, ops.ones_like(grad_norm))
    return ops.where(grad_norm > 0.0, rho / safe, ops.zeros_like(grad_norm))


def sam_perturbation(grads: Sequence, rho, grad_norm=None
                     ) -> tuple[list, "ops.Tensor"]:
    """e(w) = rho * g / ||g||_2 for each gradient in `grads`.

    Args:
        grads: gradients of the loss at w, one tensor per perturbed variable
            (no `None` entries).
        rho: radius of the L2 ball, a float >= 0 (or a scalar tensor).
        grad_norm: ||g||_2 when the caller already has it (a backend may
            compute it with a fused kernel); `global_norm(grads)` otherwise.

    Returns:
        `(e, grad_norm)`: the perturbation of each variable, in each
        gradient's dtype, and ||g||_2 (float32). The norm is returned so that
        callers can check finiteness without another pass over the gradients.

    Example:

    In a custom training loop, the ascent step of SAM:

    ```python
    e, grad_norm = keras_sam.sam_perturbation(grads, rho=0.05)
    for variable, delta in zip(model.trainable_variables, e):
        variable.assign_add(delta)        # climb to w + e
    ```
    """
    if grad_norm is None:
        grad_norm = global_norm(grads)
    scale = l2_scale(grad_norm, rho)
    return [g * ops.cast(scale, g.dtype) for g in grads], grad_norm


def adaptive_scale(weights: Sequence, eta: float) -> list:
    """ASAM's T = |w| + eta, element-wise, in float32 or wider."""
    return [ops.abs(_wide(w)) + eta for w in weights]


def perturbation(grads: Sequence, rho, *, p: float = 2.0,
                 weights: Sequence | None = None, eta: float = 0.01,
                 grad_norm=None) -> list:
    """e(w) for the p-ball, scaled by T = |w| + eta when `weights` are given.

        e = rho * T * sign(Tg) * |Tg|^(q-1) / ||Tg||_q^(q-1),  q = p/(p-1)

    Args:
        grads: the gradients g at w, one tensor per perturbed variable.
        rho: radius of the ball (a float or a scalar tensor).
        p: the ball's norm, > 1; `float("inf")` for the max-norm ball.
        weights: w, matching `grads`, for ASAM's scale T; None for T = 1.
        eta: ASAM's offset in T = |w| + eta.
        grad_norm: ||g||_2, only used for p = 2 without `weights`, when the
            caller already has it.

    Returns:
        e, one tensor per gradient in the gradient's dtype. A zero gradient
        gives e = 0.

    Example:

    ```python
    w = model.trainable_variables
    e = keras_sam.perturbation(grads, 0.5, weights=w)      # ASAM, p = 2
    e_inf = keras_sam.perturbation(grads, 0.05, p=float("inf"))   # rho sign(g)
    ```
    """
    if weights is None and p == 2:
        return sam_perturbation(grads, rho, grad_norm)[0]
    scales = None if weights is None else adaptive_scale(weights, eta)
    tg = [_wide(g) if t is None else _wide(g) * ops.cast(t, _wide(g).dtype)
          for g, t in zip(grads, scales or [None] * len(grads))]
    if p == 2:
        # rho * T * (Tg) / ||Tg||_2
        s = l2_scale(global_norm(tg), rho)
        e = [d * ops.cast(s, d.dtype) for d in tg]
    elif math.isinf(p):
        # rho * T * sign(Tg); T > 0, so sign(Tg) = sign(g).
        rho = ops.cast(rho, "float32")
        e = [ops.sign(d) * ops.cast(rho, d.dtype) for d in tg]
    else:
        # |Tg|^(q-1) / ||Tg||_q^(q-1), computed on a = |Tg| / max|Tg| so
        # that large q cannot overflow or underflow: the ratio is invariant
        # to that rescaling.
        q = p / (p - 1.0)
        top = global_norm(tg, float("inf"))
        inv_top = ops.where(top > 0.0, 1.0 / ops.where(top > 0.0, top, 1.0),
                            0.0)
        a = [ops.abs(d) * ops.cast(inv_top, d.dtype) for d in tg]
        powered = [ops.power(x, q - 1.0) for x in a]
        denom = ops.power(global_norm(a, q), q - 1.0)
        s = l2_scale(denom, rho)   # rho / denom, 0 for a zero gradient
        e = [ops.sign(d) * x * ops.cast(s, x.dtype)
             for d, x in zip(tg, powered)]
    if scales is not None:
        e = [d * ops.cast(t, d.dtype) for d, t in zip(e, scales)]
    return [ops.cast(d, g.dtype) for d, g in zip(e, grads)]
