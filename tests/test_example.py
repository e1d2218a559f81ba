"""The README's example runs end to end (shortened)."""

import importlib.util
import pathlib

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "mnist1d_sam.py"


def test_mnist1d_example_runs_and_reports_both_optimizers():
    spec = importlib.util.spec_from_file_location("mnist1d_sam", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (x_train, _), (x_test, _) = module.load_mnist1d()
    assert x_train.shape == (4000, 40, 1) and x_test.shape == (1000, 40, 1)
    results = module.main(["--epochs", "2", "--seeds", "1", "--verbose",
                           "0"])
    for name in ("SGD", "SAM"):
        run = results[name][0]
        assert run["test_acc"] > 0.2  # ten classes: well above chance
        assert run["sharpness"] > 0
