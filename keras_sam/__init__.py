"""keras-sam: Sharpness-Aware Minimization for Keras 3.

    sam_model = keras_sam.SAMModel(model, rho=0.05)
    sam_model.compile(optimizer="sgd", loss="mse")
    sam_model.fit(x, y)
"""

from keras_sam.model import SAMModel
from keras_sam.perturbation import global_norm, sam_perturbation
from keras_sam.saving import load_model

__version__ = "0.1.0"

__all__ = [
    "SAMModel", "global_norm", "load_model", "sam_perturbation",
    "__version__",
]
