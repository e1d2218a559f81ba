"""Step time and memory of SAMModel against the base model and the floor.

    python benchmarks/step_time.py            # full run, a few minutes
    python benchmarks/step_time.py --quick    # fewer rounds
    python benchmarks/step_time.py --variants # every SAM variant's step
    python benchmarks/step_time.py --backend jax      # or torch: see
                                                      # other_backends.py
    python benchmarks/step_time.py --backend torch --optimizer adam
                                    # PyTorch adds jit_compile=True columns
    python benchmarks/step_time.py --models "KerasHub BERT" \
        "KerasHub BERT LoRA"                          # needs keras-hub

Three variants of each model, all compiled with the same optimizer and loss:

- base:  the plain Keras model, one gradient per step;
- floor: two gradient evaluations in sequence and one optimizer update,
         nothing else (what any SAM step must at least cost);
- SAM:   keras_sam.SAMModel.

Time: all variants of a model are built once and timed in alternating
rounds in one process; each round times every variant over the same number
of steps, and the figure is the median over rounds of the per-round ratio.

Memory: each (model, variant) runs in a fresh process with TensorFlow's BFC
allocator on the CPU (TF_CPU_ALLOCATOR_USE_BFC=true), which counts every
tensor it hands out, and one op at a time on one thread, which steadies the
peak (it still moves by a few MB between runs: the input pipeline allocates
on its own threads, and op order differs between graphs). After warm-up its
peak is reset; a step's working memory is the peak over the timed steps
minus what was allocated before them (weights, optimizer slots). The table
gives SAM's working memory minus the base model's and minus the floor's,
next to the size of the trainable weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time



def _backend(argv) -> str:
    """--backend, read before Keras is imported (Keras fixes it then)."""
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
    return "tensorflow"


BACKEND = _backend(sys.argv) if __name__ == "__main__" else \
    os.environ.get("KERAS_BACKEND", "tensorflow")
os.environ["KERAS_BACKEND"] = BACKEND
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

if BACKEND == "tensorflow":
    import tensorflow as tf  # noqa: E402

import keras_sam  # noqa: E402
from keras_sam import _keras_compat  # noqa: E402


class FloorModel(keras.Model):
    """Two gradients of the same batch in sequence, one update: the least
    work a SAM step can do.

    The graph optimizer prunes a gradient whose value is never used and
    merges two identical passes. So the second pass reads its input through
    a multiplication by a runtime 1.0 that depends on one element of every
    first-pass gradient: both passes run in full, one after the other, for
    the price of a few scalar ops.
    """

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self._one = tf.Variable(1.0, trainable=False)

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables

        def gradient(x):
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self._compute_loss(x=x, y=y, y_pred=y_pred,
                                          sample_weight=sample_weight,
                                          training=True)
            return y_pred, loss, tape.gradient(loss, variables)

        y_pred, loss, first = gradient(x)
        self._loss_tracker.update_state(
            _keras_compat.unscale_loss_for_distribution(loss),
            sample_weight=tf.shape(keras.tree.flatten(x)[0])[0])
        tie = tf.add_n([tf.reshape(getattr(g, "values", g), [-1])[0]
                        for g in first])
        one = self._one + 0.0 * tie  # 1.0, known only after pass 1
        _, _, second = gradient(keras.tree.map_structure(
            lambda t: t * tf.cast(one, t.dtype), x))
        self.optimizer.apply(second, variables)
        return self.compute_metrics(x, y, y_pred, sample_weight)


def mlp():
    x = np.random.default_rng(0).normal(size=(256, 512)).astype("float32")
    y = np.random.default_rng(1).integers(0, 10, size=(256,))
    model = keras.Sequential([
        keras.Input((512,)),
        keras.layers.Dense(1024, activation="relu"),
        keras.layers.Dense(1024, activation="relu"),
        keras.layers.Dense(10),
    ])
    return model, x, y


def cnn():
    x = np.random.default_rng(0).normal(size=(64, 32, 32, 3)).astype(
        "float32")
    y = np.random.default_rng(1).integers(0, 10, size=(64,))
    layers = [keras.Input((32, 32, 3))]
    for filters, stride in ((32, 1), (64, 2), (64, 1), (128, 2)):
        layers += [keras.layers.Conv2D(filters, 3, strides=stride,
                                       padding="same", use_bias=False),
                   keras.layers.BatchNormalization(),
                   keras.layers.ReLU()]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    return keras.Sequential(layers), x, y


def transformer():
    seq, dim, vocab = 64, 128, 2000
    x = np.random.default_rng(0).integers(0, vocab, size=(32, seq))
    y = np.random.default_rng(1).integers(0, 10, size=(32,))
    inputs = keras.Input((seq,), dtype="int32")
    h = keras.layers.Embedding(vocab, dim)(inputs)
    for _ in range(2):
        a = keras.layers.MultiHeadAttention(4, dim // 4)(h, h)
        h = keras.layers.LayerNormalization()(h + a)
        f = keras.layers.Dense(4 * dim, activation="gelu")(h)
        h = keras.layers.LayerNormalization()(h + keras.layers.Dense(dim)(f))
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model(inputs, outputs), x, y


def kerashub_bert(lora_rank=None):
    """A KerasHub BertTextClassifier (2 layers, d128, sequences of 64) on
    token ids, as its preprocessor hands them to the step; with LoRA, only
    the adapters (and the head) train."""
    import keras_hub

    seq, vocab, batch = 64, 2000, 32
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(0, vocab, size=(batch, seq)),
         "segment_ids": np.zeros((batch, seq), "int32"),
         "padding_mask": np.ones((batch, seq), "bool")}
    y = np.random.default_rng(1).integers(0, 2, size=(batch,))
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=vocab, num_layers=2, num_heads=4, hidden_dim=128,
        intermediate_dim=512, max_sequence_length=seq)
    if lora_rank:
        backbone.enable_lora(lora_rank)
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None), x, y


MODELS = {"MLP": mlp, "CNN+BatchNorm": cnn, "Transformer": transformer,
          # --models "KerasHub BERT" "KerasHub BERT LoRA" (keras-hub)
          "KerasHub BERT": kerashub_bert,
          "KerasHub BERT LoRA": lambda: kerashub_bert(lora_rank=4)}
DEFAULT_MODELS = ("MLP", "CNN+BatchNorm", "Transformer")
VARIANTS = ("base", "floor", "SAM")

# --variants: SAMModel arguments, and the optimizer iteration to start from.
# "one-pass" rows start at iteration 1 with sam_every = 10**9, so every timed
# step is a step between SAM steps; "cycle" rows average over whole cycles.
NEVER = 10**9
VARIANT_STEPS = {
    "SAM": ({}, 0),
    "MSAM (direction=momentum)": ({"direction": "momentum", "rho": 2.0}, 0),
    "random e (direction=random)": ({"direction": "random"}, 0),
    "p=inf": ({"p": float("inf")}, 0),
    "ASAM": ({"adaptive": True, "rho": 0.5}, 0),
    "GSAM": ({"gsam_alpha": 0.3}, 0),
    "num_batch_splits=2": ({"num_batch_splits": 2}, 0),
    "every-4: one-pass step": ({"sam_every": NEVER}, 1),
    "LookSAM: one-pass step": ({"sam_every": NEVER, "looksam_alpha": 0.7}, 1),
    "every-4: cycle mean": ({"sam_every": 4}, 0),
    "LookSAM k=5: cycle mean": ({"sam_every": 5, "looksam_alpha": 0.7}, 0),
}


def build(model_name: str, variant: str):
    keras.utils.set_random_seed(0)
    model, x, y = MODELS[model_name]()
    start = 0
    if variant == "base":
        wrapped = model
    elif variant == "floor":
        wrapped = FloorModel(model)
    else:
        kwargs, start = VARIANT_STEPS[variant]
        wrapped = keras_sam.SAMModel(model, **{"rho": 0.05, **kwargs})
    wrapped.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    wrapped.make_train_function()
    if start:
        wrapped.optimizer.build(wrapped.trainable_variables)
        wrapped.optimizer.iterations.assign(start)
    return wrapped, wrapped.train_function, iterator, model


def run_steps(train_fn, iterator, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        logs = train_fn(iterator)
    # Block until the last step has finished.
    tf.nest.map_structure(lambda t: t.numpy(), logs)
    return (time.perf_counter() - start) / steps


def time_rounds(model_name: str, variants, rounds: int, seconds: float,
                cycle: int = 20) -> dict:
    """{variant: per-round seconds per step}, variants in alternating order;
    steps per round a multiple of `cycle` (whole every-k cycles)."""
    built = {v: build(model_name, v) for v in variants}
    for _, fn, it, _ in built.values():
        run_steps(fn, it, cycle)  # trace and warm up, whole cycles
    probe = run_steps(built["floor"][1], built["floor"][2], 5)
    steps = max(cycle, cycle * int(seconds / probe / cycle))
    per_round = {v: [] for v in variants}
    for r in range(rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            per_round[v].append(run_steps(built[v][1], built[v][2], steps))
    return {v: np.array(per_round[v]) for v in variants}


def time_variants(model_name: str, rounds: int, seconds: float) -> list:
    t = time_rounds(model_name, ("base", "floor", *VARIANT_STEPS), rounds,
                    seconds)
    return [{"variant": v, "ms": 1e3 * float(np.median(t[v])),
             "over_base": float(np.median(t[v] / t["base"])),
             "over_sam": float(np.median(t[v] / t["SAM"])),
             "over_floor": float(np.median(t[v] / t["floor"]))}
            for v in ("base", "floor", *VARIANT_STEPS)]


def _memory_children(model_name: str, variants, steps: int = 5) -> dict:
    """{variant: memory_child's figures}, each in a fresh process."""
    out = {}
    for variant in variants:
        res = subprocess.run(
            [sys.executable, __file__, "--memory-child", model_name, variant,
             "--steps", str(steps)], capture_output=True, text=True,
            check=True, env={**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true"})
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def looksam_buffer_mb(model_name: str) -> tuple[float, float]:
    """(resident memory of LookSAM minus SAM, size of the trainable weights),
    from the allocator's count after building."""
    out = _memory_children(model_name, ("SAM", "LookSAM k=5: cycle mean"))
    mb = 1024.0 ** 2
    return ((out["LookSAM k=5: cycle mean"]["resident_bytes"]
             - out["SAM"]["resident_bytes"]) / mb,
            out["SAM"]["weights_bytes"] / mb)


def msam_working_mb(model_name: str) -> float:
    """Working memory of an MSAM step minus the base step's (MB)."""
    out = _memory_children(model_name, ("base", "MSAM (direction=momentum)"))
    return (out["MSAM (direction=momentum)"]["working_bytes"]
            - out["base"]["working_bytes"]) / 1024.0 ** 2


MSAM = "MSAM (direction=momentum)"


def time_model(model_name: str, rounds: int, seconds: float,
               msam: bool = False) -> dict:
    t = time_rounds(model_name, VARIANTS + ((MSAM,) if msam else ()),
                    rounds, seconds)
    row = {
        "base_ms": 1e3 * float(np.median(t["base"])),
        "floor_ms": 1e3 * float(np.median(t["floor"])),
        "sam_ms": 1e3 * float(np.median(t["SAM"])),
        "sam_over_base": float(np.median(t["SAM"] / t["base"])),
        "sam_over_floor": float(np.median(t["SAM"] / t["floor"])),
    }
    if msam:
        row["msam_ms"] = 1e3 * float(np.median(t[MSAM]))
        row["msam_over_base"] = float(np.median(t[MSAM] / t["base"]))
    return row


def memory_child(model_name: str, variant: str, steps: int) -> dict:
    # One op at a time on one thread: the allocator's peak then depends less
    # on how the executor happened to interleave independent ops.
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    wrapped, fn, it, model = build(model_name, variant)
    run_steps(fn, it, 5)
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    run_steps(fn, it, steps)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    weights = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_weights)
    return {"working_bytes": peak - before, "weights_bytes": weights,
            "resident_bytes": before}


def memory_model(model_name: str, steps: int, msam: bool = False) -> dict:
    out = _memory_children(model_name,
                           VARIANTS + ((MSAM,) if msam else ()), steps)
    mb = 1024.0 ** 2
    extra = ({"msam_overhead_mb": (out[MSAM]["working_bytes"]
                                   - out["base"]["working_bytes"]) / mb}
             if msam else {})
    return {**extra,
        "weights_mb": out["SAM"]["weights_bytes"] / mb,
        "base_working_mb": out["base"]["working_bytes"] / mb,
        "overhead_mb": (out["SAM"]["working_bytes"]
                        - out["base"]["working_bytes"]) / mb,
        "over_floor_mb": (out["SAM"]["working_bytes"]
                          - out["floor"]["working_bytes"]) / mb,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL",
                                                            "VARIANT"))
    parser.add_argument("--compiled-child", nargs=2, metavar=("MODEL",
                                                              "VARIANT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=9,
                        help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", default="sgd_momentum",
                        choices=("sgd_momentum", "adam"),
                        help="JAX/PyTorch: the optimizer of every variant")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--memory-only", action="store_true",
                        help="skip the timing rounds")
    parser.add_argument("--msam", action="store_true",
                        help="TensorFlow: add Momentum-SAM (rho 2) columns")
    parser.add_argument("--variants", action="store_true",
                        help="time every SAM variant's step")
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS),
                        choices=list(MODELS))
    parser.add_argument("--backend", default="tensorflow",
                        choices=("tensorflow", "jax", "torch"))
    args = parser.parse_args(argv)
    if args.backend != "tensorflow":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import other_backends

        if args.variants:
            parser.error("--variants is timed on TensorFlow only")
        return other_backends.main(args, MODELS, os.path.abspath(__file__))
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child, args.steps)))
        return None
    rounds, seconds = (3, 0.5) if args.quick else (9, 1.5)
    if args.variants:
        return variants_table(args.models, rounds, seconds)

    rows = []
    for name in args.models:
        timing = ({} if args.memory_only else
                  time_model(name, rounds, seconds, args.msam))
        row = {"model": name, **timing,
               **memory_model(name, args.steps, args.msam)}
        rows.append(row)
        print(f"measured {name}", file=sys.stderr)

    print(f"\nTensorFlow {tf.__version__}, Keras {keras.__version__}, "
          f"{os.cpu_count()} CPU cores; median of {rounds} alternating "
          "rounds\n")
    print("| model | base ms/step | floor ms/step | SAM ms/step | SAM/base "
          "| SAM/floor | base step memory | SAM - base memory "
          "| SAM - floor memory | trainable weights |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if args.memory_only:
            r.update(dict.fromkeys(("base_ms", "floor_ms", "sam_ms",
                                    "sam_over_base", "sam_over_floor"),
                                   float("nan")))
        print(f"| {r['model']} | {r['base_ms']:.2f} | {r['floor_ms']:.2f} | "
              f"{r['sam_ms']:.2f} | {r['sam_over_base']:.3f} | "
              f"{r['sam_over_floor']:.3f} | {r['base_working_mb']:.1f} MB | "
              f"{r['overhead_mb']:.2f} MB | {r['over_floor_mb']:.2f} MB | "
              f"{r['weights_mb']:.2f} MB |")
    if args.msam:
        print("\n| model | MSAM ms/step | MSAM/base | MSAM - base memory |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r.get('msam_ms', float('nan')):.2f} | "
                  f"{r.get('msam_over_base', float('nan')):.3f} | "
                  f"{r['msam_overhead_mb']:.2f} MB |")
    return rows


def variants_table(models, rounds: int, seconds: float) -> dict:
    tables = {}
    for name in models:
        tables[name] = (time_variants(name, rounds, seconds),
                        looksam_buffer_mb(name), msam_working_mb(name))
        print(f"measured {name}", file=sys.stderr)
    print(f"\nTensorFlow {tf.__version__}, Keras {keras.__version__}, "
          f"{os.cpu_count()} CPU cores; median of {rounds} alternating "
          "rounds; rho = 0.05 (ASAM 0.5)")
    for name, (rows, (extra, weights), msam) in tables.items():
        print(f"\n{name}: LookSAM's g_v buffer {extra:.2f} MB resident over "
              f"SAM; MSAM's step {msam:.2f} MB of working memory over the "
              f"base step; trainable weights {weights:.2f} MB\n")
        print("| step | ms/step | / base | / SAM | / floor |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['ms']:.2f} | {r['over_base']:.3f} "
                  f"| {r['over_sam']:.3f} | {r['over_floor']:.3f} |")
    return tables


if __name__ == "__main__":
    main()
