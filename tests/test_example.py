"""The examples run end to end (shortened), and print the tables that the
docs show from their full runs (docs/results/)."""

import importlib.util
import pathlib

from test_docs import assert_same_columns_and_rows

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "mnist1d_sam.py"


def test_mnist1d_example_runs_and_reports_both_optimizers(capsys):
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
    assert_same_columns_and_rows(capsys.readouterr().out, "mnist1d_sam")


def test_distributed_example_runs_on_two_logical_devices():
    import os
    import subprocess
    import sys
    script = EXAMPLE.with_name("distributed.py")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(
               filter(None, [str(EXAMPLE.parents[1]),
                             os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(script), "--epochs", "1"],
                         capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MirroredStrategy, 2 replicas" in out.stdout
    assert "| True | whole batch |" in out.stdout
    assert_same_columns_and_rows(out.stdout, "distributed_workers")


def test_landscape_example_writes_its_table_and_pictures(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "landscape", EXAMPLE.with_name("landscape.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--epochs", "2", "--resolution", "5", "--out",
                        str(tmp_path)])
    assert len(rows) == 2
    for row in rows.values():
        assert row["lambda_max"] > 0 and row["trace"] > 0
        assert row["sharpness"] > 0
    for name in ("landscape_1d", "landscape_2d_sgd", "landscape_2d_sam",
                 "interpolation"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert_same_columns_and_rows(capsys.readouterr().out, "landscape")
