"""`SAMModel`: Sharpness-Aware Minimization for any Keras model."""

from __future__ import annotations

from typing import Callable, Optional

import keras

from keras_sam import _keras_compat, hub, noise, objective, watch
from keras_sam import backend as sam_backend
from keras_sam.compiling import Compiling
from keras_sam.hub import DataEntry
from keras_sam.objective import OwnObjective
from keras_sam.options import Rho, SAMOptions
from keras_sam.saving import Saving
from keras_sam.selection import perturbed_mask
from keras_sam.state import LookSAMState


@keras.saving.register_keras_serializable(package="keras_sam")
class SAMModel(DataEntry, Saving, Compiling, OwnObjective, keras.Model):
    """Wraps a Keras model and trains it with Sharpness-Aware Minimization.

    SAM (Foret et al., ICLR 2021) minimizes the loss in the worst direction
    within a ball of radius `rho` around the weights w:

        min_w  max_{||e||_2 <= rho}  L(w + e)

    Each training step takes two gradients of the same batch:

        g     = grad L(w)                  pass 1, at w
        e     = rho * g / ||g||_2          global norm over all variables
        g_sam = grad L(w + e)              pass 2, at w + e
        w     = optimizer(w, g_sam)        the compiled optimizer, at w

    L is the wrapped model's own loss (its `compute_loss`, called as Keras's
    `train_step` calls it: `keras_sam.objective`); `call`, `evaluate` and
    `predict` are the wrapped model's. The logs are what `model.fit` would
    log (from pass 1) plus `sharpness`, L(w + e) - L(w). The SAM model takes
    the wrapped model's dtype policy (loss scaling exactly when the model's
    own `compile` would use it). A KerasHub task keeps its preprocessing
    and compile defaults (`keras_sam.hub`). A step whose gradient is not
    finite is skipped, weights and optimizer state untouched; `rho=0` is
    the base optimizer, bit for bit.

    Args:
        model: the `keras.Model` to train. Its layers and variables are
            shared, not copied: after training, `sam_model.model` is the
            trained plain model, ready to save and deploy without keras_sam.
        rho: radius of the ball: a finite float >= 0, a
            `keras.optimizers.schedules.LearningRateSchedule` or a callable
            of the 0-based iteration (a scalar integer tensor: write it with
            `keras.ops`). The paper uses 0.05 (CIFAR-10, ImageNet) and 0.1
            (CIFAR-100); ASAM's rho is typically 0.5 to 2.
        p: the ball's norm, > 1: e = rho sign(g)|g|^(q-1)/||g||_q^(q-1),
            1/p + 1/q = 1; 2 (default), `float("inf")` or any p.
        adaptive: ASAM (Kwon et al., 2021): the ball scaled by T = |w| + eta
            per weight, e = rho T^2 g / ||T g||_2 for p = 2.
        eta: ASAM's offset, >= 0.
        gsam_alpha: GSAM (Zhuang et al., 2022), >= 0: apply g_s - alpha
            (the part of g orthogonal to g_s); 0 is plain SAM.
        sam_every: k >= 1: pass 2 runs on steps whose iteration is a
            multiple of k; the other steps apply g (one pass).
        looksam_alpha: LookSAM (Liu et al., 2022), with `sam_every` > 1:
            in between, g plus the stored part of g_s orthogonal to g,
            rescaled to ||g||.
        num_batch_splits: m >= 1 chunks per batch (m-sharpness on one
            device), each with its own e at the same w; the update is their
            size-weighted mean g_s.
        perturb: None (every trainable variable) or a predicate on
            variables, e.g. `keras_sam.selection.NormalizationOnly()`;
            rejected variables get e = 0 and still train.
        sync_perturbation: with several replicas, False (the default, as in
            the paper) takes e from each replica's shard (m-sharpness);
            True from the whole batch's gradient.
        direction: "gradient" (SAM); "momentum" (Momentum-SAM, Becker et
            al., 2024): e = -rho u / ||u|| from the optimizer's first moment
            u, whose rho is not SAM's (`compile` warns at the default with
            SGD); "random" (`keras_sam.noise`): e drawn each step, rho
            times the rms of each filter, on the merged W + (alpha/r) A B of
            LoRA layers (Flat-LoRA). Both take the step's only gradient at
            w + e, log the loss there and no sharpness, and refuse the
            two-gradient variants ("random" also `p` and `adaptive`).
        seed: the key of "random"'s draws, with the iteration (None: drawn
            from Python's `random`); saved in the config.
        **kwargs: passed to `keras.Model` (`name`, ...).

    Raises:
        TypeError: `model` is not a `keras.Model`, is a `SAMModel` or
            defines its own `train_step` (move its loss into
            `compute_loss`); an argument of the wrong type; a rho schedule
            that cannot run on a traced iteration (at the first step).
        ValueError: an argument out of range, a variant that `direction`
            cannot take, a `perturb` that selects no variable: each naming
            the argument, before any weight exists or changes.

    Example:

    ```python
    sam_model = keras_sam.SAMModel(model, rho=0.05)
    sam_model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    sam_model.fit(x, y, epochs=10)   # logs: loss, accuracy, sharpness
    ```
    """

    def __init__(self, model: keras.Model, rho: Rho = 0.05, *,
                 p: float = 2.0, adaptive: bool = False, eta: float = 0.01,
                 gsam_alpha: float = 0.0, sam_every: int = 1,
                 looksam_alpha: Optional[float] = None,
                 num_batch_splits: Optional[int] = None,
                 perturb: Optional[Callable] = None,
                 sync_perturbation: bool = False,
                 direction: str = "gradient", seed: Optional[int] = None,
                 **kwargs):
        objective.check_wrappable(model)
        options = SAMOptions(
            rho=rho, p=p, adaptive=adaptive, eta=eta, gsam_alpha=gsam_alpha,
            sam_every=sam_every, looksam_alpha=looksam_alpha,
            num_batch_splits=num_batch_splits, perturb=perturb,
            sync_perturbation=sync_perturbation, direction=direction,
            seed=seed)
        self._sam_train_step = sam_backend.get_train_step()
        watch.warn_about_bypassed_training(
            model, compiled=hub.compiled_by_user(model))
        # The wrapped model's precision; the model casts its inputs and
        # variables itself, as under its own fit.
        kwargs.setdefault("dtype", model.dtype_policy)
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.model = model
        self.options = options
        # Whether `rho` was left at its default (the signature's own float
        # object), so that Momentum-SAM can say when it does not suit.
        self._rho_left_at_default = rho is SAMModel.__init__.__defaults__[0]
        # Momentum-SAM and a random e never evaluate L(w): no sharpness.
        self._sharpness_tracker = (None if options.one_point else
                                   keras.metrics.Mean(name="sharpness"))
        # ||g|| per step, not logged: keras_sam.watch reads it.
        self._gradient_norm_tracker = (
            None if options.one_point or options.off
            else keras.metrics.Mean(name=objective.GRADIENT_NORM))
        self.looksam_state = None
        # The key of a random e's draws (not state: nothing is saved).
        self.noise_seed = noise.Seed(options.seed) if options.random else None
        if model.built:
            self.built = True
            self.build_sam_state()

    @property
    def rho(self) -> Rho:
        """Radius of the perturbation ball (a float or a schedule)."""
        return self.options.rho

    @property
    def _looksam_directions(self) -> list | None:
        """LookSAM's g_v, one buffer per trainable variable (or None)."""
        state = self.looksam_state
        return None if state is None else state.directions

    @property
    def sync_perturbation(self) -> bool:
        """Whether replicas share the e of the whole batch."""
        return self.options.sync_perturbation

    def perturbed_mask(self, variables) -> list:
        """[bool] per variable: whether SAM perturbs it (`perturb`)."""
        return perturbed_mask(self.options.perturb, variables, self.model)

    def build_sam_state(self) -> None:
        """Create the variant state once the wrapped model has variables:
        LookSAM's stored direction g_v, one weight-sized buffer per
        trainable variable (saved with the model, restored by
        BackupAndRestore)."""
        variables = self.model.trainable_variables
        if variables:
            self.perturbed_mask(variables)
        if self.options.looksam_alpha is None or \
                self.looksam_state is not None or not variables:
            return
        self.looksam_state = LookSAMState(variables, name="looksam_state")

    def build(self, input_shape=None):
        # The wrapped model builds itself on its first call, as it would
        # unwrapped (a subclassed model's `build(shape)` may not create its
        # sublayers' variables).
        self.built = True
        if self.model.built:
            self.build_sam_state()

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def train_step(self, *args):
        # TensorFlow and PyTorch: (data); JAX: (state, data), stateless.
        if len(args) == 2:
            return self._sam_train_step(self, *args)
        logs = self._sam_train_step(self, *args)
        return _keras_compat.logs_for_multi_worker(self, logs)

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        function = super().make_train_function(force=force)
        # PyTorch, jit_compile=True: a step compiled into one graph.
        compiled = sam_backend.compiled_train_function(self)
        if compiled is not None:
            self.train_function = function = compiled
        return function

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # keras-team/keras issue 20585: see _keras_compat.
        _keras_compat.symbolic_build_from_local_batch(self, iterator,
                                                      data_batch)

    def _symbolic_build(self, *args, **kwargs):
        # JAX's `fit` collects the state right after this build: the
        # variant state must exist by then.
        super()._symbolic_build(*args, **kwargs)
        self.build_sam_state()
        sam_backend.check_rho_schedule(self.options)

    def test_step(self, *args):
        out = super().test_step(*args)   # JAX: (logs, state)
        logs = out[0] if len(args) == 2 else out
        # Sharpness is measured while training; evaluation does not move it.
        logs.pop("sharpness", None)
        return out if len(args) == 2 else \
            _keras_compat.logs_for_multi_worker(self, logs)

    def summary(self, *args, expand_nested: bool = True, **kwargs):
        """Keras's summary with the wrapped model's layers expanded, then
        SAM's settings."""
        super().summary(*args, expand_nested=expand_nested, **kwargs)
        (kwargs.get("print_fn") or print)(
            f"SAM settings: {self.options.describe()}; wrapped model: "
            f"'{self.model.name}'")

    def get_config(self) -> dict:
        return {"name": self.name, "trainable": self.trainable,
                "model": keras.saving.serialize_keras_object(self.model),
                **self.options.get_config()}

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> "SAMModel":
        config = SAMOptions.config_to_kwargs(config, custom_objects)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects)
        return cls(model=model, **config)
