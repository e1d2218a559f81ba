"""The KerasHub zoo (tests/hub_zoo.py): every task class is listed, and a
sample of the families trains under SAMModel(task, rho=0) exactly as under
task.fit. `python benchmarks/kerashub_zoo.py` runs every built class and
prints docs/results/kerashub_zoo.md; the classes tested elsewhere (text and
image classifiers, causal and seq2seq LMs, BASNet) are in test_kerashub.py.
"""

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import hub_zoo  # noqa: E402

pytestmark = pytest.mark.tensorflow_only


def test_every_task_class_is_built_or_says_why_not():
    names = hub_zoo.task_classes()
    assert len(names) > 50
    unknown = sorted(set(hub_zoo.BUILDERS) | set(hub_zoo.NOT_BUILT)
                     | set(hub_zoo.UNTRAINABLE))
    assert set(unknown) <= set(names), "stale names in hub_zoo"
    for name in names:
        assert hub_zoo.status(name)   # "built" or a reason
    # The classes with a compute_loss of their own are known.
    assert {"BASNetImageSegmenter", "RetinaNetObjectDetector"} <= {
        n for n in names if hub_zoo.own_compute_loss(n)}


# One per family not covered in test_kerashub.py: a masked LM (fed its
# preprocessor's batches), an object detector with its own compute_loss
# (anchor matching), a BatchNorm image classifier (MobileNet: under Adam a
# second pass at e = 0 showed, as its gradient rounds apart from pass 1's;
# a constant rho = 0 takes none), a causal LM with a
# SentencePiece tokenizer (a proto trained in memory); the rest in
# benchmarks/kerashub_zoo.py.
@pytest.mark.parametrize("name", ["BertMaskedLM", "RetinaNetObjectDetector",
                                  "MobileNetImageClassifier",
                                  "GemmaCausalLM"])
def test_rho_0_is_task_fit(name):
    result = hub_zoo.conformance(name)
    assert result["loss_gap"] <= 1e-6, result
    assert result["weight_gap"] <= 1e-6, result
    assert result["predict_gap"] is None or result["predict_gap"] <= 1e-5
    assert result["same_logs"], result
    assert result["step_finite"] and result["moved"] > 0, result


@pytest.mark.parametrize("name", sorted(hub_zoo.UNTRAINABLE))
def test_a_task_its_own_fit_cannot_train_fails_the_same_way(name):
    import keras_sam

    build = hub_zoo.UNTRAINABLE[name][0]
    task, x, y = build()
    with pytest.raises(Exception) as own:
        task.fit(x, y, epochs=1, verbose=0)
    twin, _, _ = build()
    start = [w.copy() for w in twin.get_weights()]
    sam = keras_sam.SAMModel(twin, rho=0.0)
    sam.compile(optimizer="adam", loss=task.loss)
    with pytest.raises(Exception) as wrapped:
        sam.fit(x, y, epochs=1, verbose=0)
    # The task's reason, in both errors.
    assert isinstance(own.value, NotImplementedError)
    for error in (own.value, wrapped.value):
        assert "cannot be called standalone" in str(error)
    for before, after in zip(start, twin.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_inference_only_tasks_are_refused():
    """KerasHub's tasks whose `fit` raises (Stable Diffusion 3, Flux, SAM)
    are refused by SAMModel rather than trained by Keras's fit."""
    from keras_sam import objective

    refused = [n for n in hub_zoo.task_classes()
               if objective.overrides(getattr(keras_hub.models, n), "fit")]
    assert {"StableDiffusion3TextToImage", "SAMImageSegmenter"} <= set(refused)
    for name in refused:
        cls = getattr(keras_hub.models, name)
        with pytest.raises(NotImplementedError):
            cls.fit(object.__new__(cls))
        assert "inference only" in hub_zoo.status(name)
