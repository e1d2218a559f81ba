"""The release artifacts: `python -m build` gives an sdist and a wheel, and
the installed wheel (not this checkout) trains."""

import os
import subprocess
import sys
import textwrap
import zipfile
import tarfile

import pytest

import keras_sam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir",
         str(out), ROOT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return out


def test_build_gives_an_sdist_and_a_wheel_of_this_version(dist):
    version = keras_sam.__version__
    wheel = dist / f"keras_sam-{version}-py3-none-any.whl"
    sdist = dist / f"keras_sam-{version}.tar.gz"
    assert wheel.exists() and sdist.exists(), sorted(os.listdir(dist))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("keras_sam/__init__.py", "keras_sam/momentum.py",
                   "keras_sam/backend/tensorflow/step.py",
                   "keras_sam/backend/jax/step.py",
                   "keras_sam/backend/torch/step.py",
                   "keras_sam/analysis/hessian.py"):
        assert module in names, module
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    metadata = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert f"Version: {version}" in text
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
    assert f"keras_sam-{version}/CHANGELOG.md" in members
    assert f"keras_sam-{version}/LICENSE" in members


def test_the_installed_wheel_trains(dist, tmp_path):
    wheel = next(dist.glob("keras_sam-*.whl"))
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    code = textwrap.dedent("""
        import numpy as np, keras, keras_sam
        print(keras_sam.__file__)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        sam = keras_sam.SAMModel(model, rho=0.05)
        sam.compile(optimizer="sgd", loss="mse")
        x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
        history = sam.fit(x, x[:, :2], epochs=2, verbose=0)
        print("sharpness", history.history["sharpness"][-1])
        """)
    env = dict(os.environ, PYTHONPATH=str(site), KERAS_BACKEND="tensorflow")
    ran = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path),
                         env=env, capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    first = ran.stdout.splitlines()[0]
    assert first.startswith(str(site)), first   # the wheel, not the checkout
    assert "sharpness" in ran.stdout
