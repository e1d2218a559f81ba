"""Gradients on TensorFlow as the SAM step needs them: sparse Embedding
gradients as de-duplicated rows (or dense under XLA), and the fused norm.
"""

from __future__ import annotations

import tensorflow as tf


def densify(grads):
    """Gradients with `tf.IndexedSlices` made dense (None stays None)."""
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
            for g in grads]


def weight_rows(variable, indices):
    """w, or its rows at `indices` for a sparse gradient's rows."""
    value = variable.value
    return value if indices is None else tf.gather(value, indices)


def fused_norm(tensors) -> tf.Tensor:
    """||g||_2 with TensorFlow's fused sum of squares (`tf.nn.l2_loss`, no
    temporary g^2), accumulated in float32."""
    if not tensors:
        return tf.zeros((), tf.float32)
    halves = [tf.nn.l2_loss(t if t.dtype == tf.float32
                            else tf.cast(t, tf.float32)) for t in tensors]
    return tf.sqrt(2.0 * tf.add_n(halves))


def rows(grad, densify: bool):
    """(values, indices) of a gradient: indices is None for a dense one.

    A sparse gradient (`tf.IndexedSlices`, from an Embedding) may list a row
    several times; its rows are summed per unique index, so that its norm and
    its perturbation are those of the dense gradient without building the
    dense table. Under XLA (no dynamic shapes) it is densified instead.
    """
    if not isinstance(grad, tf.IndexedSlices):
        return grad, None
    if densify:
        return tf.convert_to_tensor(grad), None
    unique, positions = tf.unique(grad.indices)
    values = tf.math.unsorted_segment_sum(
        grad.values, positions, tf.shape(unique)[0]
    )
    return values, unique
