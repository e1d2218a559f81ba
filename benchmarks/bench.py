"""What the benchmarks share: the backend switch, timing in alternating
rounds, fresh-process children, and the Markdown tables record.py keeps.

    BACKEND = bench.use_backend("tensorflow")  # before Keras is imported
    t = bench.alternate({"base": run_base, "SAM": run_sam}, 9, steps)
    bench.ms(t["SAM"]), bench.ratio(t, "SAM", "base")
    figures = bench.child(["benchmarks/x.py", "--memory-child", "MLP"])
    bench.table(["model", "ms/step"], [["MLP", "1.00"]])

A run is a function `steps -> seconds per step` that blocks until its last
step is done. Rounds alternate the order of the runs (forward, then
backward), so that a machine slowing down or speeding up over the minutes
weighs on every run alike; a ratio is the median over rounds of the
per-round ratio, which cancels what a round shares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable

import numpy as np

Run = Callable[[int], float]


def use_backend(default: str, argv=None) -> str:
    """`--backend NAME` (or `--backend=NAME`) from the command line, else
    `default`, set as KERAS_BACKEND: call it before Keras is imported."""
    argv = sys.argv if argv is None else argv
    backend = default
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            backend = argv[i + 1]
        elif arg.startswith("--backend="):
            backend = arg.split("=", 1)[1]
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return backend


def timed(step: Callable[[], object], sync=lambda out: None) -> Run:
    """A run of `step`: n calls, then `sync` on the last one's output."""
    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            out = step()
        sync(out)
        return (time.perf_counter() - start) / n
    return run


def steps_for(run: Run, seconds: float, probe: int = 5,
              multiple: int = 1) -> int:
    """How many steps of `run` take about `seconds` (at least `multiple`,
    a multiple of it)."""
    per_step = run(probe)
    return max(multiple, multiple * int(seconds / per_step / multiple))


def alternate(runs: dict[str, Run], rounds: int,
              steps: int) -> dict[str, np.ndarray]:
    """{name: seconds per step in each round}, the runs in alternating
    order."""
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(runs[name](steps))
    return {name: np.array(t) for name, t in times.items()}


def ms(times) -> float:
    """Median milliseconds per step."""
    return 1e3 * float(np.median(times))


def ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of a's time over b's."""
    return float(np.median(times[a] / times[b]))


def child(args: list, env: dict | None = None) -> dict:
    """Run `python ARGS` in a fresh process; the JSON on its last line."""
    done = subprocess.run([sys.executable, *map(str, args)],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, **(env or {})})
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(columns: list, rows: list, caption: str | None = None) -> None:
    """Print a Markdown table (cells as given), after its caption."""
    print(f"\n{caption}\n" if caption else "")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |", flush=True)


def fmt(value, spec: str = ".2f") -> str:
    """A figure, or "n/a" where it was not measured (None or NaN)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return format(value, spec)


def device() -> str:
    """The backend's version and what it runs on."""
    import keras

    backend = keras.backend.backend()
    cores = f"{os.cpu_count()} CPU cores"
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        where = f"{d.device_kind} ({d.platform})"
        return f"JAX {jax.__version__} on {where}, Keras {keras.__version__}"
    if backend == "torch":
        import torch

        where = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                 else f"CPU, {cores}")
        return (f"PyTorch {torch.__version__} on {where}, "
                f"Keras {keras.__version__}")
    import tensorflow as tf

    return f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {cores}"
