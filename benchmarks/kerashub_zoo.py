"""The KerasHub zoo: does SAMModel(task) train what task.fit trains?

    python benchmarks/kerashub_zoo.py                 # every task class
    python benchmarks/kerashub_zoo.py --only BertMaskedLM GPT2CausalLM

For every task class that `keras_hub.models` exports, built offline from a
small config where `tests/hub_zoo.py` knows how (random weights, in-memory
vocabularies, small images): `task.fit` and `SAMModel(twin, rho=0).fit` on
the same raw inputs (2 epochs, batches of 4, the task's default compile),
then one SAM step at rho = 0.05. Gaps are the largest difference over the
largest value (per tensor for weights, at least 1e-3 of scale); 0 is bit
for bit. Every other class is listed with why it was not compared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

import keras  # noqa: E402

import bench  # noqa: E402
import hub_zoo  # noqa: E402


def _gap(value) -> str:
    return "n/a" if value is None else ("0" if value == 0 else f"{value:.1e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="task class names")
    args = parser.parse_args(argv)
    names = hub_zoo.task_classes()
    if args.only:
        names = [n for n in names if n in args.only]
    rows, skipped = [], []
    for name in names:
        if hub_zoo.status(name) != "built":
            skipped.append((name, hub_zoo.status(name)))
            continue
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = hub_zoo.conformance(name)
            except Exception as error:   # a finding: the row says so
                result = {"error": f"{type(error).__name__}: {error}"[:120]}
        keras.backend.clear_session()
        rows.append((name, result, time.perf_counter() - start))
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)

    table = []
    for name, r, _ in rows:
        own = "yes" if hub_zoo.own_compute_loss(name) else ""
        if "error" in r:
            table.append([name, own, "", "", "", "", "",
                          f"error: {r['error']}"])
            continue
        same_loss = r["loss_gap"] <= 1e-6 and r["same_logs"]
        works = r["step_finite"] and r["moved"] > 0
        verdict = ("DIFFERS" if not (same_loss and works) else "conformant"
                   if r["weight_gap"] <= 1e-6 else
                   "same loss and logs; weights apart (see below)")
        step = (f"finite, moves {r['moved']:.1e}" if r["step_finite"]
                else "NOT finite")
        table.append([name, own, _gap(r["loss_gap"]), _gap(r["weight_gap"]),
                      _gap(r["predict_gap"]),
                      "same" if r["same_logs"] else "DIFFER", step, verdict])
    bench.table(
        ["task class", "own compute_loss", "loss gap", "weight gap",
         "predict gap", "logs", "rho=0.05 step", "verdict"], table,
        caption=f"SAMModel(task, rho=0).fit against task.fit, "
        f"{keras.backend.backend()}, keras-hub "
        f"{__import__('keras_hub').__version__}: the largest relative gap "
        "in the epoch losses, the weights and predict; whether the logs "
        "are task.fit's plus sharpness; one step at rho = 0.05.")
    bench.table(
        ["task class", "own compute_loss", "why not compared"],
        [[name, "yes" if hub_zoo.own_compute_loss(name) else "", why]
         for name, why in skipped],
        caption=f"{len(rows)} task classes built and compared, "
        f"{len(skipped)} not:")


if __name__ == "__main__":
    main()
