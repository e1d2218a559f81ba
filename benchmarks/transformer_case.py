"""SAM on Keras's text-classification Transformer, with Adam: why plain SAM
at rho = 0.05 fails there, and which setting fixes it.

    python benchmarks/transformer_case.py            # diagnosis + all settings
    python benchmarks/transformer_case.py --quick    # fewer examples
    python benchmarks/transformer_case.py --study    # 2 datasets x 3 seeds

The model is Keras's "Text classification with Transformer" example (token
and position embeddings, one Transformer block, Adam at its default learning
rate, batch 32, 2 epochs), on synthetic data of the IMDB shapes (vocabulary
20000, sequences of up to 200 tokens, two classes; the label is decided by
which of two small sets of sentiment tokens occurs more often, with 10% of
labels flipped). No download.

Part 1 (diagnosis) takes one batch at the initial weights and prints, per
group of variables, its share of ||g||^2, which is its share of SAM's
||e||^2, and ||e|| relative to the group's own weight norm ||w||. Part 2
trains every setting from the same initial weights and prints the
validation accuracy after each epoch and the time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

import keras_sam  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

VOCAB, MAXLEN, EMBED, HEADS, FF = 20000, 200, 32, 2, 32


def synthetic_imdb(n_train, n_val, seed=0, sentiment=(3, 10), noise=0.1):
    """Token sequences with IMDB's shapes and a learnable, noisy label: each
    holds `sentiment` (low, high) words of its label's kind and one of the
    other's, and a share `noise` of the labels is flipped."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    # Zipf-like word frequencies over the vocabulary (ids 2.., 0 pads).
    ranks = np.arange(1, VOCAB - 1)
    probs = 1.0 / ranks ** 1.1
    probs /= probs.sum()
    lengths = rng.integers(40, MAXLEN + 1, size=n)
    x = np.zeros((n, MAXLEN), dtype="int32")
    positive = rng.choice(np.arange(200, 2000), 30, replace=False)
    negative = rng.choice(np.setdiff1d(np.arange(200, 2000), positive), 30,
                          replace=False)
    y = rng.integers(0, 2, size=n)
    for i in range(n):
        tokens = rng.choice(ranks + 1, size=lengths[i], p=probs)
        # A few sentiment words, more of the label's kind.
        k = rng.integers(*sentiment)
        own = positive if y[i] == 1 else negative
        other = negative if y[i] == 1 else positive
        slots = rng.choice(lengths[i], size=k + 1, replace=False)
        tokens[slots[:k]] = rng.choice(own, size=k)
        tokens[slots[k]] = rng.choice(other)
        x[i, MAXLEN - lengths[i]:] = tokens   # pad at the front, as Keras
    flip = rng.random(n) < noise
    y = np.where(flip, 1 - y, y).astype("int64")
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


class TokenAndPositionEmbedding(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.token_emb = layers.Embedding(VOCAB, EMBED, name="token_emb")
        self.pos_emb = layers.Embedding(MAXLEN, EMBED, name="pos_emb")

    def call(self, x):
        positions = keras.ops.arange(0, keras.ops.shape(x)[-1])
        return self.token_emb(x) + self.pos_emb(positions)


def transformer_classifier(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = layers.Input(shape=(MAXLEN,), dtype="int32")
    x = TokenAndPositionEmbedding(name="embedding")(inputs)
    attn = layers.MultiHeadAttention(HEADS, EMBED, name="attention")(x, x)
    x = layers.LayerNormalization(epsilon=1e-6, name="norm1")(
        x + layers.Dropout(0.1)(attn))
    ffn = layers.Dense(FF, activation="relu", name="ffn1")(x)
    ffn = layers.Dense(EMBED, name="ffn2")(ffn)
    x = layers.LayerNormalization(epsilon=1e-6, name="norm2")(
        x + layers.Dropout(0.1)(ffn))
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(20, activation="relu", name="head1")(x)
    x = layers.Dropout(0.1)(x)
    outputs = layers.Dense(2, activation="softmax", name="head2")(x)
    return keras.Model(inputs, outputs, name="transformer")


def group_of(path: str) -> str:
    for key in ("token_emb", "pos_emb", "attention", "norm", "ffn", "head2",
                "head1"):
        if key in path:
            return {"norm": "LayerNorm", "head1": "head (hidden)",
                    "head2": "output layer", "ffn": "feed-forward",
                    "attention": "attention", "token_emb": "token embedding",
                    "pos_emb": "position embedding"}[key]
    return path


def _grads_at(model, values, x, y):
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        tape.watch(values)
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            loss = loss_fn(y, model(x, training=False))
    return float(loss), [tf.convert_to_tensor(g)
                         for g in tape.gradient(loss, values)]


def diagnose(model, x, y, where="at the initial weights", rho=0.05):
    """Per group of variables, on one batch at the model's weights: its
    share of ||g||^2 (= its share of ||e||^2), ||e|| / ||w||, and how SAM's
    gradient g_s = grad L(w + e) compares with the clean g there."""
    variables = model.trainable_variables
    w = [tf.identity(v.value) for v in variables]
    loss, g = _grads_at(model, w, x, y)
    e, _ = keras_sam.sam_perturbation(g, rho)
    loss_s, g_s = _grads_at(model, [a + b for a, b in zip(w, e)], x, y)
    total = sum(float(tf.reduce_sum(t * t)) for t in g)
    groups = {}
    for v, gi, si, wi in zip(variables, g, g_s, w):
        acc = groups.setdefault(group_of(v.path), np.zeros(4))
        acc += [float(tf.reduce_sum(gi * gi)), float(tf.reduce_sum(wi * wi)),
                float(tf.reduce_sum(si * si)), float(tf.reduce_sum(gi * si))]
    bench.table(
        ["variables", "share of ||e||^2", "||e|| / ||w||", "||g_s|| / ||g||",
         "cos(g, g_s)"],
        [[name, f"{gg / total:.3f}",
          f"{rho * np.sqrt(gg / total) / np.sqrt(ww):.2e}",
          f"{np.sqrt(ss / gg):.2f}", f"{gs / np.sqrt(gg * ss):.3f}"]
         for name, (gg, ww, ss, gs) in sorted(groups.items(),
                                              key=lambda kv: -kv[1][0])],
        caption=f"One batch of {len(x)} {where}: L(w) = {loss:.4f}, "
        f"||g|| = {np.sqrt(total):.4g}, L(w + e) = {loss_s:.4f} at "
        f"rho = {rho}")


NO_EMBEDDINGS = keras_sam.selection.NoEmbeddings()
# SAMModel's arguments per setting (None: Adam alone); a rho of
# ("warm-up", rho, epochs) grows linearly from 0 over those epochs.
SETTINGS = {
    "Adam (base)": None,
    "SAM rho=0.05": dict(rho=0.05),
    "SAM rho=0.01": dict(rho=0.01),
    "SAM rho=0.05, no embeddings": dict(rho=0.05, perturb=NO_EMBEDDINGS),
    "SAM rho=0.05, attention unperturbed": dict(
        rho=0.05, perturb=lambda v: "attention" not in v.path),
    "SAM rho=0.05, warm-up 1 epoch": dict(rho=("warm-up", 0.05, 1)),
    "SAM rho=0.05, warm-up 3 epochs": dict(rho=("warm-up", 0.05, 3)),
    "ASAM rho=0.5": dict(rho=0.5, adaptive=True),
    "ASAM rho=0.5, no embeddings": dict(rho=0.5, adaptive=True,
                                        perturb=NO_EMBEDDINGS),
    "ASAM rho=0.05": dict(rho=0.05, adaptive=True),
    **{f"MSAM rho={r:g}": dict(rho=r, direction="momentum")
       for r in (0.05, 0.3, 1.0, 2.0)},
}
# Part 2's settings; the study's: what a new user would try, on two
# datasets of different difficulty, several seeds, 5 epochs of Adam(1e-3).
PART2 = list(SETTINGS)[:5] + ["SAM rho=0.05, warm-up 1 epoch",
                              "ASAM rho=0.5", "ASAM rho=0.5, no embeddings"]
STUDY = list(SETTINGS)[:2] + ["SAM rho=0.05, warm-up 1 epoch",
                              "SAM rho=0.05, warm-up 3 epochs",
                              "SAM rho=0.01", "ASAM rho=0.05"] + [
    name for name in SETTINGS if name.startswith("MSAM")]
DATASETS = {
    "easier (3-9 sentiment words, 10% flipped)": dict(sentiment=(3, 10),
                                                      noise=0.1),
    "harder (2-5 sentiment words, 15% flipped)": dict(sentiment=(2, 6),
                                                      noise=0.15),
}


def run(name, data, epochs, seed, batch_size=32):
    """(training loss per epoch, validation accuracy per epoch, seconds)."""
    (x, y), (xv, yv) = data
    model = transformer_classifier(seed)
    spec = SETTINGS[name]
    if spec is not None:
        spec = dict(spec)
        if isinstance(spec["rho"], tuple):
            _, rho, warm = spec["rho"]
            steps = int(warm * np.ceil(len(x) / batch_size))
            spec["rho"] = keras.optimizers.schedules.PolynomialDecay(
                0.0, steps, end_learning_rate=rho, power=1.0)
        model = keras_sam.SAMModel(model, **spec)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs,
                        validation_data=(xv, yv), verbose=0)
    return (history.history["loss"], history.history["val_accuracy"],
            time.perf_counter() - start)


def settings_table(names, args, data_for, columns, row) -> None:
    """A table of `names` (those in --only): `row(name, runs, time / base)`
    from one run per seed on `data_for(seed)`."""
    base_time, rows = None, []
    for name in names:
        if args.only and name not in args.only:
            continue
        runs = [run(name, data_for(seed), args.epochs, seed)
                for seed in range(args.seeds)]
        seconds = float(np.mean([r[2] for r in runs]))
        base_time = base_time or seconds
        rows.append(row(name, runs, seconds, seconds / base_time))
        print(f"measured {name}", file=sys.stderr, flush=True)
    bench.table(columns, rows)


def study(args):
    """Final validation accuracy (mean +- std over seeds), how many seeds
    ended at the chance level (final training loss within 1% of ln 2), and
    the relative change of the training loss from epoch 1 to epoch 2 in
    those runs and in the others (what a stall warning can see)."""
    print(f"\nStudy: {args.train} training / {args.val} validation "
          f"sequences, {args.epochs} epochs, batch 32, Adam(1e-3), seeds "
          f"0..{args.seeds - 1} (data and initial weights)")

    def row(name, runs, _, over_base):
        accs = [r[1][-1] for r in runs]
        return [name, f"{np.mean(accs):.3f} +- {np.std(accs):.3f}",
                f"{sum(r[0][-1] > 0.99 * np.log(2) for r in runs)}/"
                f"{len(runs)}", " / ".join(f"{v:.3f}" for v in runs[0][0]),
                ", ".join(f"{(r[0][0] - r[0][1]) / r[0][0]:+.2%}"
                          for r in runs), f"{over_base:.2f}"]

    for data_name, kwargs in DATASETS.items():
        if args.datasets and not any(d in data_name for d in args.datasets):
            continue
        print(f"\n{data_name}\n")
        settings_table(
            STUDY, args, lambda seed: synthetic_imdb(
                args.train, args.val, seed=seed, **kwargs),
            ["setting", "final val acc", "at chance",
             "train loss per epoch (seed 0)", "epoch 1->2 loss change",
             "time / base"], row)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--train", type=int, default=25000)
    parser.add_argument("--val", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--diagnose-after", type=int, default=200,
                        help="also diagnose after this many Adam steps")
    parser.add_argument("--study", action="store_true",
                        help="the settings over two datasets and 3 seeds")
    parser.add_argument("--datasets", nargs="*", default=None,
                        help="--study on these datasets only (easier, "
                        "harder)")
    args = parser.parse_args()
    if args.study:
        if args.train == 25000:   # the study's own default sizes
            args.train, args.val = 6000, 2000
        args.epochs = 5 if args.epochs == 2 else args.epochs
        args.seeds = 3 if args.seeds == 1 else args.seeds
        return study(args)
    if args.quick:
        args.train, args.val = 5000, 2000
    data = synthetic_imdb(args.train, args.val)
    diagnose(transformer_classifier(0), data[0][0][:32], data[0][1][:32])
    if args.diagnose_after:
        # The same once plain Adam has left the plateau.
        model = transformer_classifier(0)
        model.compile(optimizer="adam",
                      loss="sparse_categorical_crossentropy")
        model.fit(data[0][0][:32 * args.diagnose_after],
                  data[0][1][:32 * args.diagnose_after], batch_size=32,
                  verbose=0)
        diagnose(model, data[0][0][-32:], data[0][1][-32:],
                 where=f"after {args.diagnose_after} steps of plain Adam")

    print(f"\n{args.train} training and {args.val} validation sequences, "
          f"{args.epochs} epochs, batch 32, Adam(1e-3), {args.seeds} seed(s)")
    settings_table(
        PART2, args, lambda seed: data,
        ["setting", "train loss per epoch", "val acc per epoch", "time",
         "time / base"],
        lambda name, runs, seconds, over_base: [
            name, " / ".join(f"{v:.3f}" for v in np.mean(
                [r[0] for r in runs], axis=0)),
            " / ".join(f"{a:.3f}" for a in np.mean([r[1] for r in runs],
                                                   axis=0)),
            f"{seconds:.0f} s", f"{over_base:.2f}"])


if __name__ == "__main__":
    main()
