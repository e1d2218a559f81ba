"""When does `SAMModel.fit`'s stall warning fire? The cases it must tell
apart, with what it sees.

    python benchmarks/stall_evidence.py            # every case (~8 min)
    python benchmarks/stall_evidence.py --only gpt2 bert

The warning (keras_sam/watch.py) fires at epoch 2 or 3 when the training
loss did not go down over the epoch, is still where the first epoch left it,
and the mean norm of the clean gradient ||g|| over the epoch fell to
COLLAPSE of the first epoch's or less. Each case trains a SAM model for 3
epochs (the BERT cases: a 1-epoch warm-up on 32 examples, then 4 epochs)
and the same model
without SAM from the same start, and prints, per epoch, both training losses
and SAM's mean ||g||, and whether the warning fired.

The cases: Keras's Transformer text classifier with Adam at rho = 0.05 on two
synthetic IMDB-shaped datasets (where SAM holds the loss at ln 2 and Adam
learns: the warning must fire), the same with ASAM (learns), the same with a
learning rate too small to move anything (plain as flat: no warning), a tiny
GPT-2 causal LM at KerasHub's default Adam(2e-5) (plain as flat), the
offline BERT block of docs/guides/kerashub.md (plain as flat), and a
2-layer KerasHub BERT classifier trained from random weights, full and
LoRA rank 4 (the runs where SAM held the loss at ln 2 before the KerasHub
example started from a pretrained preset).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"),
                str(ROOT / "examples")]

import keras  # noqa: E402
import numpy as np  # noqa: E402

import bench  # noqa: E402
import keras_sam  # noqa: E402
from keras_sam import watch  # noqa: E402


class Seen(keras.callbacks.Callback):
    """SAM's mean ||g|| after each epoch, as the stall check reads it."""

    def __init__(self, sam):
        super().__init__()
        self.sam, self.norms = sam, []

    def on_epoch_end(self, epoch, logs=None):
        self.norms.append(watch.gradient_norm_seen(self.sam))


def transformer(lr=1e-3, data="easier", seed=0, **sam):
    import transformer_case as case

    kwargs = dict(easier=dict(sentiment=(3, 10), noise=0.1),
                  harder=dict(sentiment=(2, 6), noise=0.15))[data]

    def build(with_sam):
        (x, y), _ = case.synthetic_imdb(6000, 10, seed=seed, **kwargs)
        model = case.transformer_classifier(seed)
        if with_sam:
            model = keras_sam.SAMModel(model, **sam)
        model.compile(optimizer=keras.optimizers.Adam(lr),
                      loss="sparse_categorical_crossentropy")
        return model, [((x, y), dict(batch_size=32, epochs=3))]
    return build


def gpt2(**sam):
    import hub_zoo

    def build(with_sam):
        task, x, _ = hub_zoo.BUILDERS["GPT2CausalLM"]()
        model = keras_sam.SAMModel(task, **sam) if with_sam else task
        if with_sam:
            model.compile()   # the task's defaults, Adam(2e-5)
        return model, [((x,), dict(batch_size=4, epochs=3))]
    return build


def bert_classifier(vocab, sequence_length, width):
    """A 2-layer KerasHub BERT classifier from config (random weights),
    hidden size `width`, its tokenizer from the in-memory `vocab`."""
    import keras_hub

    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        keras_hub.models.BertTokenizer(vocabulary=vocab),
        sequence_length=sequence_length)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocab), num_layers=2, num_heads=2,
        hidden_dim=width, intermediate_dim=2 * width,
        max_sequence_length=sequence_length)
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=preprocessor)


def bert_block(**sam):
    """The offline block of docs/guides/kerashub.md, for 3 epochs."""

    def build(with_sam):
        keras.utils.set_random_seed(0)
        classifier = bert_classifier(
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good",
             "bad", "film", "not", "really"], sequence_length=8, width=32)
        texts = np.array(["a good film", "a bad film", "not good",
                          "really good", "not bad", "a really bad film"] * 8)
        labels = np.array([1, 0, 0, 1, 1, 0] * 8)
        classifier.backbone.enable_lora(rank=4)
        model = keras_sam.SAMModel(classifier, **sam) if with_sam \
            else classifier
        model.compile(optimizer=keras.optimizers.Adam(2e-3))
        return model, [((texts, labels), dict(batch_size=8, epochs=3))]
    return build


def scratch_reviews(n: int, seed: int):
    """Sentences of 8 words; each sentiment word counts +1 or -1, flipped
    by a "not" just before it; the label is the sign of the sum."""
    rng = np.random.default_rng(seed)
    positive, negative = SCRATCH_WORDS[6:11], SCRATCH_WORDS[11:16]
    texts, labels = [], []
    while len(texts) < n:
        words, score = [], 0
        for _ in range(8):
            kind = rng.random()
            if kind < 0.45:
                words.append(rng.choice(SCRATCH_WORDS[16:]))
                continue
            negate = rng.random() < 0.3
            sign = 1 if kind < 0.725 else -1
            words += (["not"] if negate else []) + [
                rng.choice(positive if sign > 0 else negative)]
            score += sign * (-1 if negate else 1)
        if score:
            texts.append(" ".join(words))
            labels.append(int(score > 0))
    return np.array(texts), np.array(labels)


SCRATCH_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "not",
                 "good", "great", "fun", "superb", "lovely",
                 "bad", "awful", "boring", "dull", "weak",
                 "the", "movie", "plot", "acting", "was", "and", "really",
                 "quite"]


def scratch_bert(lora_rank=None, **sam):
    """A 2-layer BERT classifier from random weights (KerasHub's classes
    built from config) on reviews whose label depends on word order:
    a 1-epoch warm-up on 32 reviews, then 4 epochs on 2,048."""

    def build(with_sam):
        x, y = scratch_reviews(2048, seed=0)
        keras.utils.set_random_seed(0)
        classifier = bert_classifier(SCRATCH_WORDS, sequence_length=16,
                                     width=64)
        if lora_rank:
            classifier.backbone.enable_lora(lora_rank)
        model = keras_sam.SAMModel(classifier, **sam) if with_sam \
            else classifier
        model.compile(optimizer=keras.optimizers.Adam(
            2e-3 if lora_rank else 1e-3))
        return model, [((x[:32], y[:32]), dict(batch_size=32, epochs=1)),
                       ((x, y), dict(batch_size=32, epochs=4))]
    return build


CASES = {
    "Transformer, Adam, SAM rho=0.05 (easier data)": transformer(rho=0.05),
    "Transformer, Adam, SAM rho=0.05 (harder data, seed 1)": transformer(
        data="harder", seed=1, rho=0.05),
    "Transformer, Adam, ASAM rho=0.05": transformer(rho=0.05, adaptive=True),
    "Transformer, Adam(1e-6), SAM rho=0.05": transformer(lr=1e-6, rho=0.05),
    "GPT-2 causal LM, default Adam(2e-5), SAM rho=0.05": gpt2(rho=0.05),
    "BERT block of kerashub.md (LoRA), SAM rho=0.05": bert_block(rho=0.05),
    "BERT from random weights, full, SAM rho=0.05": scratch_bert(rho=0.05),
    "BERT from random weights, LoRA rank 4, SAM rho=0.05": scratch_bert(
        lora_rank=4, rho=0.05),
}


def train(build, with_sam):
    model, fits = build(with_sam)
    seen = Seen(model) if with_sam else None
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for args, kwargs in fits:
            history = model.fit(*args, verbose=0, callbacks=[seen] if seen
                                else [], **kwargs)
            losses += history.history["loss"]
    warned = any("still where it started" in str(w.message) for w in caught)
    return losses, (seen.norms if seen else []), warned


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None,
                        help="cases whose name contains one of these words")
    args = parser.parse_args()
    print(f"The stall check fires when the loss stays within "
          f"{watch.LEFT:.0%} of epoch 1's, fell by less than "
          f"{watch.STALL:.1%} over the epoch, and the mean ||g|| fell to "
          f"{watch.COLLAPSE} of epoch 1's or less (epochs 2 and 3). "
          "TensorFlow, CPU:")
    rows = []
    for name, build in CASES.items():
        if args.only and not any(w.lower() in name.lower()
                                 for w in args.only):
            continue
        losses, norms, warned = train(build, with_sam=True)
        plain, _, _ = train(build, with_sam=False)
        rows.append([name, " / ".join(f"{v:.4f}" for v in losses),
                     " / ".join(f"{v:.4f}" for v in plain),
                     " / ".join(f"{v:.3g}" for v in norms),
                     ", ".join(f"{n / norms[0]:.2f}" for n in norms[1:3]),
                     "yes" if warned else "no"])
        print(f"measured {name}", file=sys.stderr, flush=True)
    bench.table(["case", "SAM loss per epoch", "plain loss per epoch",
                   "SAM mean ||g|| per epoch", "||g|| / epoch 1's",
                   "warned"], rows)


if __name__ == "__main__":
    main()
