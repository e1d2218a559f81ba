"""Which variables SAM perturbs: the `perturb` argument of `SAMModel`.

`perturb=None` perturbs every trainable variable. Otherwise `perturb` is a
predicate on variables; the variables it rejects get e = 0 and stay out of
every norm, but are still updated with the SAM gradient. Any callable works:

    SAMModel(model, perturb=lambda v: "bias" not in v.path)

A lambda is saved in the `.keras` file as Python bytecode, which Keras loads
only with `keras.saving.load_model(path, safe_mode=False)`. To save and load
safely, use a preset below or a registered class with `get_config`:

    @keras.saving.register_keras_serializable(package="my_project")
    class SkipEmbeddings(keras_sam.selection.Selection):
        def select(self, variable, layer):
            return not isinstance(layer, keras.layers.Embedding)

A `Selection` also sees the layer that owns each variable.
"""

from __future__ import annotations

import keras

__all__ = ["NoBiasNoNormalization", "NoEmbeddings", "NormalizationOnly",
           "Selection"]

NORMALIZATION_LAYERS = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
) + ((keras.layers.RMSNormalization,)
     if hasattr(keras.layers, "RMSNormalization") else ())


class Selection:
    """A serializable `perturb` predicate that also sees the owning layer.

    Subclass it, implement `select(variable, layer)` (True: perturb this
    variable) and register the class, so that `.keras` files save and load
    it without `safe_mode=False`. Arguments of `__init__` belong in
    `get_config`.

    Example:

    ```python
    @keras.saving.register_keras_serializable(package="my_project")
    class KernelsOnly(keras_sam.selection.Selection):
        def select(self, variable, layer):
            return variable.path.endswith("kernel")

    sam_model = keras_sam.SAMModel(model, rho=0.05, perturb=KernelsOnly())
    ```
    """

    def select(self, variable, layer) -> bool:
        raise NotImplementedError

    def __call__(self, variable, layer=None) -> bool:
        return bool(self.select(variable, layer))

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@keras.saving.register_keras_serializable(package="keras_sam")
class NormalizationOnly(Selection):
    """SAM-ON (Mueller et al., 2023): perturb only the scale and offset of
    normalization layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm); use a
    larger rho than for full SAM (the paper goes up to 10x).

    Example:

    ```python
    sam_model = keras_sam.SAMModel(
        model, rho=0.5, perturb=keras_sam.selection.NormalizationOnly())
    ```
    """

    def select(self, variable, layer) -> bool:
        return isinstance(layer, NORMALIZATION_LAYERS)


@keras.saving.register_keras_serializable(package="keras_sam")
class NoBiasNoNormalization(Selection):
    """Perturb weight matrices and kernels only: biases (1-D variables of
    non-normalization layers) and normalization parameters keep e = 0, as
    weight decay commonly leaves them out.

    Example:

    ```python
    sam_model = keras_sam.SAMModel(
        model, rho=0.05, perturb=keras_sam.selection.NoBiasNoNormalization())
    ```
    """

    def select(self, variable, layer) -> bool:
        if isinstance(layer, NORMALIZATION_LAYERS):
            return False
        return len(variable.shape) > 1


@keras.saving.register_keras_serializable(package="keras_sam")
class NoEmbeddings(Selection):
    """Everything but `Embedding` tables (token and position embeddings),
    whose rows a batch touches only in part.

    Example:

    ```python
    sam_model = keras_sam.SAMModel(
        model, rho=0.05, perturb=keras_sam.selection.NoEmbeddings())
    ```
    """

    def select(self, variable, layer) -> bool:
        return not isinstance(layer, keras.layers.Embedding)


def owning_layers(model: keras.Model) -> dict:
    """{id(variable): the layer that created it} for `model`'s variables."""
    owners = {}
    for layer in model._flatten_layers(include_self=True):
        for v in layer._trainable_variables + layer._non_trainable_variables:
            owners.setdefault(id(v), layer)
    return owners


def perturbed_mask(perturb, variables, model: keras.Model) -> list:
    """`selected`, with a clear error when `perturb` selects nothing."""
    mask = selected(perturb, variables, model)
    if variables and not any(mask):
        raise ValueError(
            f"`perturb`={perturb!r} selects none of the {len(variables)} "
            f"trainable variables of '{model.name}', so SAM would be the "
            "base optimizer. Pass a predicate that accepts some variables "
            "(e.g. `lambda v: 'bias' not in v.path`), or perturb=None.")
    return mask


def selected(perturb, variables, model: keras.Model) -> list:
    """[bool] for each variable: whether `perturb` lets SAM perturb it."""
    if perturb is None:
        return [True] * len(variables)
    if isinstance(perturb, Selection):
        owners = owning_layers(model)
        return [perturb(v, owners.get(id(v))) for v in variables]
    return [bool(perturb(v)) for v in variables]
