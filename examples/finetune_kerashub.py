"""Fine-tune a KerasHub text classifier with plain Adam, SAM and
Momentum-SAM, in full and with LoRA.

    pip install -e ".[hub]"                     # keras-hub and its TensorFlow
    python examples/finetune_kerashub.py        # offline: a small BERT
    python examples/finetune_kerashub.py --epochs 3 --backend jax

`SAMModel(task)` takes raw strings exactly as `task.fit` does: the task's
own preprocessor tokenizes them. With a real preset (needs a download):

    classifier = keras_hub.models.TextClassifier.from_preset(
        "bert_tiny_en_uncased", num_classes=2)
    classifier.backbone.enable_lora(rank=4)        # optional: LoRA
    sam_model = keras_sam.SAMModel(classifier, rho=0.05)
    sam_model.compile()                            # the task's defaults
    sam_model.fit(train_texts, train_labels, validation_data=...)

Offline, the same classes are built from config (a 2-layer BERT, its
tokenizer from an in-memory vocabulary), on generated reviews: sentences of
sentiment words with negations ("not good"), so that the label depends on
word order. Printed per run: validation accuracy, seconds per epoch, the
peak memory of the training run over what was resident before it
(TensorFlow's allocator; "-" on other backends) and the trainable weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _backend(argv) -> str:
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
    return "tensorflow"


os.environ["KERAS_BACKEND"] = _backend(sys.argv)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's CPU allocator counts its bytes only in this mode.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

POSITIVE = ["good", "great", "fun", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "boring", "dull", "weak"]
FILLER = ["the", "movie", "plot", "acting", "was", "and", "really", "quite"]


def make_reviews(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sentences of 8 words; each sentiment word counts +1 or -1, flipped
    by a "not" just before it; the label is the sign of the sum."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    while len(texts) < n:
        words, score = [], 0
        for _ in range(8):
            kind = rng.random()
            if kind < 0.45:
                words.append(rng.choice(FILLER))
                continue
            negate = rng.random() < 0.3
            positive = kind < 0.725
            word = rng.choice(POSITIVE if positive else NEGATIVE)
            words += (["not"] if negate else []) + [word]
            score += (1 if positive else -1) * (-1 if negate else 1)
        if score == 0:
            continue
        texts.append(" ".join(words))
        labels.append(int(score > 0))
    return np.array(texts), np.array(labels)


def build_classifier(seed: int, lora_rank: int | None):
    keras.utils.set_random_seed(seed)
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "not"]
             + POSITIVE + NEGATIVE + FILLER)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocab)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=16)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocab), num_layers=2, num_heads=2,
        hidden_dim=64, intermediate_dim=128, max_sequence_length=16)
    classifier = keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=preprocessor)
    if lora_rank:
        classifier.backbone.enable_lora(lora_rank)
    return classifier


RUNS = {
    "Adam": None,
    "SAM rho=0.05": dict(rho=0.05),
    "MSAM rho=0.05": dict(rho=0.05, direction="momentum"),
}


def step_memory_mb(train) -> float | None:
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


def run(name, kwargs, lora_rank, data, epochs, seed):
    (x, y), (vx, vy) = data
    classifier = build_classifier(seed, lora_rank)
    model = (classifier if kwargs is None
             else keras_sam.SAMModel(classifier, **kwargs))
    # "auto": the task's defaults, Adam(5e-5) and cross-entropy from logits;
    # fine-tuning from scratch-sized weights wants a larger step.
    model.compile(optimizer=keras.optimizers.Adam(2e-3 if lora_rank
                                                  else 1e-3))
    model.fit(x[:32], y[:32], batch_size=32, epochs=1, verbose=0)  # warm up
    start = time.perf_counter()
    memory = step_memory_mb(
        lambda: model.fit(x, y, batch_size=32, epochs=epochs, verbose=0))
    seconds = (time.perf_counter() - start) / epochs
    _, accuracy = model.evaluate(vx, vy, verbose=0)
    trainable = sum(int(np.prod(v.shape)) for v in
                    classifier.trainable_variables)
    return dict(run=name, lora=f"rank {lora_rank}" if lora_rank else "full",
                accuracy=accuracy, seconds=seconds, memory=memory,
                trainable=trainable)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="tensorflow",
                        choices=("tensorflow", "jax", "torch"))
    args = parser.parse_args(argv)
    data = (make_reviews(args.train, args.seed),
            make_reviews(1024, args.seed + 1))
    rows = []
    for lora_rank in (None, 4):
        for name, kwargs in RUNS.items():
            rows.append(run(name, kwargs, lora_rank, data, args.epochs,
                            args.seed))
            print(f"done: {name}, {rows[-1]['lora']}", file=sys.stderr)
    print(f"\nKerasHub {keras_hub.__version__}, Keras {keras.__version__} "
          f"({keras.backend.backend()}), {os.cpu_count()} CPU cores; "
          f"{args.train} training reviews, {args.epochs} epochs, seed "
          f"{args.seed}\n")
    print("| run | weights trained | val accuracy | s/epoch | step memory "
          "over the run's resident | trainable weights |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        memory = ("-" if r["memory"] is None else f"{r['memory']:.1f} MB")
        print(f"| {r['run']} | {r['lora']} | {r['accuracy']:.4f} | "
              f"{r['seconds']:.2f} | {memory} | {r['trainable']:,} |")
    return rows


if __name__ == "__main__":
    main()
