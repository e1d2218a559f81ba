"""`SAMModel`: Sharpness-Aware Minimization for any Keras model."""

from __future__ import annotations

import inspect
import os
from typing import Callable, Optional

import keras

from keras_sam import (_keras_compat, _warnings, hub, momentum, noise,
                       objective)
from keras_sam import watch
from keras_sam import backend as sam_backend
from keras_sam import saving
from keras_sam.options import Rho, SAMOptions
from keras_sam.selection import selected
from keras_sam.state import LookSAMState


@keras.saving.register_keras_serializable(package="keras_sam")
class SAMModel(keras.Model):
    """Wraps a Keras model and trains it with Sharpness-Aware Minimization.

    SAM (Foret et al., ICLR 2021) minimizes the loss in the worst direction
    within a ball of radius `rho` around the weights w:

        min_w  max_{||e||_2 <= rho}  L(w + e)

    Each training step takes two gradients of the same batch:

        g     = grad L(w)                  pass 1, at w
        e     = rho * g / ||g||_2          global norm over all variables
        g_sam = grad L(w + e)              pass 2, at w + e
        w     = optimizer(w, g_sam)        the compiled optimizer, at w

    L is the wrapped model's own loss: its `compute_loss` (an override, or
    the loss given to `compile` plus `model.losses`), called as Keras's
    `train_step` calls it (`keras_sam.objective`). `call`, `evaluate` and
    `predict` are those of the wrapped model. The training logs are what
    `model.fit` would log at the same weights (the model's
    `compute_metrics`, from pass 1) plus `sharpness`, L(w + e) - L(w), the
    first-order sharpness of the batch. The SAM model takes the wrapped
    model's dtype policy: its optimizer scales the loss exactly when the
    model's own `compile` would.

    A KerasHub task (`keras_hub.models.Task`) keeps its preprocessing:
    `fit`, `evaluate` and `predict` take raw inputs (strings, images) as
    the task's do, and `compile()` sets the task's defaults
    (`keras_sam.hub`).

    A step whose pass-1 gradient is not finite is skipped: the weights and
    the optimizer state stay untouched. With loss scaling, an overflow in
    either pass skips the step and lowers the scale. With `rho=0` training
    is bit for bit that of the base optimizer.

    Variants, all composable (the guide "Choosing rho and a variant" says
    what each buys):

        p           the ball's norm: e = rho sign(g)|g|^(q-1)/||g||_q^(q-1)
        adaptive    ASAM: the ball scaled by T = |w| + eta per weight
        gsam_alpha  GSAM: apply g_s - alpha * (part of g orthogonal to g_s)
        sam_every   the second pass on every k-th step only; g in between
        looksam_alpha  LookSAM: between SAM steps, g plus the stored part of
                    g_s orthogonal to g, rescaled to ||g||
        num_batch_splits  m-sharpness on one device: each of m chunks of the
                    batch gets its own e, their g_s are averaged
        perturb     which variables get e (the others still train)
        direction   "momentum": Momentum-SAM, e = -rho u / ||u|| from the
                    optimizer's first moment u; "random": e = rho rms(w_f) z
                    per filter, Flat-LoRA on LoRA layers; one gradient per
                    step

    Args:
        model: the `keras.Model` to train. Its layers and variables are
            shared, not copied: after training, `sam_model.model` is the
            trained plain model, ready to save and deploy without keras_sam.
        rho: radius of the ball: a finite float >= 0, a
            `keras.optimizers.schedules.LearningRateSchedule` or a callable
            of the 0-based iteration, which it receives as a scalar integer
            tensor (write it with `keras.ops`: Python control flow on it
            fails while the step is traced, with a `TypeError` that says
            so). The paper uses 0.05 (CIFAR-10, ImageNet) and 0.1
            (CIFAR-100); ASAM's rho is typically 0.5 to 2.
        p: the ball's norm, > 1: 2 (default) or `float("inf")` or any p.
        adaptive: ASAM (Kwon et al., 2021): T = |w| + eta element-wise on
            every perturbed variable, e = rho T^2 g / ||T g||_2 for p = 2.
        eta: ASAM's offset, >= 0.
        gsam_alpha: GSAM (Zhuang et al., 2022), >= 0; 0 is plain SAM.
        sam_every: k >= 1: the second pass runs on steps whose iteration
            (the optimizer's `iterations` before the step) is a multiple of
            k; the other steps apply the clean gradient (one pass).
        looksam_alpha: LookSAM (Liu et al., 2022), with `sam_every` > 1.
        num_batch_splits: m >= 1 chunks per batch, each with its own e at
            the same w; the update is their size-weighted mean g_s.
        perturb: None (every trainable variable) or a predicate on
            variables, e.g. `keras_sam.selection.NormalizationOnly()`;
            rejected variables get e = 0, stay out of every norm and are
            still updated with the SAM gradient.
        sync_perturbation: with several replicas (a `tf.distribute`
            strategy, or JAX's `keras.distribution.DataParallel`), False
            (the default, as in the paper) computes e on each replica from
            its own shard of the batch (m-sharpness with m = the
            per-replica batch) and averages the resulting g_sam; True takes
            e from the whole batch's gradient, so every replica uses the
            same e (full-batch SAM; on TensorFlow one more all-reduce per
            step). No effect on one replica.
        direction: "gradient" (SAM) or "momentum" (Momentum-SAM, Becker et
            al., 2024): e = -rho u / ||u||_2 with u the optimizer's first
            moment in the gradient's sign (SGD with momentum, Adam, AdamW,
            Adamax, Nadam, Lion), and the step's only gradient taken at
            w + e; e = 0 on the first step. Its rho is not SAM's: on an
            MLP it helped from rho = 1 on (SGD + momentum and Adam), while
            with Adam a Transformer stayed at chance at rho >= 0.3; left
            at the default with SGD, `compile` warns. Composes with rho
            schedules, `p`,
            `adaptive`, `perturb` and loss scaling; not with `gsam_alpha`,
            `sam_every`, `looksam_alpha` or `num_batch_splits`. The logs
            report the loss at w + e and no sharpness.
            "random" (`keras_sam.noise`): e drawn anew each step, each
            entry N(0, (rho rms(w_f))^2) with rms(w_f) that of its filter
            (a slice along the last axis), the step's only gradient taken
            at w + e (LPF-SGD, random weight perturbation). On a layer
            with LoRA the noise goes to the merged W + (alpha/r) A B
            through the frozen W, none to A and B (Flat-LoRA, Li et al.,
            2025). Flat-LoRA uses rho about 0.05 (a relative radius).
            Composes with rho schedules, `perturb` and loss scaling; not
            with `p`, `adaptive` or the two-gradient variants. The logs
            report the loss at w + e and no sharpness.
        seed: the key of direction="random"'s draws, with the iteration
            (None: drawn from Python's `random`); saved in the config.
        **kwargs: passed to `keras.Model` (`name`, ...).

    Raises:
        TypeError: `model` is not a `keras.Model` or is already a
            `SAMModel`; `model` defines its own `train_step` (SAM's step
            would replace it: move its loss into `compute_loss`); `rho` or
            `perturb` of the wrong type; a rho
            schedule that cannot run on a traced iteration (at the first
            step, before any weight changes).
        ValueError: any argument out of range (a negative, NaN or
            infinite `rho`, `eta` or alpha; p <= 1; `sam_every` or
            `num_batch_splits` below 1; `looksam_alpha` without
            `sam_every` > 1; an unknown `direction`, or "momentum" or
            "random" with a variant it cannot take; a `perturb` that
            selects no variable),
            each naming the argument, before any weight exists or changes.

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
        if not isinstance(model, keras.Model):
            raise TypeError(
                "`model` must be a `keras.Model` (Sequential, functional or "
                f"subclassed); received {model!r} of type "
                f"{type(model).__name__}. To train a single layer, wrap it: "
                "`keras.Sequential([layer])`."
            )
        if isinstance(model, SAMModel):
            raise TypeError(
                "`model` is already a SAMModel: wrapping it again would take "
                "four gradients per step and perturb twice. Wrap the plain "
                "model once: `SAMModel(sam_model.model, rho=...)`.")
        objective.check_train_step(model)
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
        # Whether `rho` was left at its default: the signature's own float
        # object (a value the caller wrote is another one), so that
        # Momentum-SAM can say when that default does not suit its optimizer.
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
        return None if self.looksam_state is None else \
            self.looksam_state.directions

    @property
    def sync_perturbation(self) -> bool:
        """Whether replicas share the e of the whole batch."""
        return self.options.sync_perturbation

    def perturbed_mask(self, variables) -> list:
        """[bool] per variable: whether SAM perturbs it (`perturb`)."""
        mask = selected(self.options.perturb, variables, self.model)
        if variables and not any(mask):
            raise ValueError(
                f"`perturb`={self.options.perturb!r} selects none of the "
                f"{len(variables)} trainable variables of "
                f"'{self.model.name}', so SAM would be the base optimizer. "
                "Pass a predicate that accepts some variables (e.g. "
                "`lambda v: 'bias' not in v.path`), or perturb=None.")
        return mask

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

    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """Saves the SAM model (wrapped model, `rho`, optimizer state) as a
        `.keras` file, to resume training. `keras.saving.load_model` reads it
        back once keras_sam is imported. To deploy, save the plain model
        instead: `sam_model.model.save("model.keras")`; to serve,
        `sam_model.export(dirpath)`."""
        saving.check_save_path(filepath)
        return super().save(filepath, overwrite=overwrite, zipped=zipped,
                            **kwargs)

    def export(self, filepath, format="tf_saved_model", verbose=None,
               input_signature=None, **kwargs):
        """Exports the wrapped model for inference (a SavedModel by default).

        SAM changes training only, so the artifact is the wrapped model's
        and its outputs equal `sam_model.predict`; serving it needs neither
        keras_sam nor this class.
        """
        return self.model.export(filepath, format=format, verbose=verbose,
                                 input_signature=input_signature, **kwargs)

    def save_weights(self, filepath, overwrite=True, max_shard_size=None):
        """Saves the weights (wrapped model, optimizer, variant state).

        The file also reads as the wrapped model's own weights file:
        `plain_model.load_weights(path)` loads it, so checkpoints written
        during SAM training (`ModelCheckpoint(save_weights_only=True)`) go
        straight to a model without keras_sam.
        """
        result = super().save_weights(filepath, overwrite=overwrite,
                                      max_shard_size=max_shard_size)
        if max_shard_size is None:
            saving.link_plain_layout(self, filepath)
        return result

    def load_own_variables(self, store):
        # A SAMModel has no variables of its own (the wrapped model and the
        # variant state hold them); its weights files may name the wrapped
        # model's own variables at the top (see `save_weights`).
        if self._trainable_variables or self._non_trainable_variables:
            super().load_own_variables(store)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Loads weights saved from this SAMModel, or from the plain model
        it wraps (`model.save_weights`): pretrained weights go straight into
        SAM fine-tuning. A file that does not fit changes nothing: every
        variable keeps its value, and the error lists both sides."""
        with saving.all_or_nothing(self):
            if saving.is_plain_layout(self, filepath):
                try:
                    return self.model.load_weights(
                        filepath, skip_mismatch=skip_mismatch, **kwargs)
                except ValueError as error:
                    raise ValueError(saving.describe_weight_mismatch(
                        self, filepath, error)) from error
            try:
                return super().load_weights(filepath,
                                            skip_mismatch=skip_mismatch,
                                            **kwargs)
            except ValueError as error:
                if not os.path.exists(filepath):
                    raise
                try:   # a plain model's file that happens to have that group
                    return self.model.load_weights(filepath, **kwargs)
                except ValueError:
                    pass   # the outer block puts every variable back
                raise ValueError(saving.describe_weight_mismatch(
                    self, filepath, error)) from error

    # Data enters through a KerasHub task's preprocessing (keras_sam.hub),
    # then Keras's own methods of this model.
    def _entry(self):
        feeder = hub.pipeline(self)
        return super() if feeder is None else feeder

    def fit(self, *args, **kwargs):
        """Keras's `fit`; a KerasHub task's raw inputs are preprocessed as
        `task.fit` would (see `keras_sam.hub`)."""
        feeder = hub.pipeline(self)
        return (self.keras_fit if feeder is None else feeder.fit)(
            *args, **kwargs)

    def keras_fit(self, *args, **kwargs):
        """Keras's `fit` on model-ready data, with `keras_sam.watch.Watch`
        among the callbacks: after each epoch it warns about a rho schedule
        that went negative or non-finite, and about a loss that did not go
        down at the start."""
        arguments = _arguments(super().fit, args, kwargs)
        arguments["callbacks"] = watch.with_watch(
            self, arguments.get("callbacks"))
        try:
            return super().fit(**arguments)
        except Exception as error:
            clearer = sam_backend.explain_failure(error)
            if clearer is None:
                raise
            raise clearer from error

    def evaluate(self, *args, **kwargs):
        return self._entry().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        return self._entry().predict(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        return self._entry().train_on_batch(*args, **kwargs)

    def test_on_batch(self, *args, **kwargs):
        return self._entry().test_on_batch(*args, **kwargs)

    def predict_on_batch(self, *args, **kwargs):
        return self._entry().predict_on_batch(*args, **kwargs)

    def compile(self, *args, **kwargs):
        """Keras's `compile`, for the wrapped model's objective and SAM's
        step. The loss and metrics go to the wrapped model (`model.compile`
        with these arguments, without keeping an optimizer), whose
        `compute_loss` and `compute_metrics` then define what SAM trains and
        logs; the optimizer is the one that compile chose (a
        LossScaleOptimizer for a mixed_float16 model). A KerasHub task
        takes its own defaults for arguments left "auto" (what
        `task.compile()` sets) and its own arguments (`sampler`); another
        model takes Keras's (rmsprop, no loss)."""
        arguments = objective.compile_arguments(args, kwargs)
        optimizer, config, step_arguments = objective.compile_model(
            self.model, arguments)
        super().compile(optimizer=optimizer, auto_scale_loss=False,
                        **step_arguments)
        # Reloading compiles again with the arguments as the model's compile
        # resolved them (its optimizer's settings; the state is in the
        # weights).
        _keras_compat.set_compile_config(self, config)
        if self.options.momentum:   # an optimizer without a first moment
            momentum.check_optimizer(self.optimizer)
            advice = momentum.default_rho_advice(self.optimizer)
            if advice and self._rho_left_at_default:
                _warnings.warn(advice)

    def compile_from_config(self, config):
        # Keras does not compile a loaded model whose class overrides
        # `compile`; this one only adds a check, so compile as Keras would.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    # What SAM trains and logs is the wrapped model's (keras_sam.objective).
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        return objective.compute_loss(self, x, y, y_pred, sample_weight,
                                      training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return objective.compute_metrics(self, x, y, y_pred, sample_weight)

    @property
    def metrics(self):
        return objective.metrics(self)

    # Keras's compile state is the wrapped model's: Keras's steps and
    # builds of this model read it from there (its own writes are ignored).
    loss = objective.Wrapped()
    _compile_loss = objective.Wrapped()
    _compile_metrics = objective.Wrapped()
    _loss_tracker = objective.Wrapped()

    def reset_metrics(self):
        objective.reset_metrics(self)

    def get_metrics_result(self):
        return objective.metrics_result(self, super().get_metrics_result())

    def _assert_compile_called(self, method_name=None):
        if not self.compiled:
            raise ValueError(_keras_compat.compile_hint(self, method_name))
        return super()._assert_compile_called(method_name)

    def summary(self, *args, expand_nested: bool = True, **kwargs):
        """Keras's summary with the wrapped model's layers expanded, then
        SAM's settings."""
        super().summary(*args, expand_nested=expand_nested, **kwargs)
        print_fn = kwargs.get("print_fn") or print
        defaults = SAMOptions()
        settings = [f"rho={self.options.rho!r}"] + [
            f"{f}={getattr(self.options, f)!r}"
            for f in self.options.get_config()
            if f != "rho" and getattr(self.options, f) != getattr(defaults, f)]
        print_fn(f"SAM settings: {', '.join(settings)}; wrapped model: "
                 f"'{self.model.name}'")

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "model": keras.saving.serialize_keras_object(self.model),
            **self.options.get_config(),
        }

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> "SAMModel":
        config = SAMOptions.config_to_kwargs(config, custom_objects)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        return cls(model=model, **config)


def _arguments(method, args, kwargs) -> dict:
    """`method`'s arguments as keywords (its `**kwargs` spread out)."""
    signature = inspect.signature(method)
    arguments = signature.bind(*args, **kwargs).arguments
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return dict(arguments)
