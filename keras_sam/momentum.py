"""Momentum-SAM: the perturbation taken from the optimizer's first moment.

Momentum-SAM (Becker, Altrock and Risse, 2024) replaces SAM's first gradient
by the optimizer's momentum, so a step costs one gradient. With u the first
moment in the gradient's sign,

    e = -rho * u / ||u||_2          (e = 0 while u = 0: the first step)
    g = grad L_B(w + e)             the step's only gradient
    w <- optimizer_update(w, g)     at w

The descent direction -u points where the weights are heading; stepping
against it lands on the side of the valley they come from, and the gradient
there pulls towards flatter ground. The ball's shape is SAM's: with
`adaptive` or `p` the same formula as `keras_sam.perturbation` with u in
place of g (ASAM: e = -rho T^2 u / ||T u||).

Keras keeps u in two signs: SGD stores m <- mu m - lr g, so u = -m; Adam,
AdamW, Adamax, Nadam and Lion store m <- b1 m + (1 - b1) g, so u = m.
Since e is odd in u, e = perturbation(m, -sign * rho) with u = sign * m:
no tensor is negated. This module only says where each optimizer keeps m
and its sign; the backends read it and climb as for SAM.
"""

from __future__ import annotations

import keras

# Optimizer class -> (attribute holding m, one variable per trainable
# variable; sign with u = sign * m).
_MOMENTS = {
    keras.optimizers.SGD: ("momentums", -1.0),
    keras.optimizers.Adam: ("_momentums", 1.0),   # AdamW is an Adam
    keras.optimizers.Adamax: ("_m", 1.0),
    keras.optimizers.Nadam: ("_momentums", 1.0),
    keras.optimizers.Lion: ("_momentums", 1.0),
}
SUPPORTED = "SGD(momentum > 0), Adam, AdamW, Adamax, Nadam or Lion"


def _inner(optimizer):
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def _entry(optimizer):
    inner = _inner(optimizer)
    for cls, entry in _MOMENTS.items():
        if isinstance(inner, cls):
            if cls is keras.optimizers.SGD and not inner.momentum:
                return None
            return entry
    return None


def check_optimizer(optimizer) -> None:
    """A clear error when `optimizer` keeps no first moment to perturb
    along (`direction="momentum"`)."""
    if _entry(optimizer) is not None:
        return
    inner = _inner(optimizer)
    what = type(inner).__name__
    if isinstance(inner, keras.optimizers.SGD):
        what = "SGD without momentum"
    raise ValueError(
        f"`direction='momentum'` (Momentum-SAM) perturbs along the "
        f"optimizer's first moment, and {what} keeps none. Compile with "
        f"{SUPPORTED}, e.g. keras.optimizers.SGD(0.05, momentum=0.9), or use "
        "direction='gradient' (SAM).")


def default_rho_advice(optimizer) -> str | None:
    """What to say when Momentum-SAM keeps SAM's default rho (0.05) with SGD
    + momentum, where that rho changes nothing; else None.

    On MNIST-1D (benchmarks/msam_rho.py, benchmarks/generalization.py)
    Momentum-SAM at rho = 0.05 trained like the base optimizer and helped
    from rho = 1 on. Adam-like optimizers get no advice: with Adam a large
    rho held a Transformer at chance (benchmarks/transformer_case.py
    --study), so no single rho suits them.
    """
    inner = _inner(optimizer)
    if _entry(optimizer) is None or not isinstance(inner,
                                                   keras.optimizers.SGD):
        return None
    return (
        "Momentum-SAM (direction='momentum') with rho left at its default, "
        "0.05, and SGD with momentum: at that rho it trains like plain SGD "
        "(on the MNIST-1D benchmarks it helped from rho = 1 to 3; "
        "benchmarks/msam_rho.py). Pass rho explicitly, e.g. "
        "SAMModel(model, rho=1.0, direction='momentum'), and search it on a "
        "validation split.")


def moment_positions(optimizer, trainable_variables) -> tuple[list, float]:
    """(positions in `optimizer.variables` of m for each trainable
    variable, sign with u = sign * m). The optimizer must be built."""
    check_optimizer(optimizer)
    attribute, sign = _entry(optimizer)
    inner = _inner(optimizer)
    moments = getattr(inner, attribute)
    where = {id(v): k for k, v in enumerate(optimizer.variables)}
    return [where[id(moments[inner._get_variable_index(v)])]
            for v in trainable_variables], sign
