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
