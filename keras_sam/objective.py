"""What SAM minimizes and reports: the wrapped model's own objective.

`SAMModel(model).fit` trains what `model.fit` trains. `sam_model.compile`
compiles the wrapped model with the loss and metrics it is given
(keras_sam.compiling), and from then on SAM asks the wrapped model what
Keras's own `train_step` would ask it:

    loss    = model.compute_loss(x, y, y_pred, sample_weight, training=True)
              its override if it has one (a distillation or contrastive
              loss, BASNet's deep supervision), else the compiled loss plus
              `model.losses`; called after the forward pass, outside it
    logs    = model.compute_metrics(x, y, y_pred, sample_weight)
              + {"sharpness": L(w + e) - L(w)}
    metrics = model.metrics + [sharpness], reset by `model.reset_metrics`

Both SAM passes evaluate that loss (pass 2 at w + e); what `compute_loss`
writes (a loss tracker's state) is kept from pass 1 only.

Precision: the optimizer is the one the wrapped model's `compile` picked,
so it is a `LossScaleOptimizer` exactly when the model's own policy is
mixed_float16, whatever the global policy was when it was wrapped.

The wrapped model keeps its compiled loss and metrics (`sam_model.model.
evaluate` works) but no optimizer: the SAM model applies the updates, and
the optimizer's state is saved once, with the SAM model.
"""

from __future__ import annotations

import contextlib

import keras

# The name of the unlogged mean of ||g|| over an epoch's steps.
GRADIENT_NORM = "sam_gradient_norm"


class Wrapped:
    """A compile attribute of Keras's (`_loss_tracker`, `_compile_loss`,
    ...) that a SAM model reads from the wrapped model: Keras's steps and
    `_symbolic_build` then update and build the model's own objects.
    Keras's writes of it on the SAM model (in `__init__`, `compile`) are
    ignored."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, sam, owner=None):
        return self if sam is None else wrapped_attribute(sam, self.name)

    def __set__(self, sam, value):
        pass


def wrapped_attribute(sam, name: str):
    """The wrapped model's `name` (None before it exists)."""
    try:
        model = sam.model
    except AttributeError:   # while Keras's __init__ runs: not set yet
        return None
    return getattr(model, name, None)


def compute_loss(sam, x=None, y=None, y_pred=None, sample_weight=None,
                 training=True):
    """The wrapped model's loss at its current (or scoped) weights, called
    as Keras's `train_step` calls it."""
    model = sam.model
    with _losses_seen_by(model, sam):
        return model._compute_loss(x=x, y=y, y_pred=y_pred,
                                   sample_weight=sample_weight,
                                   training=training)


def stateless_loss(sam, mapping: list, written: list, x, y, sample_weight):
    """(y_pred, loss, scaled loss, scope) of `sam` on a batch with its
    variables read
    from `mapping` [(variable, value)], nothing written; `scope` holds what
    the forward pass and `compute_loss` wrote (`scope.get_current_value`).

    The loss is computed after the forward pass, as in Keras's own step: a
    `compute_loss` that runs layers again (BASNet) reads the state the
    forward pass left (BatchNorm statistics), among the `written` variables.
    Keras's TensorFlow and PyTorch steps write that state to variables
    first, so the loss sees it as values, not as functions of the weights;
    Keras's JAX step differentiates through it. The same here.
    """
    with keras.StatelessScope(state_mapping=mapping,
                              collect_losses=True) as forward:
        y_pred = sam(x, training=True)
    moved = [(v, forward.get_current_value(v)) for v in written]
    moved = [(v, _as_value(value)) for v, value in moved if value is not None]
    with keras.StatelessScope(state_mapping=mapping + moved,
                              collect_losses=True) as scope:
        for loss in forward.losses:   # the forward pass's `add_loss`
            scope.add_loss(loss)
        loss = sam._compute_loss(x=x, y=y, y_pred=y_pred,
                                 sample_weight=sample_weight, training=True)
        scaled = sam.optimizer.scale_loss(loss)
    return y_pred, loss, scaled, scope


def _as_value(tensor):
    if keras.backend.backend() == "jax":
        return tensor
    return keras.ops.stop_gradient(tensor)


@contextlib.contextmanager
def _losses_seen_by(model, sam):
    """Keras's JAX evaluation hands the forward pass's `add_loss` values to
    the loss through the top model's `_losses_override`; the wrapped model's
    `compute_loss` reads its own `losses`, so it gets them too."""
    override = list(getattr(sam, "_losses_override", None) or [])
    if not override:
        yield
        return
    object.__setattr__(model, "_losses_override", override)
    try:
        yield
    finally:
        object.__setattr__(model, "_losses_override", [])


def compute_metrics(sam, x, y, y_pred, sample_weight=None) -> dict:
    """The wrapped model's logs (its `compute_metrics`), then sharpness."""
    logs = dict(sam.model.compute_metrics(x, y, y_pred, sample_weight))
    tracker = sam._sharpness_tracker
    if tracker is not None:
        logs[tracker.name] = tracker.result()
    return logs


def metrics(sam) -> list:
    """The wrapped model's metrics (its loss tracker, compiled metrics and
    any of its own, or its `metrics` override), then sharpness, then the
    unlogged ||g|| tracker (a metric, so that every backend's step carries
    its state)."""
    model = wrapped_attribute(sam, "metrics")
    own = [getattr(sam, name, None)
           for name in ("_sharpness_tracker", "_gradient_norm_tracker")]
    return list(model or []) + [m for m in own if m is not None]


def reset_metrics(sam) -> None:
    """Keras's reset (each epoch, each evaluate): the model's metrics and
    sharpness. The ||g|| mean is reset by keras_sam.watch, at the start of
    each training epoch only."""
    sam.model.reset_metrics()
    if sam._sharpness_tracker is not None:
        sam._sharpness_tracker.reset_state()


def metrics_result(sam, results: dict) -> dict:
    """Keras's `get_metrics_result` without the unlogged ||g||."""
    results = dict(results)
    results.pop(GRADIENT_NORM, None)
    return results


def has_loss(model) -> bool:
    """Whether `model` (or the model a SAMModel wraps) has a loss to
    measure: a compiled loss or a `compute_loss` of its own."""
    from keras_sam.model import SAMModel

    if isinstance(model, SAMModel):
        model = model.model
    return model.compiled and (model.loss is not None or
                               overrides(model, "compute_loss"))


def overrides(model, method: str) -> bool:
    """Whether `model`'s class (`model` may be the class itself) defines
    `method` of its own: neither Keras's nor KerasHub's pipeline's (whose
    methods SAMModel runs, `keras_sam.hub`)."""
    from keras_sam import hub

    cls = model if isinstance(model, type) else type(model)
    own = getattr(cls, method)
    return all(base is None or own is not getattr(base, method)
               for base in (keras.Model, hub.pipeline_model_class()))


def check_wrappable(model) -> None:
    """Refuse, saying what to do, a model that SAM cannot train as its own
    `fit` would: not a Keras model, a SAM model already, or one with its own
    `train_step` or `fit` (SAM's would replace what those do)."""
    from keras_sam.model import SAMModel

    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a `keras.Model` (Sequential, functional or "
            f"subclassed); received {model!r} of type "
            f"{type(model).__name__}. To train a single layer, wrap it: "
            "`keras.Sequential([layer])`.")
    if isinstance(model, SAMModel):
        raise TypeError(
            "`model` is already a SAMModel: wrapping it again would take "
            "four gradients per step and perturb twice. Wrap the plain "
            "model once: `SAMModel(sam_model.model, rho=...)`.")
    if overrides(model, "fit"):
        raise TypeError(
            f"'{model.name}' ({type(model).__name__}) defines its own `fit`, "
            "which SAMModel cannot run: `SAMModel(model).fit` is Keras's "
            "`fit` with SAM's step, so what that `fit` does (or refuses: "
            "KerasHub's inference-only tasks raise NotImplementedError "
            "there) would be skipped, not made flatter. Prepare the data "
            "and callbacks it adds before calling `SAMModel(model).fit`, "
            "from a model class without the override.")
    if overrides(model, "train_step"):
        raise TypeError(
            f"'{model.name}' ({type(model).__name__}) defines its own "
            "`train_step`, which SAMModel cannot run: SAM's step "
            "differentiates the model's loss twice (at w and at w + e) and "
            "applies one update, so another step's logic (several "
            "optimizers, a GAN's two players, gradients handled by hand) "
            "would be replaced, not made flatter. If that `train_step` "
            "computes a loss from (x, y, y_pred) and applies it with the "
            "compiled optimizer, move the loss into an override of "
            "`compute_loss(self, x, y, y_pred, sample_weight, training=True)` "
            "and its logs into `compute_metrics` or `metrics`: SAMModel "
            "honours both, as `model.fit` does. Otherwise train that model "
            "without SAMModel.")


class OwnObjective:
    """`SAMModel`'s Keras hooks for what it trains and logs: each hands over
    to the wrapped model's (overrides included), as the module says."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        return compute_loss(self, x, y, y_pred, sample_weight, training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return compute_metrics(self, x, y, y_pred, sample_weight)

    @property
    def metrics(self):
        return metrics(self)

    def reset_metrics(self):
        reset_metrics(self)

    def get_metrics_result(self):
        return metrics_result(self, super().get_metrics_result())

    # Keras's compile state is the wrapped model's: Keras's steps and
    # builds of the SAM model read it from there (its own writes are
    # ignored).
    loss = Wrapped()
    _compile_loss = Wrapped()
    _compile_metrics = Wrapped()
    _loss_tracker = Wrapped()
