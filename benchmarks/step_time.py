"""Step time and memory of SAMModel against the base model and the floor.

    python benchmarks/step_time.py            # full run, a few minutes
    python benchmarks/step_time.py --quick    # fewer rounds
    python benchmarks/step_time.py --variants # every SAM variant's step
    python benchmarks/step_time.py --backend jax      # or torch
    python benchmarks/step_time.py --backend torch --optimizer adam
                                    # PyTorch adds jit_compile=True columns
    python benchmarks/step_time.py --models "KerasHub BERT" \
        "KerasHub BERT LoRA"                          # needs keras-hub

Each model in three variants, compiled with the same optimizer and loss:
base (the plain Keras model, one gradient per step), floor (two gradients
in sequence and one update, nothing else: benchmarks/floors.py) and SAM
(keras_sam.SAMModel); on JAX and PyTorch also MSAM (`direction="momentum"`,
rho 2), on TensorFlow with --msam.

Time: all variants of a model are built once and timed in alternating
rounds in one process (benchmarks/bench.py); the figure is the median over
rounds, a ratio the median of the per-round ratio. On TensorFlow a step is a
call of the train function on a repeated batch; on JAX and PyTorch a `fit`
on a PyDataset that repeats one batch (it crosses from the host each step,
for every variant alike).

Memory, each (model, variant) in a fresh process. TensorFlow: its BFC
allocator on the CPU (TF_CPU_ALLOCATOR_USE_BFC=true) counts every tensor it
hands out; one op at a time on one thread steadies the peak (it still moves
by a few MB between runs). After warm-up its peak is reset; a step's working
memory is the peak over the timed steps minus what was allocated before
them (weights, optimizer slots). JAX: the scratch memory XLA plans for the
compiled train step (`memory_analysis()`, the same on a CPU or a GPU).
PyTorch with CUDA: the allocator's peak during the steps minus what was
resident before them; on the CPU it counts nothing, and the table says so.

PyTorch adds base, floor and SAM compiled with `jit_compile=True`: base is
Keras's own `torch.compile` of its step, floor and SAM go through
keras_sam's compiled step. Each runs in a fresh process (dynamo's caches of
Keras's own functions would be shared between the models of one process);
compile time is the first 10 steps' time minus 10 timed steps, graph breaks
and graphs dynamo's counters over those steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

BACKEND = (bench.use_backend("tensorflow") if __name__ == "__main__" else
           os.environ.setdefault("KERAS_BACKEND", "tensorflow"))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402
from floors import floor_model  # noqa: E402


def mlp(inputs=512, width=1024, batch=256):
    x = np.random.default_rng(0).normal(size=(batch, inputs)).astype(
        "float32")
    y = np.random.default_rng(1).integers(0, 10, size=(batch,))
    return keras.Sequential([
        keras.Input((inputs,)), keras.layers.Dense(width, activation="relu"),
        keras.layers.Dense(width, activation="relu"),
        keras.layers.Dense(10)]), x, y


def cnn(plan=((32, 1), (64, 2), (64, 1), (128, 2)), batch=64):
    """Conv (filters, stride) + BatchNorm + ReLU blocks, pooled."""
    x = np.random.default_rng(0).normal(size=(batch, 32, 32, 3)).astype(
        "float32")
    y = np.random.default_rng(1).integers(0, 10, size=(batch,))
    layers = [keras.Input((32, 32, 3))]
    for filters, stride in plan:
        layers += [keras.layers.Conv2D(filters, 3, strides=stride,
                                       padding="same", use_bias=False),
                   keras.layers.BatchNormalization(), keras.layers.ReLU()]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    return keras.Sequential(layers), x, y


def transformer(seq=64, dim=128, vocab=2000, heads=4, depth=2, batch=32):
    x = np.random.default_rng(0).integers(0, vocab, size=(batch, seq))
    y = np.random.default_rng(1).integers(0, 10, size=(batch,))
    inputs = keras.Input((seq,), dtype="int32")
    h = keras.layers.Embedding(vocab, dim)(inputs)
    for _ in range(depth):
        a = keras.layers.MultiHeadAttention(heads, dim // heads)(h, h)
        h = keras.layers.LayerNormalization()(h + a)
        f = keras.layers.Dense(4 * dim, activation="gelu")(h)
        h = keras.layers.LayerNormalization()(h + keras.layers.Dense(dim)(f))
    pooled = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(10, dtype="float32")(pooled)
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
          "KerasHub BERT": kerashub_bert,
          "KerasHub BERT LoRA": lambda: kerashub_bert(lora_rank=4)}
DEFAULT_MODELS = ("MLP", "CNN+BatchNorm", "Transformer")
MSAM = "MSAM (direction=momentum)"
# SAMModel arguments (rho 0.05 unless given), and the optimizer iteration
# to start from: "one-pass" rows start at iteration 1 with sam_every =
# 10**9, so every timed step is a step between SAM steps; "cycle" rows
# average over whole cycles.
NEVER = 10**9
VARIANT_STEPS = {
    "SAM": ({}, 0),
    "rho=0 (no pass 2)": ({"rho": 0.0}, 0),
    MSAM: ({"direction": "momentum", "rho": 2.0}, 0),
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
OPTIMIZERS = {"sgd_momentum": lambda: keras.optimizers.SGD(0.01,
                                                            momentum=0.9),
              "adam": lambda: keras.optimizers.Adam(1e-3)}
COMPILED = ("base compiled", "floor compiled", "SAM compiled")
# Steps of warm-up, and steps per round a multiple of it (every-k cycles).
CYCLE = 20 if BACKEND == "tensorflow" else 10


class Repeat(keras.utils.PyDataset):
    """One batch, `steps` times."""

    def __init__(self, x, y, steps):
        super().__init__()
        self.batch, self.steps = (x, y), steps

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        return self.batch


def build(make, variant: str, optimizer: str = "sgd_momentum"):
    """(a run of `variant` of the model `make()` builds, the compiled
    model, its batch); a variant ending in " compiled" has
    `jit_compile=True`."""
    keras.utils.set_random_seed(0)
    model, x, y = make()
    jit = variant.endswith(" compiled")
    variant, start = variant.removesuffix(" compiled"), 0
    if variant == "base":
        wrapped = model
    elif variant == "floor":
        wrapped = floor_model(model)
    else:
        kwargs, start = VARIANT_STEPS[variant]
        wrapped = keras_sam.SAMModel(model, **{"rho": 0.05, **kwargs})
    wrapped.compile(
        optimizer=OPTIMIZERS[optimizer](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **({"jit_compile": jit} if BACKEND == "torch" else {}))
    if BACKEND != "tensorflow":
        def run(n):
            start = time.perf_counter()
            wrapped.fit(Repeat(x, y, n), epochs=1, verbose=0, shuffle=False)
            return (time.perf_counter() - start) / n
        return run, wrapped, (x, y)
    import tensorflow as tf

    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    wrapped.make_train_function()
    if start:
        wrapped.optimizer.build(wrapped.trainable_variables)
        wrapped.optimizer.iterations.assign(start)
    return bench.timed(
        lambda: wrapped.train_function(iterator),
        sync=lambda logs: tf.nest.map_structure(lambda t: t.numpy(), logs)
    ), wrapped, (x, y)


def time_rounds(name, variants, rounds, seconds, optimizer="sgd_momentum"):
    """{variant: seconds per step in each round}."""
    runs = {v: build(MODELS[name], v, optimizer)[0] for v in variants}
    for run in runs.values():
        run(CYCLE)   # trace or compile, and warm up
    steps = bench.steps_for(runs["floor"], seconds, multiple=CYCLE)
    return bench.alternate(runs, rounds, steps), steps


def memory_child(name: str, variant: str, steps: int, optimizer: str):
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(1)
    run, wrapped, batch = build(MODELS[name], variant, optimizer)
    run(5)
    weights = sum(int(np.prod(v.shape)) * 4
                  for v in wrapped.trainable_variables)
    if BACKEND == "tensorflow":
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        run(steps)
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
        return {"working_bytes": peak - before, "weights_bytes": weights,
                "resident_bytes": before}
    if BACKEND == "jax":
        return {"working_bytes": _xla_temp_bytes(wrapped, batch),
                "weights_bytes": weights}
    import torch

    if not torch.cuda.is_available():
        return {"working_bytes": None, "weights_bytes": weights}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    run(steps)
    torch.cuda.synchronize()
    return {"working_bytes": torch.cuda.max_memory_allocated() - resident,
            "weights_bytes": weights}


def _xla_temp_bytes(wrapped, batch) -> int:
    """JAX: the scratch memory XLA plans for one compiled train step (its
    buffers besides the state and the batch)."""
    import jax

    state = tuple([v.value for v in vs] for vs in (
        wrapped.trainable_variables, wrapped.non_trainable_variables,
        wrapped.optimizer.variables, wrapped.metrics_variables))
    step = jax.jit(lambda state, data: wrapped.train_step(state, data))
    compiled = step.lower(state, batch).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def memory_mb(name, variants, steps, optimizer) -> dict:
    """{variant: (working MB or None, weights MB, resident MB)}, each
    variant in a fresh process."""
    out = {}
    for v in variants:
        r = bench.child(
            [__file__, "--backend", BACKEND, "--memory-child", name, v,
             "--steps", steps, "--optimizer", optimizer],
            env={"TF_CPU_ALLOCATOR_USE_BFC": "true"})
        mb = lambda key: None if r.get(key) is None else r[key] / 2**20  # noqa
        out[v] = (mb("working_bytes"), mb("weights_bytes"),
                  mb("resident_bytes"))
    return out


def compiled_child(name, variant, rounds, steps, optimizer) -> dict:
    """PyTorch: one compiled variant in this (fresh) process: its first 10
    steps (compile), dynamo's counts over them, then `rounds` timings."""
    from torch._dynamo.utils import counters

    run = build(MODELS[name], variant, optimizer)[0]
    counters.clear()
    first = 10 * run(10)
    return {"first_s": first, "times": [run(steps) for _ in range(rounds)],
            "breaks": sum(counters["graph_break"].values()),
            "graphs": counters["stats"]["unique_graphs"]}


def compiled_row(name, rounds, steps, optimizer, sam_eager) -> list:
    runs = {v: bench.child(
        [__file__, "--backend", "torch", "--compiled-child", name, v,
         "--steps", steps, "--rounds", rounds, "--optimizer", optimizer])
        for v in COMPILED}
    ms = {v: bench.ms(r["times"]) for v, r in runs.items()}
    trio = lambda f: ", ".join(f(v) for v in COMPILED)  # noqa: E731
    return [name, *(f"{ms[v]:.2f}" for v in COMPILED),
            f"{ms['SAM compiled'] / ms['floor compiled']:.3f}",
            f"{ms['SAM compiled'] / ms['base compiled']:.3f}",
            f"{ms['SAM compiled'] / bench.ms(sam_eager):.3f}",
            trio(lambda v: f"{runs[v]['first_s'] - 10 * ms[v] / 1e3:.1f}"),
            trio(lambda v: str(runs[v]["breaks"])),
            trio(lambda v: str(runs[v]["graphs"]))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL",
                                                            "VARIANT"))
    parser.add_argument("--compiled-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=9,
                        help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", default="sgd_momentum",
                        choices=list(OPTIMIZERS),
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
    if args.memory_child:
        return print(json.dumps(memory_child(
            *args.memory_child, args.steps, args.optimizer)))
    if args.compiled_child:
        return print(json.dumps(compiled_child(
            *args.compiled_child, args.rounds, args.steps, args.optimizer)))
    if args.variants and BACKEND != "tensorflow":
        parser.error("--variants is timed on TensorFlow only")
    rounds, seconds = (3, 0.5) if args.quick else (args.rounds, 1.5)
    if args.variants:
        return variants_table(args.models, rounds, seconds)
    msam = args.msam or BACKEND != "tensorflow"
    variants = ("base", "floor", "SAM") + ((MSAM,) if msam else ())
    rows, compiled = [], []
    for name in args.models:
        t, steps = ({}, 0) if args.memory_only else time_rounds(
            name, variants, rounds, seconds, args.optimizer)
        mem = memory_mb(name, variants, args.steps, args.optimizer)
        rows.append((name, t, mem))
        if BACKEND == "torch" and t:
            compiled.append(compiled_row(name, rounds, steps, args.optimizer,
                                         t["SAM"]))
        print(f"measured {name}", file=sys.stderr)
    print_tables(rows, compiled, rounds, args.optimizer, msam)
    return rows


def print_tables(rows, compiled, rounds, optimizer, msam) -> None:
    ms = lambda t, v: bench.fmt(bench.ms(t[v]) if t else None)  # noqa
    over = lambda t, a, b: bench.fmt(  # noqa: E731
        bench.ratio(t, a, b) if t else None, ".3f")
    diff = lambda m, a, b: ("n/a" if m[a][0] is None  # noqa: E731
                            else f"{m[a][0] - m[b][0]:.2f} MB")
    timing = lambda t: [ms(t, "base"), ms(t, "floor"), ms(t, "SAM"),  # noqa
                        over(t, "SAM", "base"), over(t, "SAM", "floor")]
    columns = ["model", "base ms/step", "floor ms/step", "SAM ms/step",
               "SAM/base", "SAM/floor"]
    if BACKEND == "tensorflow":
        bench.table(
            columns + ["base step memory", "SAM - base memory",
                       "SAM - floor memory", "trainable weights"],
            [[n, *timing(t), f"{m['base'][0]:.1f} MB",
              diff(m, "SAM", "base"), diff(m, "SAM", "floor"),
              f"{m['SAM'][1]:.2f} MB"] for n, t, m in rows],
            caption=f"{bench.device()}; median of {rounds} alternating "
                    "rounds")
        if msam:
            bench.table(
                ["model", "MSAM ms/step", "MSAM/base", "MSAM - base memory"],
                [[n, ms(t, MSAM), over(t, MSAM, "base"),
                  diff(m, MSAM, "base")] for n, t, m in rows])
        return
    name = "Adam" if optimizer == "adam" else "SGD with momentum"
    bench.table(
        columns + ["MSAM ms/step", "MSAM/base", "SAM - base memory",
                   "SAM - floor memory", "MSAM - base memory",
                   "trainable weights"],
        [[n, *timing(t), ms(t, MSAM), over(t, MSAM, "base"),
          *(["not counted (CPU)", "-", "-"] if m["SAM"][0] is None else
            [diff(m, "SAM", "base"), diff(m, "SAM", "floor"),
             diff(m, MSAM, "base")]), f"{m['SAM'][1]:.2f} MB"]
         for n, t, m in rows],
        caption=f"{bench.device()}; {name}; median of {rounds} "
                "alternating rounds")
    if compiled:
        bench.table(
            ["model", "base compiled ms/step", "floor compiled ms/step",
             "SAM compiled ms/step", "SAM/floor compiled",
             "SAM/base compiled", "SAM compiled/SAM eager",
             "compile s (base, floor, SAM)",
             "graph breaks (base, floor, SAM)", "graphs (base, floor, SAM)"],
            compiled, caption="Compiled (`jit_compile=True`; base: Keras's "
            "own compiled step, floor and SAM: keras_sam's; each in a fresh "
            "process, ratios of medians)")


def variants_table(models, rounds: int, seconds: float) -> dict:
    variants = ("base", "floor", *VARIANT_STEPS)
    tables = {}
    for name in models:
        t, _ = time_rounds(name, variants, rounds, seconds)
        mem = memory_mb(name, ("base", "SAM", MSAM,
                               "LookSAM k=5: cycle mean"), 5, "sgd_momentum")
        tables[name] = (t, mem)
        print(f"measured {name}", file=sys.stderr)
    print(f"\n{bench.device()}; median of {rounds} alternating rounds; "
          "rho = 0.05 (ASAM 0.5)")
    for name, (t, m) in tables.items():
        bench.table(
            ["step", "ms/step", "/ base", "/ SAM", "/ floor"],
            [[v, f"{bench.ms(t[v]):.2f}", *(f"{bench.ratio(t, v, b):.3f}"
                                              for b in ("base", "SAM",
                                                        "floor"))]
             for v in variants],
            caption=f"{name}: LookSAM's g_v buffer "
            f"{m['LookSAM k=5: cycle mean'][2] - m['SAM'][2]:.2f} MB "
            f"resident over SAM; MSAM's step {m[MSAM][0] - m['base'][0]:.2f} "
            f"MB of working memory over the base step; trainable weights "
            f"{m['SAM'][1]:.2f} MB")
    return tables


if __name__ == "__main__":
    main()
