"""A random perturbation e, drawn instead of climbed: `direction="random"`.

SAM climbs to the worst point of a ball around w and needs a first gradient
to find it. A random perturbation takes the step's only gradient at a random
point near w, at the base optimizer's cost; over many steps it minimizes the
smoothed loss E_z L(w + e(z)), which is low only where the minimum is wide
(LPF-SGD, Bisla et al., AISTATS 2022; random weight perturbation, Li et al.,
2022):

    z   ~ N(0, I)                         a new draw every step
    e_f = rho * rms(w_f) * z_f            per filter f of each perturbed tensor
    w  <- optimizer_update(w, grad L(w + e))

A filter is a slice w[..., j] along a tensor's last axis (one output unit of
a Dense or convolution kernel); a tensor of rank <= 1 is one filter.
rms(w_f) = ||w_f||_2 / sqrt(n_f), so ||e_f|| is about rho ||w_f||: rho is a
radius relative to each filter's size, as ASAM's ball is relative to |w|.

Flat-LoRA (Li et al., ICML 2025): a layer with LoRA (Keras's `enable_lora`)
computes with the merged weight W' = W + (alpha / r) A B, and the noise goes
to W', with the rms of W''s filters, while the adapters A and B get none.
Perturbing A and B (what SAM does with `perturb` on a LoRA model) moves W'
only inside their rank-r span; noise on W' explores every direction of the
weights the layer uses, at LoRA's cost: the frozen W is read as W + e for the
pass, and the gradient still reaches only A, B and the other trainable
weights.

The draw is keyed by (seed, iteration): the same on every replica, a new one
each step, the same again after a `.keras` file is loaded (the seed is in
the config; `SAMModel(..., seed=...)`, else drawn from Python's `random`,
which `keras.utils.set_random_seed` seeds). The backend steps call
`targets` once per step and `draw` for the values they add.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import keras
from keras import ops

from keras_sam.perturbation import scalar_like


class Target(NamedTuple):
    """A tensor that gets noise: `variable` is where e is added (a trainable
    variable, or a LoRA layer's frozen W); `adapters` is (A, B, alpha / r)
    when the noise's scale comes from the merged W + (alpha / r) A B."""
    variable: keras.Variable
    adapters: Optional[tuple] = None


class Seed:
    """The key of the step's draw, (seed, iteration), read through a Keras
    `SeedGenerator` whose state is mapped to the key for each draw (its own
    value is never used or saved). Not tracked by the model."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.generator = keras.random.SeedGenerator(self.seed)

    def normal(self, n: int, iteration) -> "ops.Tensor":
        """n standard normal float32 draws for the step at `iteration`."""
        state = self.generator.state
        key = ops.stack([ops.convert_to_tensor(self.seed, state.dtype),
                         ops.cast(iteration, state.dtype)])
        with keras.StatelessScope(state_mapping=[(state, key)]):
            return keras.random.normal((n,), dtype="float32",
                                       seed=self.generator)


def filter_rms(w) -> "ops.Tensor":
    """rms of each filter of `w` (float32): over every axis but the last,
    kept for broadcasting; one value for a tensor of rank <= 1.

        rms(w_f) = sqrt(mean_i w_f,i^2)
    """
    w = ops.cast(w, "float32")
    if len(w.shape) <= 1:
        return ops.sqrt(ops.mean(ops.square(w)))
    return ops.sqrt(ops.mean(ops.square(w), axis=tuple(range(len(w.shape) - 1)),
                             keepdims=True))


def merged(w, adapters=None, a=None, b=None):
    """The weight a layer computes with: w, or w + (alpha / r) A B."""
    if adapters is None:
        return w
    return w + ops.cast(adapters[2], w.dtype) * ops.matmul(a, b)


def random_perturbation(weights: Sequence, rho, noise) -> list:
    """e = rho * rms(w_f) * z_f for each tensor of `weights` (the merged
    ones for LoRA layers), with z taken in order from the flat `noise`."""
    eps, start = [], 0
    for w in weights:
        n = math.prod(w.shape)
        z = ops.reshape(noise[start:start + n], w.shape)
        start += n
        rms = filter_rms(w)
        eps.append(ops.cast(scalar_like(rho, rms) * rms * z, w.dtype))
    return eps


def draw(targets: Sequence[Target], value_of, rho, seed: Seed,
         iteration) -> list:
    """e for each target at the step `iteration`; `value_of(variable)` gives
    a variable's value in the step (the variable itself on TensorFlow, the
    traced value on JAX)."""
    weights = []
    for t in targets:
        w = value_of(t.variable)
        if t.adapters is not None:
            a, b, _ = t.adapters
            w = merged(w, t.adapters, value_of(a), value_of(b))
        weights.append(w)
    total = sum(math.prod(w.shape) for w in weights)
    return random_perturbation(weights, rho, seed.normal(total, iteration))


def shift(targets: Sequence[Target], eps: Sequence, variables: Sequence,
          weights: Sequence, value_of) -> tuple:
    """Where each e goes: (`weights`, the values of `variables`, with e
    added to those that are targets; [(frozen variable, W + e)] for the
    others, the LoRA layers' W)."""
    where = {id(v): i for i, v in enumerate(variables)}
    moved, frozen = list(weights), []
    for t, e in zip(targets, eps):
        i = where.get(id(t.variable))
        if i is None:
            frozen.append((t.variable, value_of(t.variable) + e))
        else:
            moved[i] = moved[i] + e
    return moved, frozen


def lora_layers(model: keras.Model) -> dict:
    """{id(A) and id(B): (the layer's W, A, B, alpha / r)} for the layers of
    `model` with Keras's LoRA enabled."""
    found = {}
    for layer in model._flatten_layers(include_self=False):
        if not getattr(layer, "lora_enabled", False):
            continue
        base = getattr(layer, "_kernel", None)
        if base is None:
            base = getattr(layer, "_embeddings", None)
        a, b = layer.lora_kernel_a, layer.lora_kernel_b
        entry = (base, a, b, layer.lora_alpha / layer.lora_rank)
        found[id(a)] = found[id(b)] = entry
    return found


def targets(model: keras.Model, variables: Sequence,
            mask: Sequence[bool]) -> list:
    """What gets noise: each perturbed trainable variable, except LoRA
    adapters, whose layer's merged weight gets it instead (once per layer,
    through its frozen W)."""
    lora = lora_layers(model)
    chosen, seen = [], set()
    for v, perturbed in zip(variables, mask):
        if not perturbed:
            continue
        if id(v) not in lora:
            chosen.append(Target(v))
            continue
        base, a, b, scale = lora[id(v)]
        if id(base) not in seen:
            seen.add(id(base))
            chosen.append(Target(base, (a, b, scale)))
    return chosen
