"""Does SAM help fine-tuning? AdamW against the SAM family, from a
pretrained start, in full and with LoRA.

    python benchmarks/finetune.py                  # 3 seeds, ~15 min on 2 cores
    python benchmarks/finetune.py --seeds 1 --only AdamW "SAM rho=0.05"

The pretrained start, the task and its two held-out sets are those of
examples/finetune_kerashub.py: a 2-layer BERT pretrained as a masked LM on
generated reviews and loaded with `TextClassifier.from_preset(folder)`;
128 labeled reviews; a held-out set drawn as the training set and a shifted
one (other sentiment words, more negations). Every run uses AdamW at the
example's step (5e-4 full, 3e-3 for LoRA's adapters), batch 16, 10 epochs;
SAM wraps the same optimizer. "AdamW from random weights" trains the same
classes built from config, without the preset: what pretraining is worth.
With LoRA, SAM perturbs what is trained (the adapters A and B, and the
head); "Random e" (`direction="random"`) puts its noise on the merged
weights W + BA instead of A and B (Flat-LoRA). Columns: mean ± standard
deviation over seeds of both accuracies; per seed, the difference to
AdamW's run on the same seed (same data, same head), in points; the median
milliseconds per step of `fit` (the whole loop: the task's preprocessing
included) and its ratio to AdamW's; TensorFlow's peak memory over the
run's resident.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.finetune_kerashub import header, run_all, table  # noqa: E402

RUNS = {
    "AdamW": None,
    "AdamW from random weights": dict(start="random"),
    "SAM rho=0.02": dict(rho=0.02),
    "SAM rho=0.05": dict(rho=0.05),
    "SAM rho=0.1": dict(rho=0.1),
    "SAM rho=0.3": dict(rho=0.3),
    "SAM rho=1.0": dict(rho=1.0),
    "ASAM rho=0.5": dict(rho=0.5, adaptive=True),
    "MSAM rho=0.05": dict(rho=0.05, direction="momentum"),
    "Random e rho=0.05": dict(rho=0.05, direction="random"),
    "Random e rho=0.2": dict(rho=0.2, direction="random"),
    "Random e rho=0.5": dict(rho=0.5, direction="random"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds first..first+seeds-1 (data and head)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--only", nargs="+", choices=list(RUNS),
                        help="the runs to take (AdamW always)")
    parser.add_argument("--lora", nargs="+", type=int, default=[0, 4],
                        help="LoRA ranks; 0 trains the whole model")
    parser.add_argument("--cache", default=None,
                        help="folder of the pretrained preset")
    args = parser.parse_args(argv)
    runs = {name: sam for name, sam in RUNS.items()
            if not args.only or name == "AdamW" or name in args.only}
    rows = run_all(runs, [rank or None for rank in args.lora], args.seeds,
                   args.epochs, args.cache, args.first_seed)
    print(f"\n{header(args.seeds, args.epochs, args.first_seed)}; backend "
          f"{os.environ['KERAS_BACKEND']}\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
