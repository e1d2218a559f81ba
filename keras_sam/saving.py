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

from keras_sam.weights_file import (all_or_nothing, describe_weight_mismatch,
                                    is_plain_layout, link_plain_layout)

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


class Saving:
    """`SAMModel`'s files: `.keras` to resume, the plain model's layout in
    its weights files, and loads that are all or nothing."""

    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """Saves the SAM model (wrapped model, `rho`, optimizer state) as a
        `.keras` file, to resume training. `keras.saving.load_model` reads it
        back once keras_sam is imported. To deploy, save the plain model
        instead: `sam_model.model.save("model.keras")`; to serve,
        `sam_model.export(dirpath)`."""
        check_save_path(filepath)
        return super().save(filepath, overwrite=overwrite, zipped=zipped,
                            **kwargs)

    def export(self, filepath, format="tf_saved_model", verbose=None,
               input_signature=None, **kwargs):
        """Exports the wrapped model for inference (a SavedModel by default).

        SAM changes training only, so the artifact is the wrapped model's
        and its outputs equal `sam_model.predict`; serving it needs neither
        keras_sam nor this class.
        """
        return self.model.export(filepath, format=format, verbose=verbose,
                                 input_signature=input_signature, **kwargs)

    def save_weights(self, filepath, overwrite=True, max_shard_size=None):
        """Saves the weights (wrapped model, optimizer, variant state).

        The file also reads as the wrapped model's own weights file:
        `plain_model.load_weights(path)` loads it, so checkpoints written
        during SAM training (`ModelCheckpoint(save_weights_only=True)`) go
        straight to a model without keras_sam.
        """
        result = super().save_weights(filepath, overwrite=overwrite,
                                      max_shard_size=max_shard_size)
        if max_shard_size is None:
            link_plain_layout(self, filepath)
        return result

    def load_own_variables(self, store):
        # A SAMModel has no variables of its own (the wrapped model and the
        # variant state hold them); its weights files may name the wrapped
        # model's own variables at the top (see `save_weights`).
        if self._trainable_variables or self._non_trainable_variables:
            super().load_own_variables(store)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Loads weights saved from this SAMModel, or from the plain model
        it wraps (`model.save_weights`): pretrained weights go straight into
        SAM fine-tuning. A file that does not fit changes nothing: every
        variable keeps its value, and the error lists both sides."""
        with all_or_nothing(self):
            if is_plain_layout(self, filepath):
                try:
                    return self.model.load_weights(
                        filepath, skip_mismatch=skip_mismatch, **kwargs)
                except ValueError as error:
                    raise ValueError(describe_weight_mismatch(
                        self, filepath, error)) from error
            try:
                return super().load_weights(filepath,
                                            skip_mismatch=skip_mismatch,
                                            **kwargs)
            except ValueError as error:
                if not os.path.exists(filepath):
                    raise
                try:   # a plain model's file that happens to have that group
                    return self.model.load_weights(filepath, **kwargs)
                except ValueError:
                    pass   # the outer block puts every variable back
                raise ValueError(describe_weight_mismatch(
                    self, filepath, error)) from error
