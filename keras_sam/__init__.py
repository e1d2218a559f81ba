"""keras-sam: Sharpness-Aware Minimization for Keras 3.

    sam_model = keras_sam.SAMModel(model, rho=0.05)
    sam_model.compile(optimizer="sgd", loss="mse")
    sam_model.fit(x, y)
"""

from keras_sam import analysis, callbacks, schedules, selection, variants
from keras_sam.model import SAMModel
from keras_sam.perturbation import global_norm, perturbation, sam_perturbation
from keras_sam.saving import load_model, load_weights

__version__ = "0.1.0"

__all__ = [
    "SAMModel", "analysis", "callbacks", "global_norm", "load_model",
    "load_weights",
    "perturbation",
    "sam_perturbation", "schedules", "selection", "variants", "__version__",
]
