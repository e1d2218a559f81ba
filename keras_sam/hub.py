"""KerasHub tasks under SAM: the task's own preprocessing and compile defaults.

A KerasHub `Task` (`BertTextClassifier`, `ResNetImageClassifier`,
`GPT2CausalLM`, `BartSeq2SeqLM`, ...) preprocesses inside its own `fit`,
`evaluate` and `predict`: its base class, KerasHub's `PipelineModel`, builds
a `tf.data` or grain dataset from raw inputs (strings, images), maps the
task's `preprocess_samples` (its `preprocessor`) over it and hands the
result to Keras's `fit`. The task's `call` takes preprocessed tensors only.
`SAMModel(task)` runs that same code, with the SAM model at its end:

    SAMModel(task).fit(raw x, y, ...)
      -> PipelineModel.fit      raw inputs -> task.preprocess_samples, on
                                tf.data or grain, as task.fit does
      -> Keras's fit            of the SAM model: the SAM step sees the
                                batches task.fit would have trained on

and likewise `evaluate`, `predict` and the `*_on_batch` methods. A task
whose `preprocessor` is None takes model-ready tensors, but `task.fit` still
builds its dataset in `PipelineModel` (Keras's own `fit` makes another of
the same arrays, and TensorFlow's graph rewrites then round some gradients
apart), so it goes the same way.

`compile` takes the task's defaults: `sam_model.compile()` sets what
`task.compile()` would (e.g. Adam(5e-5), sparse cross-entropy from logits,
accuracy; a causal LM's accuracy as a weighted metric, so padding does not
count); an argument given replaces its default, as in KerasHub.

keras_hub is never imported here unless the user has imported it already: a
model can only be a KerasHub task if its library is loaded.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from typing import Optional

import keras

from keras_sam import watch


class DataEntry:
    """`SAMModel`'s data methods: a KerasHub task's raw inputs go through
    its preprocessing (`pipeline`), then Keras's own method of the SAM
    model; `fit` also adds `keras_sam.watch.Watch` to the callbacks."""

    def _entry(self):
        feeder = pipeline(self)
        return super() if feeder is None else feeder

    def fit(self, *args, **kwargs):
        """Keras's `fit`; a KerasHub task's raw inputs are preprocessed as
        `task.fit` would (see `keras_sam.hub`)."""
        feeder = pipeline(self)
        return (self.keras_fit if feeder is None else feeder.fit)(
            *args, **kwargs)

    def keras_fit(self, *args, **kwargs):
        """Keras's `fit` on model-ready data, with `keras_sam.watch.Watch`
        among the callbacks: after each epoch it warns about a rho schedule
        that went negative or non-finite, and about a loss that did not go
        down at the start."""
        from keras_sam import backend

        arguments = _arguments(super().fit, args, kwargs)
        arguments["callbacks"] = watch.with_watch(
            self, arguments.get("callbacks"))
        try:
            return super().fit(**arguments)
        except Exception as error:
            clearer = backend.explain_failure(error)
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


def _arguments(method, args, kwargs) -> dict:
    """`method`'s arguments as keywords (its `**kwargs` spread out)."""
    signature = inspect.signature(method)
    arguments = signature.bind(*args, **kwargs).arguments
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return dict(arguments)


def pipeline_model_class():
    """KerasHub's `PipelineModel`, or None when keras_hub is not loaded."""
    if "keras_hub" not in sys.modules:
        return None
    from keras_hub.src.utils.pipeline_model import PipelineModel

    return PipelineModel


def is_task(model) -> bool:
    """Whether `model` preprocesses in its own fit/evaluate/predict (a
    KerasHub `Task`, or any KerasHub `PipelineModel`)."""
    base = pipeline_model_class()
    return base is not None and isinstance(model, base)


def pipeline(sam):
    """The task's preprocessing in front of `sam`'s Keras methods, or None
    (not a KerasHub task).

    The returned object has the `fit`, `evaluate`, `predict` and
    `*_on_batch` methods of KerasHub's `PipelineModel`: they preprocess with
    the task's `preprocess_samples` and then call Keras's method of `sam`.
    """
    if not is_task(sam.model):
        return None
    feeder = object.__new__(_feeder_class())
    object.__setattr__(feeder, "sam", sam)
    return feeder


@functools.cache
def _feeder_class():
    pipeline_model = pipeline_model_class()

    class KerasMethods(keras.Model):
        """Where `PipelineModel`'s methods end (their `super()` call): the
        SAM model's Keras methods, on preprocessed data."""

        def fit(self, *args, **kwargs):
            return self.sam.keras_fit(*args, **kwargs)

        def evaluate(self, *args, **kwargs):
            return keras.Model.evaluate(self.sam, *args, **kwargs)

        def predict(self, *args, **kwargs):
            return keras.Model.predict(self.sam, *args, **kwargs)

        def train_on_batch(self, *args, **kwargs):
            return keras.Model.train_on_batch(self.sam, *args, **kwargs)

        def test_on_batch(self, *args, **kwargs):
            return keras.Model.test_on_batch(self.sam, *args, **kwargs)

        def predict_on_batch(self, *args, **kwargs):
            return keras.Model.predict_on_batch(self.sam, *args, **kwargs)

    class Feeder(pipeline_model, KerasMethods):
        """Runs `PipelineModel`'s fit/evaluate/predict for a SAM model: an
        adapter, never a Keras model of its own (it is not initialized);
        whatever else `PipelineModel` reads comes from the SAM model."""

        __setattr__ = object.__setattr__

        def __getattr__(self, name):
            if name == "sam":
                raise AttributeError(name)
            return getattr(self.sam, name)

        def preprocess_samples(self, x, y=None, sample_weight=None):
            # The task's own preprocessing, as task.fit uses it.
            return self.sam.model.preprocess_samples(x, y, sample_weight)

    return Feeder


class _CapturedCompile(keras.Model):
    """Stands before `keras.Model` in a probe's MRO: records the arguments
    that a task's `compile` hands to Keras's, and compiles nothing."""

    def compile(self, *args, **kwargs):
        self._captured = dict(zip(("optimizer", "loss"), args), **kwargs)


@functools.cache
def _probe_class(task_class):
    # Attributes that `compile` sets (a causal LM's sampler) stay on the
    # probe: plain attribute writes, no Keras tracking.
    return type(f"_{task_class.__name__}CompileProbe",
                (task_class, _CapturedCompile),
                {"__setattr__": object.__setattr__})


def task_compile_defaults(task) -> Optional[dict]:
    """The arguments `task.compile()` passes to `keras.Model.compile` (fresh
    optimizer, loss and metric objects), or None when they cannot be had.

    The task's class's own `compile` runs on a probe: a copy of the task's
    attributes in a subclass whose `keras.Model.compile` only records its
    arguments. Nothing of the task changes.
    """
    try:
        probe = object.__new__(_probe_class(type(task)))
        probe.__dict__.update(vars(task))
        type(task).compile(probe)
        return dict(probe._captured)
    except Exception:   # a compile that needs more than attributes
        return None


def compiled_by_user(model) -> bool:
    """Whether `model` holds compile settings that someone chose: for a
    KerasHub task, settings other than those it gave itself at construction
    (`compile=True`); for any other model, any compile."""
    if not getattr(model, "compiled", False):
        return False
    if not is_task(model):
        return True
    defaults = task_compile_defaults(model)
    if defaults is None:
        return False   # cannot tell: no warning rather than a false one
    # Keras's own arguments at their defaults too (`jit_compile` is stored
    # resolved per backend, so it is not compared).
    keras_defaults = {
        name: p.default for name, p in
        inspect.signature(keras.Model.compile).parameters.items()
        if p.default is not inspect.Parameter.empty and name != "jit_compile"}
    with warnings.catch_warnings():
        # Keras serializes an optimizer's learning-rate variable through
        # `np.array`, which NumPy 2 deprecates: Keras's, and only a read.
        warnings.filterwarnings("ignore", _NUMPY_ARRAY_COPY,
                                DeprecationWarning)
        expected = _unnamed(keras.saving.serialize_keras_object(
            {**keras_defaults, **defaults}))
        actual = _unnamed(model.get_compile_config() or {})
    return any(actual[k] != v for k, v in expected.items() if k in actual)


_NUMPY_ARRAY_COPY = "__array__ implementation doesn't accept a copy keyword"


def _unnamed(config):
    """A serialized config without the objects' names (Keras makes them
    unique: a second Adam is 'adam_1')."""
    if isinstance(config, dict):
        return {k: _unnamed(v) for k, v in config.items() if k != "name"}
    if isinstance(config, (list, tuple)):
        return [_unnamed(v) for v in config]
    return config
