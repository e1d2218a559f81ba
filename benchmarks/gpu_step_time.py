"""SAMModel's step on GPU-sized models, against the floor and a hand-written
SAM, on JAX or PyTorch.

    python benchmarks/gpu_step_time.py --backend jax      # or torch
    python benchmarks/gpu_step_time.py --backend torch --small   # CPU try-out
    python benchmarks/gpu_step_time.py --backend torch --profile  # host syncs

Rows (float32, and the Transformer also under `mixed_bfloat16`):

- ResNet-style CNN with BatchNorm, batch 256 of 32x32x3;
- Transformer: d512, 4 layers, 8 heads, sequence 256, batch 64;
- MLP 1024-4096-4096-10, batch 1024.

Columns: base, floor and SAM through `fit` on a PyDataset that repeats one
batch (benchmarks/other_backends.py: the batch crosses from the host each
step; the floor is two gradients and one update and nothing else); MSAM is
`SAMModel(direction="momentum")` the same way. The peers are hand-written
SAM steps on the same Keras model with the batch already on the device and
no `fit` around them: on JAX a jitted stateless step (two
`jax.value_and_grad` and `optimizer.stateless_apply`), on PyTorch a loop in
the style of the most used PyTorch SAM optimizer (autograd, add e in place,
second gradient, subtract e, `torch.optim.SGD`). Their base is the same
code with one gradient. Times are medians of alternating rounds, in ms per
step; the ratios are medians of per-round ratios.

On PyTorch a second table has base, floor and SAM compiled with
`jit_compile=True` (base: Keras's own compiled step; floor and SAM through
keras_sam's compiled step, other_backends.py), their ratios and compile
times (the first 5 steps' time minus 5 timed steps).
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
    return "jax"


os.environ["KERAS_BACKEND"] = _backend(sys.argv)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402
import other_backends  # noqa: E402
import step_time  # noqa: E402

SMALL = "--small" in sys.argv
RHO = 0.05


def resnet_cnn():
    n = 8 if SMALL else 256
    x = np.random.default_rng(0).normal(size=(n, 32, 32, 3)).astype("float32")
    y = np.random.default_rng(1).integers(0, 10, size=(n,))
    layers = [keras.Input((32, 32, 3))]
    for filters, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2),
                            (256, 1)):
        layers += [keras.layers.Conv2D(filters, 3, strides=stride,
                                       padding="same", use_bias=False),
                   keras.layers.BatchNormalization(), keras.layers.ReLU()]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    return keras.Sequential(layers), x, y


def transformer():
    seq, dim, vocab, heads, depth = ((16, 64, 100, 2, 1) if SMALL else
                                     (256, 512, 8000, 8, 4))
    n = 4 if SMALL else 64
    x = np.random.default_rng(0).integers(0, vocab, size=(n, seq))
    y = np.random.default_rng(1).integers(0, 10, size=(n,))
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


def mlp():
    n, width = (8, 64) if SMALL else (1024, 4096)
    x = np.random.default_rng(0).normal(size=(n, 1024)).astype("float32")
    y = np.random.default_rng(1).integers(0, 10, size=(n,))
    return keras.Sequential([
        keras.Input((1024,)), keras.layers.Dense(width, activation="relu"),
        keras.layers.Dense(width, activation="relu"),
        keras.layers.Dense(10)]), x, y


# name -> (model function, dtype policy)
ROWS = {
    "ResNet-style CNN+BN b256": (resnet_cnn, "float32"),
    "Transformer d512 L4 s256 b64": (transformer, "float32"),
    "Transformer, mixed_bfloat16": (transformer, "mixed_bfloat16"),
    "MLP 4096 b1024": (mlp, "float32"),
    "step_time.py's MLP": (step_time.mlp, "float32"),
    "step_time.py's CNN+BN": (step_time.cnn, "float32"),
}
VARIANTS = ("base", "floor", "SAM", "MSAM", "peer base", "peer SAM")
COMPILED = other_backends.COMPILED


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _optimizer():
    return keras.optimizers.SGD(0.01, momentum=0.9)


def build_fit(make, variant):
    """(callable running n steps through `fit`, its sync)."""
    keras.utils.set_random_seed(0)
    model, x, y = make()
    jit = variant.endswith(" compiled")
    variant = variant.removesuffix(" compiled")
    if variant == "base":
        wrapped = model
    elif variant == "floor":
        wrapped = other_backends.floor_model(model)
    else:
        wrapped = keras_sam.SAMModel(
            model, rho=2.0 if variant == "MSAM" else RHO,
            direction="momentum" if variant == "MSAM" else "gradient")
    wrapped.compile(optimizer=_optimizer(), loss=_loss(),
                    **({"jit_compile": jit}
                       if keras.backend.backend() == "torch" else {}))
    return lambda n: other_backends.run_steps((wrapped, x, y), n)


def build_peer_jax(make, sam: bool):
    import jax
    import jax.numpy as jnp

    keras.utils.set_random_seed(0)
    model, x, y = make()
    loss_fn, optimizer = _loss(), _optimizer()
    optimizer.build(model.trainable_variables)
    state = ([v.value for v in model.trainable_variables],
             [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])
    x, y = jnp.asarray(x), jnp.asarray(y)

    def loss(w, s, x, y):
        y_pred, s = model.stateless_call(w, s, x, training=True)
        return loss_fn(y, y_pred), s

    grad = jax.value_and_grad(loss, has_aux=True)

    @jax.jit
    def step(state, x, y):
        w, s, o = state
        (value, new_s), g = grad(w, s, x, y)
        if sam:
            norm = jnp.sqrt(sum(jnp.sum(jnp.square(t)) for t in g))
            scale = RHO / (norm + 1e-12)
            (value, _), g = grad([a + scale * b for a, b in zip(w, g)], s,
                                 x, y)
        w, o = optimizer.stateless_apply(o, g, w)
        return (w, new_s, o), value

    box = [state]

    def run(n):
        start = time.perf_counter()
        for _ in range(n):
            box[0], value = step(box[0], x, y)
        value.block_until_ready()
        return (time.perf_counter() - start) / n

    return run


def build_peer_torch(make, sam: bool):
    import torch

    keras.utils.set_random_seed(0)
    model, x, y = make()
    loss_fn = _loss()
    device = keras.ops.convert_to_tensor(0.0).device
    x, y = torch.as_tensor(x, device=device), torch.as_tensor(y,
                                                             device=device)
    model(x[:1])
    params = [v.value for v in model.trainable_variables]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def one_step():
        grads = torch.autograd.grad(loss_fn(y, model(x, training=True)),
                                    params)
        if sam:
            with torch.no_grad():
                norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2)
                scale = RHO / (norm + 1e-12)
                eps = [g * scale for g in grads]
                for p, e in zip(params, eps):
                    p.add_(e)   # climb to w + e(w)
            grads = torch.autograd.grad(loss_fn(y, model(x, training=True)),
                                        params)
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.sub_(e)   # back to w
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()

    def run(n):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else \
            (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(n):
            one_step()
        sync()
        return (time.perf_counter() - start) / n

    return run


def build(make, variant):
    if not variant.startswith("peer"):
        return build_fit(make, variant)
    peer = (build_peer_jax if keras.backend.backend() == "jax"
            else build_peer_torch)
    return peer(make, variant == "peer SAM")


def time_row(make, policy, rounds, seconds, variants=VARIANTS):
    """{variant: per-round seconds per step}, and {variant: seconds of its
    first 5 steps} (compile and warm-up)."""
    keras.mixed_precision.set_global_policy(policy)
    if keras.backend.backend() == "torch":
        import torch

        torch._dynamo.reset()   # each row compiles its own steps
    try:
        runs = {v: build(make, v) for v in variants}
        first = {v: 5 * run(5) for v, run in runs.items()}   # compile, warm
        steps = max(5, int(seconds / runs["floor"](5)))
        t = {v: [] for v in variants}
        for r in range(rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                t[v].append(runs[v](steps))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {v: np.array(t[v]) for v in variants}, first


def host_work(make, steps=5) -> dict:
    """PyTorch: per `fit` step of the floor and of SAM, the host syncs
    (`cudaStreamSynchronize`, `.item()`/`bool()` on a tensor), host-to-device
    copies and kernel launches, from `torch.profiler`."""
    import torch

    keys = {"stream syncs": ("cudaStreamSynchronize",),
            "item/bool": ("aten::_local_scalar_dense", "aten::is_nonzero"),
            "host-to-device copies": ("Memcpy HtoD",),
            "kernel launches": ("cudaLaunchKernel",)}
    out = {}
    for variant in ("floor", "SAM"):
        run = build_fit(make, variant)
        run(3)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            run(steps)
        counts = {}
        for event in prof.key_averages():
            for name, prefixes in keys.items():
                if any(event.key.startswith(p) for p in prefixes):
                    counts[name] = counts.get(name, 0) + event.count
        out[variant] = {k: counts.get(k, 0) / steps for k in keys}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="jax", choices=("jax", "torch"))
    parser.add_argument("--small", action="store_true",
                        help="tiny models, for a try-out on a CPU")
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--profile", action="store_true",
                        help="PyTorch: count host syncs, host-to-device "
                        "copies and launches per step (floor vs SAM)")
    args = parser.parse_args(argv)
    if args.profile:
        print("| model | per step | floor | SAM |\n|---|---|---|---|")
        for name in args.rows:
            counts = host_work(ROWS[name][0])
            for key in counts["floor"]:
                print(f"| {name} | {key} | {counts['floor'][key]:.1f} | "
                      f"{counts['SAM'][key]:.1f} |", flush=True)
        return None
    print(f"{other_backends.device_name()}, Keras {keras.__version__}; "
          f"median of {args.rounds} alternating rounds"
          + (" (--small models)" if args.small else ""), flush=True)
    print("\n| model | base | floor | SAM | MSAM | peer base | peer SAM "
          "| SAM/floor | SAM/base | peer SAM/base | MSAM/base |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    med = lambda a: float(np.median(a))  # noqa: E731
    variants = VARIANTS + (COMPILED if args.backend == "torch" else ())
    rows = {}
    for name in args.rows:
        make, policy = ROWS[name]
        t, first = time_row(make, policy, args.rounds, args.seconds,
                            variants)
        rows[name] = (t, first)
        ms = " | ".join(f"{1e3 * med(t[v]):.2f}" for v in VARIANTS)
        print(f"| {name} | {ms} | {med(t['SAM'] / t['floor']):.3f} | "
              f"{med(t['SAM'] / t['base']):.3f} | "
              f"{med(t['peer SAM'] / t['peer base']):.3f} | "
              f"{med(t['MSAM'] / t['base']):.3f} |", flush=True)
    if args.backend == "torch":
        print("\nCompiled (`jit_compile=True`; base: Keras's own compiled "
              "step, floor and SAM: keras_sam's)\n")
        print("| model | base compiled | floor compiled | SAM compiled "
              "| SAM/floor compiled | SAM/base compiled "
              "| SAM compiled/SAM eager | compile s (base, floor, SAM) |")
        print("|---|---|---|---|---|---|---|---|")
        for name, (t, first) in rows.items():
            ms = " | ".join(f"{1e3 * med(t[v]):.2f}" for v in COMPILED)
            compile_s = ", ".join(f"{first[v] - 5 * med(t[v]):.1f}"
                                  for v in COMPILED)
            print(f"| {name} | {ms} | "
                  f"{med(t['SAM compiled'] / t['floor compiled']):.3f} | "
                  f"{med(t['SAM compiled'] / t['base compiled']):.3f} | "
                  f"{med(t['SAM compiled'] / t['SAM']):.3f} | "
                  f"{compile_s} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
