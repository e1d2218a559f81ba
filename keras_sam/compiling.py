"""`SAMModel.compile`: the wrapped model's objective, SAM's optimizer.

`sam_model.compile(optimizer, loss, metrics, ...)` compiles the wrapped
model with the loss and metrics (a KerasHub task resolves "auto" and takes
its own arguments, such as a causal LM's `sampler`), then takes over the
optimizer that the model's `compile` chose: a `LossScaleOptimizer` exactly
when the model's policy is mixed_float16. The wrapped model keeps its
objective and no optimizer; the SAM model's compile config holds the
arguments as the model resolved them, so a `.keras` reload compiles both
again. `run_eagerly`, `steps_per_execution` and `jit_compile` configure the
SAM model's step.
"""

from __future__ import annotations

import inspect

import keras

from keras_sam import _keras_compat, _warnings, hub, momentum

# `keras.Model.compile`'s arguments, in its positional order.
_KERAS_COMPILE = tuple(inspect.signature(keras.Model.compile).parameters)[1:]
# The ones that configure the SAM model's step rather than the objective.
_STEP_ARGUMENTS = ("run_eagerly", "steps_per_execution", "jit_compile")


def compile_arguments(args: tuple, kwargs: dict) -> dict:
    """`compile`'s arguments as keywords: positional ones named as
    `keras.Model.compile` names them, other keywords (a KerasHub task's
    `sampler`) kept."""
    if len(args) > len(_KERAS_COMPILE):
        raise TypeError(
            f"compile() takes at most {len(_KERAS_COMPILE)} positional "
            f"arguments ({', '.join(_KERAS_COMPILE)}); received {len(args)}.")
    named = dict(zip(_KERAS_COMPILE, args))
    twice = sorted(set(named) & set(kwargs))
    if twice:
        raise TypeError(f"compile() got multiple values for {twice[0]!r}.")
    return {**named, **kwargs}


def compile_model(model: keras.Model, arguments: dict) -> tuple:
    """Compile the wrapped `model` with `arguments` as its own `compile`
    would take them, and take its optimizer over.

    Returns (the optimizer to apply the updates with, as the model's compile
    chose it: a LossScaleOptimizer where it would use one; the SAM model's
    compile config; the step's own arguments).
    """
    arguments = dict(arguments)
    step = {k: arguments.pop(k) for k in _STEP_ARGUMENTS if k in arguments}
    if not hub.is_task(model):
        # "auto" is a KerasHub task's word (the task resolves it in its own
        # compile); a plain model gets Keras's defaults (rmsprop, no loss,
        # no metrics).
        arguments = {k: None if _is_auto(v) else v
                     for k, v in arguments.items()}
        if arguments.get("optimizer") is None:
            arguments["optimizer"] = "rmsprop"
    model.compile(**arguments)
    optimizer = model.optimizer
    config = _keras_compat.compile_config(model)
    given = config.get("optimizer", optimizer)
    # The SAM model applies the updates and saves the optimizer's state;
    # the wrapped model keeps its objective only.
    model.optimizer = None
    # Saved with the SAM model's compile config; the wrapped model's own
    # file (`sam_model.model.save`, to deploy) loads uncompiled, as before.
    _keras_compat.forget_compile_config(model)
    return optimizer, _sam_compile_config(config, arguments, given,
                                          step), step


def _sam_compile_config(config: dict, arguments: dict, optimizer,
                        step: dict) -> dict:
    """What the SAM model's `.keras` file compiles with on reload: the
    wrapped model's compile `config` as its `compile` resolved it (a task's
    "auto" loss and metrics), the optimizer as given, and the arguments
    Keras does not keep (a task's `sampler`, `auto_scale_loss`)."""
    resolved = {k: v for k, v in config.items()
                if k in _KERAS_COMPILE and k not in _STEP_ARGUMENTS}
    extra = {k: v for k, v in arguments.items()
             if k not in resolved and k not in _STEP_ARGUMENTS}
    return {**resolved, **extra, "optimizer": optimizer, **step}


def _is_auto(value) -> bool:
    return isinstance(value, str) and value == "auto"


class Compiling:
    """`SAMModel`'s `compile` and the Keras hooks around it."""

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
        arguments = compile_arguments(args, kwargs)
        optimizer, config, step_arguments = compile_model(self.model,
                                                          arguments)
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

    def _assert_compile_called(self, method_name=None):
        if not self.compiled:
            raise ValueError(_keras_compat.compile_hint(self, method_name))
        return super()._assert_compile_called(method_name)
