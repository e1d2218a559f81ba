"""The settings of a `SAMModel`, checked once at construction.

Every argument is validated here, before any weight exists or changes, with
an error that names the argument, says what is wrong and what to pass.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import random
from typing import Any, Callable, Optional, Union

import keras
from keras import ops

from keras_sam import _keras_compat

Rho = Union[float, keras.optimizers.schedules.LearningRateSchedule, Callable]


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_rho(rho: Any) -> float:
    """`rho` as a float, or an error that says what is wrong with it."""
    if not _is_real(rho):
        raise TypeError(
            "`rho` must be a real number >= 0 (the radius of the "
            f"perturbation ball, e.g. rho=0.05); received {rho!r} of type "
            f"{type(rho).__name__}.")
    rho = float(rho)
    if not math.isfinite(rho) or rho < 0.0:
        raise ValueError(
            "`rho` must be a finite number >= 0 (the radius of the "
            "perturbation ball; 0.05 is the SAM paper's default, 0 trains "
            f"exactly like the base optimizer); received rho={rho}.")
    return rho


def _first_value_checked(rho: Callable) -> Callable:
    """A schedule whose value at iteration 0 is already bad fails now (later
    iterations are checked by the step and by `SAMModel.fit`)."""
    try:
        value = float(_keras_compat.to_numpy(rho(0)))
    except Exception:   # a schedule that needs a tensor: checked later
        return rho
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(
            "`rho` must give a finite value >= 0 at every iteration; the "
            f"schedule returned {value} at iteration 0. Fix the schedule "
            "(e.g. clip it with keras.ops.maximum(schedule(t), 0.0)).")
    return rho


# What TensorFlow and JAX raise when Python control flow meets a traced
# tensor (`if t < 3`, `min(t, 10)`, `float(t)`).
_TRACING_ERRORS = ("OperatorNotAllowedInGraphError", "ConcretizationTypeError",
                   "TracerBoolConversionError", "TracerIntegerConversionError")


def _is_tracing_error(err: Exception) -> bool:
    return any(t.__name__ in _TRACING_ERRORS for t in type(err).__mro__)


def _schedule_needs_ops(rho: Callable, err: Exception) -> str:
    return (
        f"The rho schedule {rho!r} cannot be evaluated inside the train step. "
        "It receives the iteration as a scalar integer tensor (symbolic while "
        "the step is compiled), and it applies Python control flow or a "
        "Python conversion to it (`if t < k`, `min(t, k)`, `float(t)`). "
        "Write it with keras.ops, e.g. `lambda t: keras.ops.where(t < 100, "
        "0.0, 0.05)`, or use a keras.optimizers.schedules."
        "LearningRateSchedule such as PiecewiseConstantDecay. No weight was "
        f"changed. ({type(err).__name__}: {str(err).splitlines()[0]})")


def _rho(rho: Any) -> Rho:
    if isinstance(rho, keras.optimizers.schedules.LearningRateSchedule):
        return _first_value_checked(rho)
    if callable(rho) and not isinstance(rho, type):
        return _first_value_checked(rho)
    if _is_real(rho):
        return validate_rho(rho)
    raise TypeError(
        "`rho` must be a real number >= 0, a keras.optimizers.schedules."
        "LearningRateSchedule, or a callable of the iteration returning the "
        f"radius; received {rho!r} of type {type(rho).__name__}.")


def _non_negative(name: str, value: Any, hint: str) -> float:
    if not _is_real(value):
        raise TypeError(f"`{name}` must be a real number >= 0 ({hint}); "
                        f"received {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"`{name}` must be a finite number >= 0 ({hint}); "
                         f"received {name}={value}.")
    return value


def _positive_int(name: str, value: Any, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer >= 1 ({hint}); "
                        f"received {value!r} of type {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1 ({hint}); "
                         f"received {name}={value}.")
    return int(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False; received {value!r}"
                        f" of type {type(value).__name__}.")
    return value


@dataclasses.dataclass(frozen=True)
class SAMOptions:
    """The validated arguments of `SAMModel` (see its docstring)."""

    rho: Rho = 0.05
    p: float = 2.0
    adaptive: bool = False
    eta: float = 0.01
    gsam_alpha: float = 0.0
    sam_every: int = 1
    looksam_alpha: Optional[float] = None
    num_batch_splits: Optional[int] = None
    perturb: Optional[Callable] = None
    sync_perturbation: bool = False
    direction: str = "gradient"
    seed: Optional[int] = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("rho", _rho(self.rho))
        if not _is_real(self.p):
            raise TypeError(
                "`p` must be a real number > 1 or float('inf') (the norm of "
                f"the perturbation ball); received {self.p!r}.")
        if math.isnan(self.p) or self.p <= 1.0:
            raise ValueError(
                "`p` must be > 1 (2 is SAM's L2 ball, float('inf') the max-"
                f"norm ball); received p={self.p}. p <= 1 has no dual norm "
                "that gives a finite perturbation.")
        set_("p", float(self.p))
        set_("adaptive", _flag("adaptive", self.adaptive))
        set_("eta", _non_negative("eta", self.eta,
                                  "ASAM's offset in T = |w| + eta, e.g. 0.01"))
        set_("gsam_alpha", _non_negative(
            "gsam_alpha", self.gsam_alpha,
            "GSAM's weight of the orthogonal ascent; 0 is plain SAM"))
        set_("sam_every", _positive_int(
            "sam_every", self.sam_every,
            "the second pass runs every sam_every steps; 1 is every step"))
        if self.looksam_alpha is not None:
            set_("looksam_alpha", _non_negative(
                "looksam_alpha", self.looksam_alpha,
                "LookSAM's weight of the stored direction, e.g. 0.7"))
            if self.sam_every < 2:
                raise ValueError(
                    "`looksam_alpha` needs `sam_every` > 1: LookSAM reuses "
                    "the direction from its last SAM step on the steps in "
                    "between, and with sam_every=1 there are none. Pass "
                    "e.g. sam_every=5, looksam_alpha=0.7.")
        if self.num_batch_splits is not None:
            set_("num_batch_splits", _positive_int(
                "num_batch_splits", self.num_batch_splits,
                "the number of chunks of the batch that each get their own "
                "e"))
        if self.perturb is not None and not callable(self.perturb):
            raise TypeError(
                "`perturb` must be None (perturb every trainable variable) "
                "or a predicate on variables, such as "
                "keras_sam.selection.NormalizationOnly() or "
                "`lambda v: 'bias' not in v.path`; received "
                f"{self.perturb!r}.")
        set_("sync_perturbation",
             _flag("sync_perturbation", self.sync_perturbation))
        if self.direction not in ("gradient", "momentum", "random"):
            raise ValueError(
                "`direction` must be 'gradient' (SAM: e from a first "
                "gradient at w), 'momentum' (Momentum-SAM: e from the "
                "optimizer's first moment) or 'random' (e drawn at random, "
                "Flat-LoRA on LoRA layers; both take one gradient per step); "
                f"received direction={self.direction!r}.")
        if self.one_point:
            name = ("Momentum-SAM" if self.momentum
                    else "a random perturbation")
            given = [f"{key}={getattr(self, key)!r}" for key, default in (
                ("gsam_alpha", 0.0), ("sam_every", 1),
                ("looksam_alpha", None), ("num_batch_splits", None))
                if getattr(self, key) != default]
            if self.random:
                given += [f"{key}={getattr(self, key)!r}" for key, default
                          in (("p", 2.0), ("adaptive", False))
                          if getattr(self, key) != default]
            if given:
                raise ValueError(
                    f"`direction={self.direction!r}` ({name}) takes one "
                    "gradient per step, at w + e, so "
                    f"{', '.join(given)} has no meaning with it: these "
                    "shape SAM's ball or its two gradients (a random e is "
                    "already scaled per filter). Drop them, or use "
                    "direction='gradient'.")
        if self.seed is not None:
            if isinstance(self.seed, bool) or \
                    not isinstance(self.seed, numbers.Integral):
                raise TypeError(
                    "`seed` must be an integer (the key of a random e's "
                    f"draws) or None; received {self.seed!r}.")
            if not self.random:
                raise ValueError(
                    "`seed` keys the draws of direction='random' and has no "
                    f"meaning with direction={self.direction!r}; drop it.")
            set_("seed", int(self.seed))
        elif self.random:   # drawn once, then saved with the config
            set_("seed", random.randint(1, 2**30))

    @property
    def splits(self) -> int:
        """The number of chunks per batch (1 without `num_batch_splits`)."""
        return self.num_batch_splits or 1

    @property
    def momentum(self) -> bool:
        """Whether e comes from the optimizer's first moment (MSAM)."""
        return self.direction == "momentum"

    @property
    def random(self) -> bool:
        """Whether e is drawn at random (keras_sam.noise)."""
        return self.direction == "random"

    @property
    def one_point(self) -> bool:
        """Whether the step's only gradient is taken at w + e (Momentum-SAM,
        a random e): no pass at w, no sharpness to log."""
        return self.direction in ("momentum", "random")

    @property
    def off(self) -> bool:
        """Whether rho is the constant 0: e = 0, so g_sam = g and the step
        is the base optimizer's, taken without pass 2 (LookSAM aside, whose
        stored direction still changes the update)."""
        return (isinstance(self.rho, float) and self.rho == 0.0
                and self.looksam_alpha is None)

    @property
    def combines_gradients(self) -> bool:
        """Whether the update is built from several gradients (GSAM, LookSAM,
        every-k, splits), which densifies sparse gradients."""
        return (self.gsam_alpha > 0.0 or self.sam_every > 1
                or self.splits > 1)

    def rho_at(self, iteration):
        """rho for the step at `iteration` (a float, or a float32 tensor
        from the schedule, which receives `iteration` as a tensor)."""
        if isinstance(self.rho, float):
            return self.rho
        try:
            value = self.rho(iteration)
        except Exception as err:
            if not _is_tracing_error(err):
                raise
            raise TypeError(_schedule_needs_ops(self.rho, err)) from err
        return ops.cast(value, "float32")

    def describe(self) -> str:
        """rho and every argument not at its default, for `summary`."""
        defaults = SAMOptions()
        return ", ".join([f"rho={self.rho!r}"] + [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name != "rho" and getattr(self, f.name) != getattr(
                defaults, f.name)])

    def get_config(self) -> dict:
        config = {f.name: getattr(self, f.name)
                  for f in dataclasses.fields(self)}
        for key in ("rho", "perturb"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, float):
                config[key] = keras.saving.serialize_keras_object(value)
        return config

    @classmethod
    def config_to_kwargs(cls, config: dict, custom_objects=None) -> dict:
        config = dict(config)
        for key in ("rho", "perturb"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects)
        return config
