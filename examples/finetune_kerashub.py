"""Fine-tune a pretrained KerasHub classifier with AdamW and with SAM, in
full and with LoRA.

    pip install -e ".[hub]"                     # keras-hub and its TensorFlow
    python examples/finetune_kerashub.py        # offline; first run pretrains
    python examples/finetune_kerashub.py --seeds 1 --backend jax

It is the fine-tuning users do with a downloaded preset, on a preset built
offline:

    classifier = keras_hub.models.TextClassifier.from_preset(
        "bert_tiny_en_uncased", num_classes=2)     # here: the local folder
    classifier.backbone.enable_lora(rank=4)        # optional: LoRA
    sam_model = keras_sam.SAMModel(classifier, rho=0.05)
    sam_model.compile(optimizer=keras.optimizers.AdamW(5e-4))
    sam_model.fit(train_texts, train_labels)

The preset: a 2-layer BERT (hidden size 64) pretrained as a masked language
model on 16,384 unlabeled generated reviews and saved with `save_to_preset`
to a cache folder (`$KERAS_SAM_CACHE`, default `~/.cache/keras_sam`). The
first run builds it (about a minute on 2 CPU cores, a progress bar on
stderr); later runs load it. A review has a sentiment; its sentiment words mostly
agree with it, a "not" flips the word after it, so a masked word is
predicted from the others and pretraining learns which words go together.

The task: the review's sentiment from 128 labeled reviews whose sentiment
words come mostly (80%) from one half of each word list. Two held-out sets
of 2,000: one drawn as the training set, one shifted (80% from the other
half, twice the negations), the setting where SAM is said to help.
Printed per run: the accuracy on both (mean and standard deviation over
the seeds, and the difference to AdamW on the same seed), milliseconds per
step of `fit` (the whole loop, the task's preprocessing included), peak
memory over the run's resident (TensorFlow's allocator; "-" elsewhere) and
the trainable weights.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time


def _backend(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
    return None


# --backend wins; without it, KERAS_BACKEND or TensorFlow.
os.environ["KERAS_BACKEND"] = (_backend(sys.argv)
                               or os.environ.get("KERAS_BACKEND", "tensorflow"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's CPU allocator counts its bytes only in this mode.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

POSITIVE = ["good", "great", "fun", "superb", "lovely", "brilliant",
            "charming", "moving", "clever", "fresh", "gripping", "witty",
            "tender", "bold", "stunning", "vivid"]
NEGATIVE = ["bad", "awful", "boring", "dull", "weak", "clumsy", "tedious",
            "bland", "messy", "shallow", "flat", "silly", "stale", "sloppy",
            "lifeless", "hollow"]
FILLER = ["the", "movie", "film", "plot", "acting", "story", "cast",
          "ending", "score", "was", "is", "and", "really", "quite", "very",
          "but", "with", "a", "its", "script"]
VOCABULARY = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "not"]
              + POSITIVE + NEGATIVE + FILLER)
SEQUENCE_LENGTH = 20

# The pretraining recipe; the cached preset's folder is named by its hash.
PRETRAIN = dict(reviews=16384, epochs=8, batch_size=64, learning_rate=3e-3,
                mask_rate=0.25, seed=0, num_layers=2, num_heads=2,
                hidden_dim=64, intermediate_dim=128)
# Where the labeled reviews come from: "common" is the share of sentiment
# words drawn from the first half of their list.
TRAIN = dict(common=0.8, negation=0.2)
SHIFTED = dict(common=0.2, negation=0.4)


def make_reviews(n: int, seed: int, common: float = 0.5,
                 negation: float = 0.25, agree: float = 0.85
                 ) -> tuple[np.ndarray, np.ndarray]:
    """`n` reviews of 6 to 10 slots and their sentiment (1 positive).

    A slot is a filler word (40%) or a sentiment word whose meaning agrees
    with the review's sentiment with probability `agree`; with probability
    `negation` it is written as "not" and a word of the opposite polarity.
    """
    rng = np.random.default_rng(seed)
    half = len(POSITIVE) // 2
    texts, labels = [], []
    for _ in range(n):
        sentiment = 1 if rng.random() < 0.5 else -1
        words = []
        for _ in range(rng.integers(6, 11)):
            if rng.random() < 0.4:
                words.append(str(rng.choice(FILLER)))
                continue
            meaning = sentiment if rng.random() < agree else -sentiment
            negated = rng.random() < negation
            polarity = -meaning if negated else meaning
            listed = POSITIVE if polarity > 0 else NEGATIVE
            part = listed[:half] if rng.random() < common else listed[half:]
            words += (["not"] if negated else []) + [str(rng.choice(part))]
        texts.append(" ".join(words))
        labels.append(int(sentiment > 0))
    return np.array(texts), np.array(labels)


def _tokenizer():
    return keras_hub.models.BertTokenizer(vocabulary=VOCABULARY)


def _backbone(recipe: dict):
    """The BERT of `recipe`, random weights."""
    return keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCABULARY), max_sequence_length=SEQUENCE_LENGTH,
        **{k: recipe[k] for k in ("num_layers", "num_heads", "hidden_dim",
                                  "intermediate_dim")})


def pretrained_preset(cache: str | None = None, recipe: dict | None = None,
                      verbose: int = 1) -> str:
    """The folder of the pretrained masked LM's preset; built and saved with
    `save_to_preset` the first time, loaded from the cache afterwards."""
    recipe = recipe or PRETRAIN
    cache = pathlib.Path(cache or os.environ.get(
        "KERAS_SAM_CACHE", pathlib.Path.home() / ".cache" / "keras_sam"))
    key = hashlib.sha256(json.dumps([recipe, VOCABULARY, SEQUENCE_LENGTH],
                                    sort_keys=True).encode()).hexdigest()
    folder = cache / f"bert_reviews_{key[:12]}"
    if (folder / "config.json").exists():
        return str(folder)
    if verbose:
        print(f"Pretraining the masked LM once, into {folder}",
              file=sys.stderr)
    keras.utils.set_random_seed(recipe["seed"])
    preprocessor = keras_hub.models.BertMaskedLMPreprocessor(
        _tokenizer(), sequence_length=SEQUENCE_LENGTH,
        mask_selection_rate=recipe["mask_rate"], mask_selection_length=5)
    masked_lm = keras_hub.models.BertMaskedLM(_backbone(recipe),
                                              preprocessor=preprocessor)
    masked_lm.compile(
        optimizer=keras.optimizers.AdamW(recipe["learning_rate"]),
        weighted_metrics=["sparse_categorical_accuracy"])
    texts, _ = make_reviews(recipe["reviews"], recipe["seed"] + 1000)
    with contextlib.redirect_stdout(sys.stderr):  # the progress bar
        masked_lm.fit(texts, batch_size=recipe["batch_size"],
                      epochs=recipe["epochs"], verbose=verbose)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    masked_lm.save_to_preset(str(partial))
    partial.rename(folder)  # complete or absent, never half written
    return str(folder)


def build_classifier(preset: str | None, seed: int,
                     lora_rank: int | None = None):
    """A text classifier from the preset, as from a downloaded one; with
    `preset=None` the same classes built from config (random weights)."""
    keras.utils.set_random_seed(seed)
    if preset is None:
        preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
            _tokenizer(), sequence_length=SEQUENCE_LENGTH)
        classifier = keras_hub.models.BertTextClassifier(
            _backbone(PRETRAIN), num_classes=2, preprocessor=preprocessor)
    else:
        preprocessor = keras_hub.models.TextClassifierPreprocessor \
            .from_preset(preset, sequence_length=SEQUENCE_LENGTH)
        classifier = keras_hub.models.TextClassifier.from_preset(
            preset, num_classes=2, preprocessor=preprocessor)
    if lora_rank:
        classifier.backbone.enable_lora(lora_rank)
    return classifier


LABELED, HELD_OUT = 128, 2000


def finetuning_data(seed: int):
    """(train, held out as train, held out shifted), each (texts, labels)."""
    return (make_reviews(LABELED, 10 * seed + 1, **TRAIN),
            make_reviews(HELD_OUT, 10 * seed + 2, **TRAIN),
            make_reviews(HELD_OUT, 10 * seed + 3, **SHIFTED))


def learning_rate(lora_rank: int | None) -> float:
    """AdamW's step: 5e-4 for the whole model, 3e-3 for LoRA's adapters."""
    return 3e-3 if lora_rank else 5e-4


def peak_memory_mb(train) -> float | None:
    """Peak memory allocated while `train()` runs minus the memory in use
    before it (TensorFlow on the CPU only), in MB."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    train()
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    return (peak - before) / 1024.0 ** 2


def finetune(preset: str, sam: dict | None, lora_rank: int | None,
             seed: int, epochs: int = 10, batch_size: int = 16) -> dict:
    """Fine-tune one classifier (`sam` None: AdamW alone, else
    `SAMModel(classifier, **sam)`; `{"start": "random"}`: AdamW from
    random weights); its accuracies, time and memory."""
    sam = dict(sam or {})
    if sam.pop("start", "pretrained") == "random":
        preset = None
    sam = sam or None
    train, test, shifted = finetuning_data(seed)
    classifier = build_classifier(preset, seed, lora_rank)
    model = (classifier if sam is None
             else keras_sam.SAMModel(classifier, **sam))
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate(lora_rank)))
    model.fit(*train, batch_size=batch_size, epochs=1, verbose=0)  # warm up
    steps = epochs * -(-len(train[0]) // batch_size)
    start = time.perf_counter()
    memory = peak_memory_mb(lambda: model.fit(
        *train, batch_size=batch_size, epochs=epochs, verbose=0))
    seconds = (time.perf_counter() - start) / steps
    accuracy = [model.evaluate(*data, verbose=0, return_dict=True)[
        "sparse_categorical_accuracy"] for data in (test, shifted)]
    return dict(test=accuracy[0], shifted=accuracy[1], step_s=seconds,
                memory=memory, trainable=sum(
                    int(np.prod(v.shape))
                    for v in classifier.trainable_variables))


# The example's runs, per LoRA rank (None: the whole model): AdamW and the
# setting docs/guides/kerashub.md recommends from benchmarks/finetune.py.
RUNS = {rank: {"AdamW": None, "SAM rho=0.05": dict(rho=0.05)}
        for rank in (None, 4)}


def _mean_spread(values, scale: float = 1.0, sign: str = "") -> str:
    values = scale * np.asarray(values)
    text = f"{values.mean():{sign}.{4 if scale == 1 else 1}f}"
    if len(values) > 1:
        text += f" ± {values.std(ddof=1):.{4 if scale == 1 else 1}f}"
    return text


def table(rows: list[dict]) -> str:
    """Markdown: one line per (run, weights trained): accuracies as mean ±
    standard deviation over seeds, and the per-seed difference to AdamW's
    run on the same seed (same data, same head), in points."""
    lines = ["| run | weights trained | held-out accuracy | shifted "
             "accuracy | held-out vs AdamW | shifted vs AdamW | fit ms/step | "
             "vs AdamW | peak memory over resident | trainable weights |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["run"], r["weights"]), []).append(r)
    base = {(r["weights"], r["seed"]): r for r in rows
            if r["run"] == "AdamW"}
    for (name, weights), rs in groups.items():
        cells = [_mean_spread([r[key] for r in rs])
                 for key in ("test", "shifted")]
        for key in ("test", "shifted"):
            paired = [r[key] - base[weights, r["seed"]][key] for r in rs
                      if (weights, r["seed"]) in base]
            cells.append("-" if name == "AdamW" or not paired
                         else _mean_spread(paired, 100, "+"))
        step = float(np.median([r["step_s"] for r in rs]))
        adamw = [base[weights, r["seed"]]["step_s"] for r in rs
                 if (weights, r["seed"]) in base]
        ratio = f"{step / np.median(adamw):.2f}x" if adamw else "-"
        memory = [r["memory"] for r in rs if r["memory"] is not None]
        memory = f"{max(memory):.1f} MB" if memory else "-"
        lines.append(f"| {name} | {weights} | {' | '.join(cells)} | "
                     f"{1000 * step:.1f} | {ratio} | {memory} | "
                     f"{rs[0]['trainable']:,} |")
    return "\n".join(lines)


def run_all(runs: dict, lora_ranks, seeds: int, epochs: int,
            cache: str | None = None, first_seed: int = 0) -> list[dict]:
    preset = pretrained_preset(cache)
    rows = []
    for lora_rank in lora_ranks:
        for seed in range(first_seed, first_seed + seeds):
            for name, sam in runs.items():
                if lora_rank and (sam or {}).get("start") == "random":
                    continue  # a frozen random backbone: not fine-tuning
                row = finetune(preset, sam, lora_rank, seed, epochs)
                row.update(run=name, seed=seed, weights=(
                    f"LoRA rank {lora_rank}" if lora_rank else "full"))
                rows.append(row)
                print(f"done: {name}, {row['weights']}, seed {seed}: "
                      f"{row['test']:.4f} / {row['shifted']:.4f}",
                      file=sys.stderr, flush=True)
    return rows


def header(seeds: int, epochs: int, first_seed: int = 0) -> str:
    return (f"KerasHub {keras_hub.__version__}, Keras {keras.__version__} "
            f"({keras.backend.backend()}), {os.cpu_count()} CPU cores; "
            f"pretrained preset, 128 labeled reviews, {epochs} epochs of "
            f"batch 16, seeds {first_seed} to {first_seed + seeds - 1} (mean ± "
            f"standard deviation; vs AdamW: points, per seed)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--cache", default=None,
                        help="folder of the pretrained preset")
    parser.add_argument("--backend", default=None,
                        choices=("tensorflow", "jax", "torch"))
    args = parser.parse_args(argv)
    rows = [row for rank, runs in RUNS.items()
            for row in run_all(runs, (rank,), args.seeds, args.epochs,
                               args.cache)]
    print(f"\n{header(args.seeds, args.epochs)}\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
