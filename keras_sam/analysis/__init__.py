"""Seeing sharpness: measure the curvature of any compiled Keras model.

    sharpness            max_{||e|| <= rho} L(w + e) - L(w), first order or
                         by projected ascent; L2 or ASAM's adaptive ball
    hessian_eigenvalues  the k largest eigenvalues of the Hessian of L
                         (Lanczos on Hessian-vector products)
    hessian_trace        tr(H) by Hutchinson's estimator, with its standard
                         error
    loss_landscape       L along random filter-normalized directions (1-D or
                         a 2-D grid), or along the line to other weights
    plot_landscape_1d, plot_landscape_2d
                         pictures of those (matplotlib)

L is the compiled loss plus `model.losses` (the objective that training
minimizes, regularizers included), averaged over all examples, in inference
mode (no dropout; BatchNorm with its moving statistics). No function here
changes the weights. For watching these during training, see
`keras_sam.callbacks.SharpnessMonitor`.
"""

from keras_sam.analysis.hessian import hessian_eigenvalues, hessian_trace
from keras_sam.analysis.landscape import (filter_normalized_direction,
                                          loss_landscape)
from keras_sam.analysis.plots import plot_landscape_1d, plot_landscape_2d
from keras_sam.analysis.sharpness import sharpness

__all__ = [
    "filter_normalized_direction", "hessian_eigenvalues", "hessian_trace",
    "loss_landscape", "plot_landscape_1d", "plot_landscape_2d", "sharpness",
]
