"""The KerasHub zoo (tests/hub_zoo.py): every task class is listed, and a
sample of the families trains under SAMModel(task, rho=0) exactly as under
task.fit. `python benchmarks/kerashub_zoo.py` runs every built class and
prints docs/results/kerashub_zoo.md; the classes tested elsewhere (text and
image classifiers, causal and seq2seq LMs, BASNet) are in test_kerashub.py.
"""

import pytest

keras_hub = pytest.importorskip("keras_hub")

import hub_zoo  # noqa: E402

pytestmark = pytest.mark.tensorflow_only


def test_every_task_class_is_built_or_says_why_not():
    names = hub_zoo.task_classes()
    assert len(names) > 50
    unknown = sorted(set(hub_zoo.BUILDERS) | set(hub_zoo.NOT_BUILT))
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
