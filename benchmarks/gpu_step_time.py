"""SAMModel's step on GPU-sized models, against the floor and a hand-written
SAM, on JAX or PyTorch.

    python benchmarks/gpu_step_time.py --backend jax      # or torch
    python benchmarks/gpu_step_time.py --backend torch --small   # CPU try-out
    python benchmarks/gpu_step_time.py --backend torch --profile  # host syncs

Rows (float32, and the Transformer also under `mixed_bfloat16`): a
ResNet-style CNN with BatchNorm, batch 256 of 32x32x3; a Transformer, d512,
4 layers, 8 heads, sequence 256, batch 64; an MLP 1024-4096-4096-10, batch
1024; and step_time.py's MLP and CNN.

Columns: base, floor, SAM and MSAM (`direction="momentum"`) through `fit`
as in step_time.py. The peers are hand-written SAM steps on the same Keras
model with the batch already on the device and no `fit` around them: on JAX
a jitted stateless step (two `jax.value_and_grad` and
`optimizer.stateless_apply`), on PyTorch a loop in the style of the most
used PyTorch SAM optimizer (autograd, add e in place, second gradient,
subtract e, `torch.optim.SGD`); their base is the same code with one
gradient. Medians of alternating rounds, in ms per step; ratios are medians
of per-round ratios. On PyTorch a second table has base, floor and SAM
compiled with `jit_compile=True` and their compile times (the first 5
steps' time minus 5 timed steps).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

bench.use_backend("jax")

import keras  # noqa: E402
import step_time  # noqa: E402

SMALL = "--small" in sys.argv
RHO = 0.05


def resnet_cnn():
    return step_time.cnn(((64, 1), (64, 1), (128, 2), (128, 1), (256, 2),
                          (256, 1)), batch=8 if SMALL else 256)


def transformer():
    return step_time.transformer(*((16, 64, 100, 2, 1, 4) if SMALL else
                                   (256, 512, 8000, 8, 4, 64)))


def mlp():
    return step_time.mlp(1024, *((64, 8) if SMALL else (4096, 1024)))


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
COMPILED = step_time.COMPILED


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _optimizer():
    return keras.optimizers.SGD(0.01, momentum=0.9)


def peer_jax(make, sam: bool):
    import jax
    import jax.numpy as jnp

    keras.utils.set_random_seed(0)
    model, x, y = make()
    loss_fn, optimizer = _loss(), _optimizer()
    optimizer.build(model.trainable_variables)
    state = [([v.value for v in model.trainable_variables],
              [v.value for v in model.non_trainable_variables],
              [v.value for v in optimizer.variables])]
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

    def one():
        state[0], value = step(state[0], x, y)
        return value

    return bench.timed(one, sync=lambda value: value.block_until_ready())


def peer_torch(make, sam: bool):
    import torch

    keras.utils.set_random_seed(0)
    model, x, y = make()
    loss_fn = _loss()
    device = keras.ops.convert_to_tensor(0.0).device
    x, y = (torch.as_tensor(t, device=device) for t in (x, y))
    model(x[:1])
    params = [v.value for v in model.trainable_variables]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    gradient = lambda: torch.autograd.grad(  # noqa: E731
        loss_fn(y, model(x, training=True)), params)

    def one():
        grads = gradient()
        if sam:
            with torch.no_grad():
                norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2)
                eps = [g * (RHO / (norm + 1e-12)) for g in grads]
                for p, e in zip(params, eps):
                    p.add_(e)   # climb to w + e(w)
            grads = gradient()
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.sub_(e)   # back to w
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()

    sync = (torch.cuda.synchronize if torch.cuda.is_available()
            else lambda: None)
    sync()
    return bench.timed(one, sync=lambda _: sync())


def build(make, variant):
    if variant.startswith("peer"):
        peer = peer_jax if keras.backend.backend() == "jax" else peer_torch
        return peer(make, variant == "peer SAM")
    return step_time.build(make, step_time.MSAM if variant == "MSAM"
                           else variant)[0]


def time_row(make, policy, rounds, seconds, variants):
    """{variant: seconds per step in each round}, and {variant: seconds of
    its first 5 steps} (compile and warm-up)."""
    keras.mixed_precision.set_global_policy(policy)
    if keras.backend.backend() == "torch":
        import torch

        torch._dynamo.reset()   # each row compiles its own steps
    try:
        runs = {v: build(make, v) for v in variants}
        first = {v: 5 * run(5) for v, run in runs.items()}
        steps = bench.steps_for(runs["floor"], seconds, multiple=5)
        return bench.alternate(runs, rounds, steps), first
    finally:
        keras.mixed_precision.set_global_policy("float32")


def host_work(make, steps=5) -> dict:
    """PyTorch: per `fit` step of the floor and of SAM, the host syncs
    (`cudaStreamSynchronize`, `.item()`/`bool()` on a tensor), host-to-device
    copies and kernel launches, from `torch.profiler`."""
    import torch

    keys = {"stream syncs": ("cudaStreamSynchronize",),
            "item/bool": ("aten::_local_scalar_dense", "aten::is_nonzero"),
            "host-to-device copies": ("Memcpy HtoD",),
            "kernel launches": ("cudaLaunchKernel",)}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    out = {}
    for variant in ("floor", "SAM"):
        run = build(make, variant)
        run(3)
        with torch.profiler.profile(activities=activities) as prof:
            run(steps)
        counts = dict.fromkeys(keys, 0)
        for event in prof.key_averages():
            for name, prefixes in keys.items():
                if event.key.startswith(prefixes):
                    counts[name] += event.count
        out[variant] = {k: c / steps for k, c in counts.items()}
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
        counts = {name: host_work(ROWS[name][0]) for name in args.rows}
        return bench.table(["model", "per step", "floor", "SAM"], [
            [name, key, f"{c['floor'][key]:.1f}", f"{c['SAM'][key]:.1f}"]
            for name, c in counts.items() for key in c["floor"]])
    print(f"{bench.device()}; median of {args.rounds} alternating rounds"
          + (" (--small models)" if args.small else ""), flush=True)
    variants = VARIANTS + (COMPILED if args.backend == "torch" else ())
    med, ratio = bench.ms, bench.ratio
    rows = {name: time_row(ROWS[name][0], ROWS[name][1], args.rounds,
                           args.seconds, variants) for name in args.rows}
    bench.table(
        ["model", *VARIANTS, "SAM/floor", "SAM/base", "peer SAM/base",
         "MSAM/base"],
        [[name, *(f"{med(t[v]):.2f}" for v in VARIANTS),
          *(f"{ratio(t, a, b):.3f}" for a, b in (
              ("SAM", "floor"), ("SAM", "base"), ("peer SAM", "peer base"),
              ("MSAM", "base")))] for name, (t, _) in rows.items()])
    if args.backend == "torch":
        bench.table(
            ["model", *COMPILED, "SAM/floor compiled", "SAM/base compiled",
             "SAM compiled/SAM eager", "compile s (base, floor, SAM)"],
            [[name, *(f"{med(t[v]):.2f}" for v in COMPILED),
              *(f"{ratio(t, 'SAM compiled', b):.3f}" for b in (
                  "floor compiled", "base compiled", "SAM")),
              ", ".join(f"{first[v] - 5 * med(t[v]) / 1e3:.1f}"
                        for v in COMPILED)]
             for name, (t, first) in rows.items()],
            caption="Compiled (`jit_compile=True`; base: Keras's own "
            "compiled step, floor and SAM: keras_sam's)")
    return rows


if __name__ == "__main__":
    main()
