"""Weights files: all-or-nothing loads and a layout both models read.

A SAMModel's `.weights.h5` holds the wrapped model's layers under
`layers/<model>/layers/...`, where the plain model looks under `layers/...`;
`link_plain_layout` gives each a second name (HDF5 hard links), so either
model loads the other's file. A load that does not fit leaves every variable
as it was (`all_or_nothing`) and says what both sides hold.
"""

from __future__ import annotations

import contextlib
import os

import keras


@contextlib.contextmanager
def all_or_nothing(model):
    """Every variable of `model` (weights, optimizer state, metrics) back to
    its value before the block if the block raises: a load that fails half
    way leaves nothing half-loaded."""
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        variables += list(optimizer.variables)
    before = [keras.ops.copy(v.value) for v in variables]
    try:
        yield
    except BaseException:
        for v, value in zip(variables, before):
            v.assign(value)
        raise


def describe_weight_mismatch(model, filepath, error: Exception) -> str:
    """The message for weights that do not fit `model`'s architecture."""
    ours = [f"{v.path} {tuple(v.shape)}" for v in model.weights]
    theirs = []
    path = os.fspath(filepath)
    if path.endswith(".h5"):
        try:
            import h5py

            with h5py.File(path, "r") as f:
                f.visititems(lambda name, obj: theirs.append(
                    f"{name} {tuple(obj.shape)}")
                    if isinstance(obj, h5py.Dataset) else None)
        except (OSError, ImportError):
            pass
    lines = [
        f"The weights in '{path}' do not fit this model: they were saved "
        "from a different architecture (other layers, or layers of other "
        "sizes). Load them into the model they were saved from. (Weights "
        "of the plain model this SAMModel wraps load as they are.)",
        f"This model has {len(ours)} weights: " + ", ".join(ours[:12])
        + (" ..." if len(ours) > 12 else ""),
    ]
    if theirs:
        lines.append(f"The file has {len(theirs)}: " + ", ".join(theirs[:12])
                     + (" ..." if len(theirs) > 12 else ""))
    lines.append(f"Keras said: {error}")
    return "\n".join(lines)


def _is_h5(path: str) -> bool:
    return path.endswith(".weights.h5") and os.path.isfile(path)


def is_plain_layout(sam, filepath) -> bool:
    """Whether `filepath` is a weights file of the plain wrapped model
    (`model.save_weights`) rather than of a SAMModel: it lacks the group
    under which a SAMModel stores the model it wraps."""
    path = os.fspath(filepath)
    if not _is_h5(path):
        return False
    import h5py

    from keras_sam import _keras_compat

    key = f"layers/{_keras_compat.wrapped_model_key(sam)}"
    with h5py.File(path, "r") as f:
        return key not in f


def link_plain_layout(sam, filepath) -> None:
    """Make a SAMModel's weights file readable as the wrapped model's too.

    A SAMModel's file holds the wrapped model's layers under
    `layers/<model>/layers/...`; the plain model looks for them under
    `layers/...`. Each of them gets a second name at the top (an HDF5 hard
    link: no data is copied). Keras reads only the entries it looks for, so
    either model loads the file.
    """
    path = os.fspath(filepath)
    if not _is_h5(path):
        return
    import h5py

    from keras_sam import _keras_compat

    model = f"layers/{_keras_compat.wrapped_model_key(sam)}"
    with h5py.File(path, "a") as f:
        if model not in f:
            return
        # The wrapped model's own variables (a subclassed model's
        # `add_weight`): the SAMModel has none of its own, so its empty
        # `vars` group can name the wrapped model's instead.
        if "vars" in f and not len(f["vars"]) and \
                len(f[model].get("vars", ())):
            del f["vars"]
        _link_missing(f[model], f)


def _link_missing(source, target) -> None:
    """Give every entry of `source` a name in `target` where `target` has
    none, merging groups that both have (HDF5 hard links: nothing is
    copied)."""
    for name, item in source.items():
        if name not in target:
            target[name] = item
        elif isinstance(item, type(source)) and \
                isinstance(target[name], type(source)) and \
                target[name] != item:
            _link_missing(item, target[name])
