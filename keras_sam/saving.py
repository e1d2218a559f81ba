"""Saving and loading SAM models, with errors that say what to do.

Three ways out of training, for three uses:

    sam_model.save("run.keras")          # resume training: SAMModel, rho,
                                         # weights and optimizer state
    sam_model.model.save("model.keras")  # deploy: the plain model; loads
                                         # where keras_sam is not installed
    sam_model.export("serving_dir")      # serve: an inference SavedModel for
                                         # TF Serving, tf.saved_model.load
"""

from __future__ import annotations

import contextlib
import os
import zipfile

import keras

_FORMATS = (
    "`sam_model.save('run.keras')` writes the whole SAM model (wrapped model, "
    "rho, optimizer state) for resuming training; "
    "`sam_model.model.save('model.keras')` writes the plain trained model, "
    "which loads without keras_sam; `sam_model.export('serving_dir')` writes "
    "an inference SavedModel for TF Serving and `tf.saved_model.load`."
)


def check_save_path(filepath) -> None:
    """Raise, before anything is written, for a path `save` cannot take."""
    path = os.fspath(filepath)
    if path.endswith(".keras"):
        return
    if path.endswith((".h5", ".hdf5")):
        stem = path.rsplit(".", 1)[0]
        raise ValueError(
            f"Cannot save a SAMModel to '{path}': HDF5 is Keras's legacy "
            "whole-model format, which would reload only with "
            "`custom_objects`. Save to `.keras` instead: "
            f"`sam_model.save('{stem}.keras')`. For an HDF5 file of the "
            f"weights alone, `sam_model.save_weights('{stem}.weights.h5')`. "
            + _FORMATS)
    raise ValueError(
        f"Cannot save a SAMModel to '{path}': `save` needs a file name "
        "ending in `.keras` (Keras 3 has no SavedModel `save`). " + _FORMATS
    )


def load_model(filepath, custom_objects=None, compile=True, **kwargs):
    """`keras.saving.load_model`, with clear errors for the usual mistakes.

    A missing file, a truncated or corrupted `.keras` archive and a
    SavedModel directory each get a message that names the problem and what
    to do, instead of Keras's generic one. keras_sam is imported, so a saved
    `SAMModel` deserializes.

    Args:
        filepath: the `.keras` file.
        custom_objects: as for `keras.saving.load_model`.
        compile: as for `keras.saving.load_model`: restore the compiled
            optimizer, loss and metrics.
        **kwargs: passed to `keras.saving.load_model` (`safe_mode`, ...).

    Returns:
        The model, a `SAMModel` for a file that `SAMModel.save` wrote.

    Raises:
        ValueError: `filepath` is missing, a directory (a SavedModel: load
            it with `tf.saved_model.load` or `keras.layers.TFSMLayer`), or a
            truncated or corrupted archive.

    Example:

    ```python
    sam_model.save("run.keras")
    sam_model = keras_sam.load_model("run.keras")   # resumes training
    ```
    """
    path = os.fspath(filepath)
    if os.path.isdir(path):
        raise ValueError(
            f"'{path}' is a directory (a SavedModel from `export`?). A "
            "SavedModel is for serving: load it with "
            f"`tf.saved_model.load('{path}')` or "
            f"`keras.layers.TFSMLayer('{path}', call_endpoint='serve')`. "
            "To resume training, load the `.keras` file that "
            "`sam_model.save(...)` wrote.")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No file at '{path}'.")
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise ValueError(
            f"'{path}' is not a valid `.keras` archive: the file is "
            f"truncated or corrupted ({os.path.getsize(path)} bytes; a "
            "`.keras` file is a zip archive). Save the model again, or load "
            "the last good checkpoint (ModelCheckpoint, BackupAndRestore).")
    if path.endswith(".keras"):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            bad = str(error)
        if bad is not None:
            raise ValueError(
                f"'{path}' is a damaged `.keras` archive ({bad} fails its "
                "checksum). Save the model again, or load the last good "
                "checkpoint.")
    return keras.saving.load_model(path, custom_objects=custom_objects,
                                   compile=compile, **kwargs)


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


def load_weights(model, filepath, **kwargs):
    """`model.load_weights(filepath)` for any Keras model, all or nothing.

    Keras's own `load_weights` writes layer by layer, so a file of another
    architecture may leave the first layers overwritten before it fails.
    Here weights that do not fit leave every variable as it was, and the
    error lists the model's weights and the file's. A SAMModel's
    `load_weights` does this itself.

    Args:
        model: any Keras model, plain or `SAMModel`.
        filepath: a `.weights.h5` file, from a plain model or a SAMModel
            (both layouts load into both).
        **kwargs: passed to `model.load_weights`.

    Returns:
        What `model.load_weights` returns (None).

    Raises:
        ValueError: the file's weights do not fit `model`: the message
            lists both sides with their shapes, and nothing changed.

    Example:

    ```python
    plain = build_model()
    keras_sam.load_weights(plain, "sam.weights.h5")   # a SAM run's file
    ```
    """
    with all_or_nothing(model):
        try:
            return model.load_weights(filepath, **kwargs)
        except ValueError as error:
            if not os.path.exists(os.fspath(filepath)) or \
                    "do not fit this model" in str(error):
                raise
            raise ValueError(describe_weight_mismatch(
                model, filepath, error)) from error


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
