"""What every backend's SAM step shares, in `keras.ops`.

A step on a batch cut into chunks c (one chunk unless `num_batch_splits` or
per-device e), each of size n_c:

    g_c    = grad L_c(w)                    pass 1, per chunk (backend)
    e_c    = e(g_c)                         `ascend`: keras_sam.perturbation
    g_s,c  = grad L_c(w + e_c)              pass 2, per chunk (backend)
    g, g_s = sum_c n_c g_c / sum_c n_c, the same for g_s,c
    d      = g_s, GSAM's or LookSAM's d     `combine`: keras_sam.variants

The backend files take gradients and keep state; what is computed from the
gradients is here, once.
"""

from __future__ import annotations

from typing import Sequence

from keras import ops

from keras_sam import variants
from keras_sam.options import SAMOptions
from keras_sam.perturbation import (global_norm, l2_scale, perturbation,
                                    scalar_like)


def check_trainable(sam, variables: Sequence) -> None:
    """A clear error when there is nothing to perturb or train."""
    if not variables:
        raise ValueError(
            f"SAMModel '{sam.name}' has no trainable variables, so there is "
            "nothing to perturb or train. Unfreeze some layers of the wrapped "
            "model (`layer.trainable = True`) before calling `fit`."
        )


def add_scaled(weights: Sequence, grads: Sequence, scale) -> list:
    """[w + s g] for matching lists and a scalar tensor s (keras.ops; a
    backend may pass a fused version to `climb`)."""
    return [w + ops.cast(g * ops.cast(scale, g.dtype), w.dtype)
            for w, g in zip(weights, grads)]


def climb(weights: Sequence, grads: Sequence, ascent_ids: Sequence[int],
          rho, options: SAMOptions, grad_norm=None,
          add=add_scaled) -> list:
    """w + e(w): the weights pass 2 sees, one tensor per variable.

    `grads[k]` is the gradient of `weights[ascent_ids[k]]`; the other
    weights stay at w. `grad_norm`: ||grads||_2 when already taken; `add`:
    how to form [w + s g] (`add_scaled`, or a backend's fused kernel).
    """
    ascent = [weights[i] for i in ascent_ids]
    if options.p == 2 and not options.adaptive:
        # The default ball: e = s g with s = rho / ||g||_2, added in one go.
        if grad_norm is None:
            grad_norm = global_norm(grads)
        moved = add(ascent, grads, l2_scale(grad_norm, rho))
    else:
        eps = perturbation(grads, rho, p=options.p,
                           weights=ascent if options.adaptive else None,
                           eta=options.eta, grad_norm=grad_norm)
        moved = [w + ops.cast(e, w.dtype) for w, e in zip(ascent, eps)]
    climbed = list(weights)
    for i, w in zip(ascent_ids, moved):
        climbed[i] = w   # climb to w + e(w)
    return climbed


def combine(options: SAMOptions, clean: Sequence, results: Sequence,
            sizes: Sequence) -> tuple:
    """(L(w + e), the update's direction d, LookSAM's new g_v or []).

    `results` holds (L_c(w + e_c), g_s,c) per chunk, `sizes` the chunks'
    sizes n_c; `clean` is the batch's gradient g at w.
    """
    if len(results) == 1:
        perturbed_loss, sam_grads = results[0]
    else:
        perturbed_loss = variants.weighted_mean(
            [[loss] for loss, _ in results], sizes)[0]
        sam_grads = variants.weighted_mean([g for _, g in results], sizes)
    direction = sam_grads
    if options.gsam_alpha > 0.0:
        direction = variants.gsam_direction(clean, sam_grads,
                                            options.gsam_alpha)
    new_directions = []
    if options.looksam_alpha is not None:
        new_directions = variants.looksam_component(clean, sam_grads)
    return perturbed_loss, direction, new_directions


def one_pass(options: SAMOptions, clean: Sequence, stored: Sequence,
             stored_norm, grad_norm=None) -> list:
    """The direction of a step without pass 2: g, or LookSAM's
    g + alpha (||g|| / ||g_v||) g_v from the stored g_v."""
    if options.looksam_alpha is None:
        return list(clean)
    return variants.looksam_direction(clean, stored, options.looksam_alpha,
                                      grad_norm=grad_norm,
                                      direction_norm=stored_norm)


def track_sharpness(tracker, sharpness, took_sam_step, batch_size) -> None:
    """Add sharpness = L(w + e) - L(w) of a batch to the `sharpness` mean,
    weighted by the batch size, on steps that ran pass 2 and applied it
    (other steps add nothing). No scalar crosses from the host. No tracker
    (Momentum-SAM): nothing to track."""
    if tracker is None:
        return
    counted = ops.logical_and(took_sam_step, ops.isfinite(sharpness))
    tracker.update_state(
        ops.where(counted, sharpness, ops.zeros_like(sharpness)),
        sample_weight=ops.cast(counted, "float32")
        * scalar_like(batch_size, sharpness))


def unscaled(grad_norm, optimizer):
    """||g|| of the loss from that of the loss a LossScaleOptimizer scaled
    (read where the optimizer's variables hold the step's values)."""
    scale = getattr(optimizer, "dynamic_scale", None)
    if scale is None:
        return grad_norm
    return grad_norm / ops.cast(scale, grad_norm.dtype)


def track_gradient_norm(tracker, grad_norm, finite) -> None:
    """Add ||g||, the clean gradient's norm that e was taken from, to the
    `tracker`'s mean, one count per applied step; keras_sam.watch reads it
    after the epoch. No tracker (rho = 0, Momentum-SAM): nothing to
    track."""
    if tracker is None:
        return
    counted = ops.logical_and(finite, ops.isfinite(grad_norm))
    tracker.update_state(
        ops.where(counted, grad_norm, ops.zeros_like(grad_norm)),
        sample_weight=ops.cast(counted, "float32"))


def merge_states(states: Sequence[Sequence], sizes: Sequence) -> list:
    """The layer state after a step whose clean pass ran chunk by chunk,
    each chunk from the same state: floating-point state (BatchNorm moving
    statistics) moves to the chunks' size-weighted mean, other state
    (seeds) as the first chunk left it."""
    if len(states) == 1:
        return list(states[0])
    merged = []
    for k, first in enumerate(states[0]):
        if "float" in str(ops.dtype(first)):
            merged.append(variants.weighted_mean(
                [[s[k]] for s in states], sizes)[0])
        else:
            merged.append(first)
    return merged


def static_chunk_bounds(n: int, splits: int) -> list:
    """[(start, stop)] of `splits` contiguous chunks of a batch of static
    size n, sizes differing by at most one; chunks of a batch smaller than
    `splits` that would be empty are left out."""
    base, extra = divmod(n, splits)
    bounds, start = [], 0
    for c in range(splits):
        stop = start + base + (1 if c < extra else 0)
        if stop > start:
            bounds.append((start, stop))
        start = stop
    return bounds


def rho_is_valid(rho):
    """True for a Python rho (checked at construction); for a schedule's
    value, a boolean tensor: finite and >= 0. A step with a bad rho is
    skipped like one with a non-finite gradient."""
    if isinstance(rho, (int, float)):
        return True
    return ops.logical_and(ops.isfinite(rho), rho >= 0.0)


def norm_is_finite(grads: Sequence):
    """Whether every entry of `grads` is finite (one fused norm)."""
    return ops.isfinite(global_norm(grads))
