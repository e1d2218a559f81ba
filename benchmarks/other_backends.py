"""`benchmarks/step_time.py --backend jax|torch`: the same table as on
TensorFlow (base, floor, SAM; median of alternating rounds), through
`fit` on a PyDataset that repeats one batch (the batch crosses from the host
each step, for every variant alike). The floor is two gradients of the same
batch in sequence and one optimizer update, nothing else.

Memory, each (model, variant) in a fresh process: on JAX, the scratch
memory XLA plans for the compiled train step (`memory_analysis()`, the same
on a CPU or a GPU); on PyTorch with CUDA, the allocator's peak during the
steps minus what was resident before them. PyTorch on the CPU counts no
allocations, and the table says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import keras
import numpy as np

import keras_sam

VARIANTS = ("base", "floor", "SAM", "MSAM")


def floor_model(model: keras.Model) -> keras.Model:
    backend = keras.backend.backend()
    if backend == "jax":
        return JaxFloor(model)
    if backend == "torch":
        return TorchFloor(model)
    raise ValueError(f"no floor for backend {backend!r} here")


class _Wrapper(keras.Model):
    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)


class JaxFloor(_Wrapper):
    """XLA merges two identical passes, so the second pass reads its input
    through a multiplication by 1 that depends on the first gradient."""

    def train_step(self, state, data):
        import jax
        import jax.numpy as jnp

        trainable, non_trainable, opt, metrics = state
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        grad_fn = jax.value_and_grad(self.compute_loss_and_updates,
                                     has_aux=True)

        def gradient(inputs):
            return grad_fn(trainable, non_trainable, metrics, inputs, y, sw,
                           training=True, optimizer_variables=opt)

        (_, aux), first = gradient(x)
        unscaled, y_pred, new_non_trainable, new_metrics = aux
        tie = sum(jnp.ravel(g)[0] for g in first)
        one = 1.0 + 0.0 * tie   # 1.0, known only after pass 1
        _, second = gradient(keras.tree.map_structure(
            lambda t: t * one.astype(t.dtype), x))
        trainable, opt = self.optimizer.stateless_apply(opt, second,
                                                        trainable)
        logs, new_metrics = self._update_metrics_variables(
            new_metrics, unscaled, x, y, y_pred, sw)
        return logs, (trainable, new_non_trainable, opt, new_metrics)


class TorchFloor(_Wrapper):
    """Eager PyTorch runs both passes as written."""

    def train_step(self, data):
        import torch

        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables
        leaves = [v.value for v in variables]
        for _ in range(2):
            y_pred = self(x, training=True)
            loss = self._compute_loss(x=x, y=y, y_pred=y_pred,
                                      sample_weight=sw, training=True)
            grads = torch.autograd.grad(loss, leaves)
        self._loss_tracker.update_state(loss.detach(),
                                        sample_weight=y_pred.shape[0])
        with torch.no_grad():
            self.optimizer.apply(list(grads), variables)
        return self.compute_metrics(x, y, y_pred, sw)


class _Repeat(keras.utils.PyDataset):
    def __init__(self, x, y, steps):
        super().__init__()
        self.batch, self.steps = (x, y), steps

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        return self.batch


def build(models, model_name: str, variant: str):
    keras.utils.set_random_seed(0)
    model, x, y = models[model_name]()
    if variant == "base":
        wrapped = model
    elif variant == "floor":
        wrapped = floor_model(model)
    elif variant == "MSAM":
        wrapped = keras_sam.SAMModel(model, rho=2.0, direction="momentum")
    else:
        wrapped = keras_sam.SAMModel(model, rho=0.05)
    wrapped.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return wrapped, x, y


def run_steps(built, steps: int) -> float:
    wrapped, x, y = built
    start = time.perf_counter()
    wrapped.fit(_Repeat(x, y, steps), epochs=1, verbose=0, shuffle=False)
    return (time.perf_counter() - start) / steps


def time_model(models, model_name: str, rounds: int, seconds: float) -> dict:
    built = {v: build(models, model_name, v) for v in VARIANTS}
    for b in built.values():
        run_steps(b, 10)   # compile and warm up
    steps = max(10, int(seconds / run_steps(built["floor"], 10)))
    t = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            t[v].append(run_steps(built[v], steps))
    t = {v: np.array(t[v]) for v in VARIANTS}
    return {"base_ms": 1e3 * float(np.median(t["base"])),
            "floor_ms": 1e3 * float(np.median(t["floor"])),
            "sam_ms": 1e3 * float(np.median(t["SAM"])),
            "sam_over_base": float(np.median(t["SAM"] / t["base"])),
            "sam_over_floor": float(np.median(t["SAM"] / t["floor"])),
            "msam_ms": 1e3 * float(np.median(t["MSAM"])),
            "msam_over_base": float(np.median(t["MSAM"] / t["base"]))}


def _xla_temp_bytes(built) -> int:
    """JAX: the scratch memory XLA plans for one compiled train step (its
    buffers besides the state and the batch), from `memory_analysis()`."""
    import jax

    wrapped, x, y = built
    values = lambda vs: [v.value for v in vs]  # noqa: E731
    state = (values(wrapped.trainable_variables),
             values(wrapped.non_trainable_variables),
             values(wrapped.optimizer.variables),
             values(wrapped.metrics_variables))
    step = jax.jit(lambda state, data: wrapped.train_step(state, data))
    compiled = step.lower(state, (x, y)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def _cuda_bytes():
    """PyTorch: (bytes in use, peak bytes) on the GPU, or None on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()


def memory_child(models, model_name: str, variant: str, steps: int) -> dict:
    built = build(models, model_name, variant)
    run_steps(built, 2)
    weights = sum(int(np.prod(v.shape)) * 4
                  for v in built[0].trainable_variables)
    if keras.backend.backend() == "jax":
        return {"working_bytes": _xla_temp_bytes(built),
                "weights_bytes": weights}
    if _cuda_bytes() is None:
        return {"working_bytes": None, "weights_bytes": weights}
    import torch

    torch.cuda.reset_peak_memory_stats()
    resident = _cuda_bytes()
    run_steps(built, steps)
    return {"working_bytes": _cuda_bytes()[1] - resident[0],
            "weights_bytes": weights}


def memory_model(script: str, model_name: str, steps: int) -> dict:
    out = {}
    for variant in VARIANTS:
        res = subprocess.run(
            [sys.executable, script, "--backend", keras.backend.backend(),
             "--memory-child", model_name, variant, "--steps", str(steps)],
            capture_output=True, text=True, check=True, env=dict(os.environ))
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    mb = 1024.0 ** 2
    weights = out["SAM"]["weights_bytes"] / mb
    if out["SAM"]["working_bytes"] is None:
        return {"weights_mb": weights}
    work = {v: out[v]["working_bytes"] / mb for v in VARIANTS}
    return {"weights_mb": weights, "base_working_mb": work["base"],
            "overhead_mb": work["SAM"] - work["base"],
            "over_floor_mb": work["SAM"] - work["floor"],
            "msam_overhead_mb": work["MSAM"] - work["base"]}


def device_name() -> str:
    if keras.backend.backend() == "jax":
        import jax

        d = jax.devices()[0]
        return f"JAX {jax.__version__} on {d.device_kind} ({d.platform})"
    import torch

    where = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
             else f"CPU, {os.cpu_count()} cores")
    return f"PyTorch {torch.__version__} on {where}"


def main(args, models, script: str):
    if args.memory_child:
        print(json.dumps(memory_child(models, *args.memory_child,
                                      args.steps)))
        return None
    rounds, seconds = (3, 0.5) if args.quick else (9, 1.5)
    rows = []
    for name in args.models:
        row = {"model": name}
        if not args.memory_only:
            row.update(time_model(models, name, rounds, seconds))
        row.update(memory_model(script, name, args.steps))
        rows.append(row)
        print(f"measured {name}", file=sys.stderr)
    print(f"\n{device_name()}, Keras {keras.__version__}; median of "
          f"{rounds} alternating rounds\n")
    print("| model | base ms/step | floor ms/step | SAM ms/step | SAM/base "
          "| SAM/floor | MSAM ms/step | MSAM/base | SAM - base memory "
          "| SAM - floor memory | MSAM - base memory | trainable weights |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in rows:
        mem = (f"{r['overhead_mb']:.2f} MB | {r['over_floor_mb']:.2f} MB | "
               f"{r['msam_overhead_mb']:.2f} MB" if "overhead_mb" in r
               else "not counted (CPU) | - | -")
        print(f"| {r['model']} | {r.get('base_ms', nan):.2f} | "
              f"{r.get('floor_ms', nan):.2f} | {r.get('sam_ms', nan):.2f} | "
              f"{r.get('sam_over_base', nan):.3f} | "
              f"{r.get('sam_over_floor', nan):.3f} | "
              f"{r.get('msam_ms', nan):.2f} | "
              f"{r.get('msam_over_base', nan):.3f} | {mem} | "
              f"{r['weights_mb']:.2f} MB |")
    return rows
