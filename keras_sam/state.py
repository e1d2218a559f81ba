"""Training state that a SAM variant keeps between steps."""

from __future__ import annotations

import keras


class LookSAMState(keras.layers.Layer):
    """LookSAM's stored direction g_v, one buffer per trainable variable of
    the wrapped model, and its norm. A layer of its own, so that weights
    files keep the wrapped model's layout (see `SAMModel.save_weights`)."""

    def __init__(self, variables, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.directions = [
            self.add_weight(shape=v.shape, dtype=v.dtype, initializer="zeros",
                            trainable=False, name="g_v_" + v.name,
                            aggregation="only_first_replica")
            for v in variables]
        # ||g_v||, kept with g_v: the steps in between need only this.
        self.norm = self.add_weight(shape=(), dtype="float32",
                                    initializer="zeros", trainable=False,
                                    name="g_v_norm",
                                    aggregation="only_first_replica")
        self.built = True

    def call(self, inputs):
        return inputs
