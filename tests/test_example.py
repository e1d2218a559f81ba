"""The examples run end to end (shortened), and print the tables that the
docs show from their full runs (docs/results/)."""

import importlib.util
import pathlib

import numpy as np
import pytest

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


def test_finetune_example_pretrains_once_and_finetunes_from_the_preset(
        tmp_path, monkeypatch, capsys):
    pytest.importorskip("keras_hub")
    spec = importlib.util.spec_from_file_location(
        "finetune_kerashub", EXAMPLE.with_name("finetune_kerashub.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # A short recipe and small held-out sets: the code paths, not the score.
    monkeypatch.setattr(module, "PRETRAIN", dict(
        module.PRETRAIN, reviews=256, epochs=1))
    monkeypatch.setattr(module, "HELD_OUT", 64)
    preset = module.pretrained_preset(str(tmp_path), verbose=0)
    assert (pathlib.Path(preset) / "config.json").exists()
    built = sorted(p.name for p in tmp_path.iterdir())
    assert module.pretrained_preset(str(tmp_path), verbose=0) == preset
    assert sorted(p.name for p in tmp_path.iterdir()) == built  # reused

    import keras_hub
    backbone = keras_hub.models.Backbone.from_preset(preset)
    classifier = module.build_classifier(preset, seed=0)
    for loaded, saved in zip(classifier.backbone.weights, backbone.weights):
        np.testing.assert_array_equal(loaded.numpy(), saved.numpy())

    rows = module.main(["--seeds", "1", "--epochs", "1", "--cache",
                        str(tmp_path)])
    assert {(r["run"], r["weights"]) for r in rows} == {
        (run, "LoRA rank 4" if rank else "full")
        for rank, runs in module.RUNS.items() for run in runs}
    for row in rows:
        assert 0.0 <= row["shifted"] <= 1.0 and row["step_s"] > 0
    assert rows[0]["trainable"] > 10 * rows[-1]["trainable"]  # LoRA: fewer
    assert_same_columns_and_rows(capsys.readouterr().out, "finetune_kerashub")
