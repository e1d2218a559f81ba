"""The few Keras internals keras_sam relies on, gathered in one place.

Each entry says why it is needed, so that a Keras upgrade that moves one of
them breaks here, with a clear name, and nowhere else.
"""

from __future__ import annotations

from keras import ops


def unscale_loss_for_distribution(value):
    """Undo the 1 / num_replicas that Keras applies to the loss of a replica.

    Keras divides each replica's loss by the number of replicas so that the
    summed gradients are a mean; the logged loss is multiplied back. Keras's
    own helper is private (`keras.src.losses.loss`), so it is mirrored here.
    """
    import tensorflow as tf

    num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if num_replicas > 1:
        value = ops.multiply(value, ops.cast(num_replicas, value.dtype))
    return value


def ensure_built(model, data) -> None:
    """Create the model's, metrics' and optimizer's variables before a step.

    Keras builds an unbuilt model lazily, in its first forward pass inside the
    traced train step. The SAM step needs every variable (and the optimizer's
    slots) before pass 1, to read the state that pass 2 starts from and to
    keep the optimizer's variable creation out of the conditional update.
    `Trainer._symbolic_build` builds everything from shapes alone, without
    adding ops to the step; Keras itself calls it before `fit` under a
    distribution strategy.
    """
    built = all(layer.built for layer in model._flatten_layers())
    if built and model.optimizer.built:
        return
    model._symbolic_build(data_batch=data)


def symbolic_build_from_local_batch(model, iterator=None, data_batch=None):
    """Keras's `_maybe_symbolic_build`, without a cross-worker reduce.

    Workaround for keras-team/keras issue 20585: under
    `MultiWorkerMirroredStrategy`, Keras 3 (checked up to 3.15) builds the
    model from the MEAN over replicas of the first batch, a cross-worker
    `strategy.reduce` of the data itself that fails with "Attempt to convert
    a value (PerReplica ...) ... to a Tensor", so `fit` fails for every model.
    Building needs only shapes and dtypes, which the local replica's shard
    has. tests/test_multi_worker.py tells when Keras no longer needs this.
    """
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None:
        return  # Keras builds in the first traced step, as it does itself.
    import tensorflow as tf
    from keras import tree

    if iterator is not None:
        for _, _, it in iterator:
            data_batch = tree.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v,
                next(it))
            break
    with strategy.scope():
        model._symbolic_build(data_batch=data_batch)
        model.build_sam_state()


def logs_for_multi_worker(model, logs):
    """Step logs in the shape Keras's multi-worker reduction expects.

    Workaround for keras-team/keras issue 20585, second part: under
    `MultiWorkerMirroredStrategy` Keras 3 reduces the step's logs with
    `strategy.reduce("MEAN", value, axis=0)`, which rejects the scalar logs
    every step returns ("Invalid reduction dimension 0 for input with 0
    dimensions"). Each scalar becomes a 1-element vector, which that
    reduction averages over the replicas back into a scalar. Elsewhere the
    logs pass through unchanged.
    """
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None:
        return logs
    import tensorflow as tf
    from keras import tree

    in_multi_worker = getattr(getattr(strategy, "extended", None),
                              "_in_multi_worker_mode", lambda: False)
    if strategy is None or not in_multi_worker():
        return logs
    return tree.map_structure(
        lambda t: tf.reshape(t, [1]) if tf.is_tensor(t) and t.shape.rank == 0
        else t, logs)


def compile_hint(sam, method_name=None) -> str:
    """The message for a SAMModel used before `compile`, naming the usual
    mistake: compiling the wrapped model instead of the SAMModel."""
    action = f"`{method_name}`" if method_name else "training"
    from keras_sam import hub

    if hub.is_task(sam.model):
        return (
            f"Compile the SAMModel before {action}: `sam_model.compile()` "
            f"sets what `{sam.model.name}.compile()` sets (the task's "
            "defaults); pass `optimizer=...` and others to change them.")
    if sam.model.compiled:
        return (
            f"The SAMModel is not compiled, but the model it wraps "
            f"('{sam.model.name}') is. SAM trains through the SAMModel, so "
            f"compile that one before {action}: "
            "`sam_model.compile(optimizer=..., loss=..., metrics=...)` "
            "(which compiles the wrapped model again with what it is "
            "given).")
    return (
        f"Compile the SAMModel before {action}: `sam_model.compile("
        "optimizer=..., loss=..., metrics=...)`. Compile the SAMModel "
        "itself, not the model it wraps.")


def wrapped_model_key(sam) -> str:
    """The name under which Keras's weights files store the wrapped model
    (the snake-case class name, as `keras.src.saving.saving_lib` names
    the entries of a layer list)."""
    from keras.src.utils.naming import to_snake_case

    return to_snake_case(type(sam.model).__name__)


def batches(x, y=None, sample_weight=None, batch_size=None):
    """(x, y, sample_weight) batches of anything `Model.evaluate` takes
    (arrays, tf.data, PyDataset, generators), through Keras's own data
    adapters (`keras.src.trainers.data_adapters`)."""
    import keras
    from keras.src.trainers.data_adapters import get_data_adapter

    adapter = get_data_adapter(x, y, sample_weight=sample_weight,
                               batch_size=batch_size, shuffle=False)
    iterator = (adapter.get_tf_dataset()
                if keras.backend.backend() == "tensorflow"
                else adapter.get_numpy_iterator())
    for batch in iterator:
        yield keras.utils.unpack_x_y_sample_weight(batch)


def to_numpy(x):
    """`x` (a backend tensor, a Keras variable, a Python or NumPy value) as
    a NumPy array, without a DeprecationWarning.

    `keras.ops.convert_to_numpy` ends in `np.array(x)`, which NumPy 2
    deprecates for the `__array__` of Keras variables and of PyTorch tensors
    (no `copy` keyword): each tensor reads itself here instead (for the
    host-side checks and analysis results, never inside a step).
    """
    import keras
    import numpy as np

    if isinstance(x, keras.Variable):
        x = x.value
    if hasattr(x, "detach") and hasattr(x, "cpu"):   # a PyTorch tensor
        x = x.detach().cpu()
        # NumPy has no bfloat16: such values come back as float32, exactly.
        return (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):   # TensorFlow
        return np.asarray(x.numpy())
    return np.asarray(x)


def untrack_batchnorm_axes(model) -> None:
    """Keep each built BatchNormalization's reduction axes as a tuple.

    Keras (checked up to 3.15) stores them as a list attribute, which layer
    tracking turns into a `TrackedList`; on PyTorch, `torch.compile` cannot
    pass that to `torch.mean`, and every BatchNormalization call breaks the
    compiled graph (a break inside a pass also breaks its traced
    `torch.autograd.grad`). The axes never change after `build`; a tuple
    holds the same values and is read the same way by every backend.
    """
    import keras

    for layer in model._flatten_layers():
        axes = getattr(layer, "_reduction_axes", None)
        if isinstance(layer, keras.layers.BatchNormalization) and \
                isinstance(axes, list):
            object.__setattr__(layer, "_reduction_axes", tuple(axes))


def decide_flash_attention(model) -> None:
    """Give each MultiHeadAttention left at `flash_attention=None` the
    value False.

    With None, Keras (checked up to 3.15) asks PyTorch at every call
    whether flash attention applies, by building a `torch.backends.cuda.
    SDPAParams`, which `torch.compile` cannot trace: a graph break per
    attention call, as in Keras's own compiled step. With False, Keras
    calls `scaled_dot_product_attention` without forcing a kernel, and
    PyTorch picks flash attention itself wherever it applies; True (the
    user's or `keras.config.enable_flash_attention()`) is left alone.
    """
    import keras

    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.MultiHeadAttention) and \
                getattr(layer, "_flash_attention", False) is None:
            object.__setattr__(layer, "_flash_attention", False)


def compile_config(model) -> dict:
    """The arguments of `model`'s last `compile`, as Keras keeps them for
    saving (the optimizer before any LossScaleOptimizer wrapped it)."""
    config = getattr(model, "_compile_config", None)
    return dict(config.config) if config is not None else {}


def set_compile_config(model, arguments: dict) -> None:
    """What `model.get_compile_config()` returns, and so what a reloaded
    `.keras` file compiles with: Keras keeps it as a `SerializableDict`."""
    from keras.src.saving.serialization_lib import SerializableDict

    model._compile_config = SerializableDict(**arguments)


def forget_compile_config(model) -> None:
    """`model.get_compile_config()` returns None again (Keras returns the
    stored arguments of a compiled model that has them), so that its own
    `.keras` file loads uncompiled."""
    model.__dict__.pop("_compile_config", None)
