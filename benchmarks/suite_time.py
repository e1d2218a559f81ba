"""How long the test suite takes, per backend run and per test file.

    python benchmarks/suite_time.py                    # the README's command, 3 times
    python benchmarks/suite_time.py --backends tensorflow jax torch --runs 1

Runs `python -m pytest -n 2 --durations=0` (the README's test command, with
every test's time listed) from the repository's root, once per backend run
(`KERAS_SAM_TEST_BACKEND`) and `--runs` times, and prints the median wall
time of each backend run and, per test file, the median over the runs of
the seconds its tests took (setup, call and teardown, summed over both
workers: the work, not the wall time).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import bench

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^([\d.]+)s (?:setup|call|teardown)\s+tests/([^:]+)::")
SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed).*?) in [\d.]+s", re.M)


def one_run(backend: str) -> tuple[float, dict, str]:
    env = dict(os.environ, KERAS_SAM_TEST_BACKEND=backend)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-q", "--durations=0",
         "--durations-min=0"], cwd=ROOT, env=env, capture_output=True,
        text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"the {backend} run failed:\n{done.stdout[-4000:]}")
    per_file: dict = defaultdict(float)
    for line in done.stdout.splitlines():
        match = LINE.match(line)
        if match:
            per_file[match.group(2)] += float(match.group(1))
    counts = SUMMARY.findall(done.stdout)
    return wall, per_file, counts[-1] if counts else "?"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["tensorflow"],
                        choices=("tensorflow", "jax", "torch"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    walls, files, counts = defaultdict(list), {}, {}
    for backend in args.backends:
        for run in range(args.runs):
            wall, per_file, counts[backend] = one_run(backend)
            walls[backend].append(wall)
            for name, seconds in per_file.items():
                files.setdefault((backend, name), []).append(seconds)
            print(f"done: {backend} run {run + 1}: {wall:.0f} s",
                  file=sys.stderr, flush=True)
    bench.table(
        ["run", "tests", "wall (median)", "each run"],
        [[f"KERAS_SAM_TEST_BACKEND={b}", counts[b],
          f"{np.median(walls[b]):.0f} s",
          ", ".join(f"{w:.0f}" for w in walls[b])] for b in args.backends],
        caption=f"`python -m pytest -n 2` per backend run, {os.cpu_count()} "
        f"CPU cores, median of {args.runs} run(s); wall time:")
    bench.table(
        ["run", "file", "seconds"],
        [[backend, name, f"{np.median(seconds):.0f}"]
         for (backend, name), seconds in sorted(
             files.items(), key=lambda kv: (kv[0][0], -np.median(kv[1])))],
        caption="Seconds of work per test file (setup + call + teardown, "
        "both workers), median over the runs:")


if __name__ == "__main__":
    main()
