"""What the SAM variants change in the update, as pure functions.

SAM applies g_s = grad L(w + e) where the base optimizer applies g =
grad L(w). The variants here decide what is applied instead, from g, g_s and
(for LookSAM) one stored direction; the perturbation e itself is in
`keras_sam.perturbation`. Lists of tensors in, lists of tensors out, with
`keras.ops` only, so every backend reuses them.

GSAM (Zhuang et al., 2022): descend on g_s, and also ascend along the part
of the clean gradient orthogonal to it, which lowers the surrogate gap
L(w + e) - L(w) without moving the minimization direction:

    g_perp = g - (<g, g_s> / ||g_s||^2) g_s
    d      = g_s - alpha * g_perp

LookSAM (Liu et al., 2022): the second pass only every k steps. On those
steps keep the part of g_s orthogonal to g, the direction that SAM adds:

    g_v = g_s - (<g, g_s> / ||g||^2) g

and on the k - 1 steps between, apply the clean gradient plus that
direction, rescaled to the current gradient's size:

    d = g + alpha * (||g|| / ||g_v||) * g_v

Every k steps without LookSAM (`sam_every`): d = g_s on SAM steps, d = g on
the others.

m-sharpness on one device (`num_batch_splits`): the batch is cut into m
contiguous chunks, each gets its own e at the same w, and the applied
gradient is the chunk-size-weighted mean of the chunks' g_s (the plain mean
for equal chunks; the full-batch gradient when rho = 0).
"""

from __future__ import annotations

from typing import Sequence

from keras import ops

from keras_sam.perturbation import global_dot, global_norm

__all__ = ["gsam_direction", "looksam_component", "looksam_direction"]


def _safe_ratio(num, den):
    """num / den, and 0 where den is 0."""
    ok = den > 0.0
    return ops.where(ok, num / ops.where(ok, den, ops.ones_like(den)),
                     ops.zeros_like(num))


def _axpy(a, x: Sequence, y: Sequence) -> list:
    """a * x + y, element-wise over matching lists (a a float32 scalar)."""
    return [ops.cast(a, yi.dtype) * ops.cast(xi, yi.dtype) + yi
            for xi, yi in zip(x, y)]


def gsam_direction(grads: Sequence, sam_grads: Sequence, alpha) -> list:
    """GSAM's update direction, d = g_s - alpha * g_perp.

        g_perp = g - (<g, g_s> / ||g_s||^2) g_s     the part of g
                                                    orthogonal to g_s

    Equivalently (1 + alpha c) g_s - alpha g with c = <g, g_s> / ||g_s||^2.

    Args:
        grads: g, the gradients at w.
        sam_grads: g_s, the gradients at w + e, matching `grads`.
        alpha: GSAM's alpha, >= 0; 0 returns g_s.

    Returns:
        d, one tensor per gradient, for the optimizer to apply at w.

    Example:

    ```python
    d = keras_sam.variants.gsam_direction(g, g_s, alpha=0.2)
    optimizer.apply(d, model.trainable_variables)
    ```
    """
    c = _safe_ratio(global_dot(grads, sam_grads),
                    ops.square(global_norm(sam_grads)))
    alpha = ops.cast(alpha, "float32")
    scaled = [ops.cast(1.0 + alpha * c, s.dtype) * s for s in sam_grads]
    return _axpy(-alpha, grads, scaled)


def looksam_component(grads: Sequence, sam_grads: Sequence) -> list:
    """LookSAM's stored direction g_v = g_s - (<g, g_s> / ||g||^2) g.

    g_v is the part of g_s orthogonal to g, kept from a SAM step and reused
    by `looksam_direction` on the steps in between.

    Args:
        grads: g, the gradients at w.
        sam_grads: g_s, the gradients at w + e, matching `grads`.

    Returns:
        g_v, one tensor per gradient (0 where g is zero).

    Example:

    ```python
    g_v = keras_sam.variants.looksam_component(g, g_s)   # on a SAM step
    ```
    """
    c = _safe_ratio(global_dot(grads, sam_grads),
                    ops.square(global_norm(grads)))
    return _axpy(-c, grads, list(sam_grads))


def looksam_direction(grads: Sequence, g_v: Sequence, alpha,
                      grad_norm=None, direction_norm=None) -> list:
    """LookSAM's direction between SAM steps, d = g + alpha (||g|| / ||g_v||) g_v.

    Args:
        grads: g, the gradients at w on this (one-pass) step.
        g_v: the direction kept by `looksam_component` on the last SAM step.
        alpha: LookSAM's alpha, >= 0.
        grad_norm: ||g||, when the caller already has it (saves a pass over
            the weights); None computes it.
        direction_norm: ||g_v||, likewise.

    Returns:
        d, one tensor per gradient; g itself when g_v is zero.

    Example:

    ```python
    d = keras_sam.variants.looksam_direction(g, g_v, alpha=0.7)
    ```
    """
    grad_norm = global_norm(grads) if grad_norm is None else grad_norm
    direction_norm = (global_norm(g_v) if direction_norm is None
                      else direction_norm)
    ratio = _safe_ratio(ops.cast(grad_norm, "float32"),
                        ops.cast(direction_norm, "float32"))
    return _axpy(ops.cast(alpha, "float32") * ratio, g_v, list(grads))


def is_sam_step(iteration, sam_every: int):
    """Whether the step at 0-based `iteration` runs the second pass:
    iteration % sam_every == 0."""
    return ops.equal(ops.mod(iteration, sam_every), 0)


def chunk_bounds(batch_size, num_splits: int) -> list:
    """[(start, stop)] of `num_splits` contiguous chunks of a batch, as equal
    as possible (sizes differ by at most one, larger chunks first). A batch
    smaller than `num_splits` leaves the last chunks empty."""
    n = ops.cast(batch_size, "int32")
    base, extra = n // num_splits, n % num_splits
    bounds, start = [], ops.zeros((), "int32")
    for c in range(num_splits):
        size = base + ops.cast(c < extra, "int32")
        bounds.append((start, start + size))
        start = start + size
    return bounds


def weighted_mean(lists: Sequence[Sequence], weights: Sequence) -> list:
    """sum_c w_c * lists[c] / sum_c w_c, element-wise; an empty chunk
    (w_c = 0) contributes nothing, even where its values are NaN."""
    total = ops.sum(ops.stack([ops.cast(w, "float32") for w in weights]))
    out = None
    for values, w in zip(lists, weights):
        share = _safe_ratio(ops.cast(w, "float32"), total)
        term = [ops.where(share > 0.0, ops.cast(share, v.dtype) * v,
                          ops.zeros_like(v)) for v in values]
        out = term if out is None else [a + b for a, b in zip(out, term)]
    return out
