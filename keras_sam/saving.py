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
    if path.endswith((".keras", ".h5", ".hdf5")):
        return
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
        "sizes). Load them into the model they were saved from, or pass "
        "`skip_mismatch=True` to load only the layers that fit.",
        f"This model has {len(ours)} weights: " + ", ".join(ours[:12])
        + (" ..." if len(ours) > 12 else ""),
    ]
    if theirs:
        lines.append(f"The file has {len(theirs)}: " + ", ".join(theirs[:12])
                     + (" ..." if len(theirs) > 12 else ""))
    lines.append(f"Keras said: {error}")
    return "\n".join(lines)
