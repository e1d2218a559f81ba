"""`benchmarks/step_time.py --backend jax|torch`: the same table as on
TensorFlow (base, floor, SAM; median of alternating rounds), through
`fit` on a PyDataset that repeats one batch (the batch crosses from the host
each step, for every variant alike). The floor is two gradients of the same
batch in sequence and one optimizer update, nothing else.

PyTorch adds the same three compiled with `jit_compile=True` (a second
table): base compiled is Keras's own `torch.compile` of its step; the floor
compiled and SAM compiled go through keras_sam's compiled step
(keras_sam/backend/torch/compiled.py), so that the floor is compiled the
same way as SAM. Each compiled variant runs in a fresh process: dynamo
compiles Keras's own functions (a layer's `forward`, `Functional.call`) as
frames of their own where a step breaks, and those caches would be shared
between the models of one process. Compile time: the first 10 steps' time
minus 10 timed steps. Graph breaks and graphs: dynamo's counters over those
first steps.

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
# --optimizer: "sgd_momentum" (SGD 0.01, momentum 0.9) or "adam" (1e-3).
OPTIMIZER = "sgd_momentum"
COMPILED = ("base compiled", "floor compiled", "SAM compiled")


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
    """Two gradients of the batch and one update. Under `jit_compile=True`
    it is compiled as the SAM step is (keras_sam's compiled step)."""

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=force)
        if self.jit_compile:
            from keras_sam.backend.torch import compiled

            self.train_function = compiled.train_function(self)
        return self.train_function

    def train_step(self, data):
        import torch

        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables
        leaves = [v.value for v in variables]
        inputs = x
        for _ in range(2):
            y_pred = self(inputs, training=True)
            loss = self._compute_loss(x=x, y=y, y_pred=y_pred,
                                      sample_weight=sw, training=True)
            grads = torch.autograd.grad(loss, leaves)
            # torch.compile merges two identical passes: the second reads
            # its input through a multiplication by 1 known only after the
            # first gradient (as JaxFloor does).
            one = 1.0 + 0.0 * grads[0].reshape(-1)[0]
            inputs = keras.tree.map_structure(
                lambda t: t * one.to(t.dtype), x)
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
    jit = variant.endswith(" compiled")
    variant = variant.removesuffix(" compiled")
    if variant == "base":
        wrapped = model
    elif variant == "floor":
        wrapped = floor_model(model)
    elif variant == "MSAM":
        wrapped = keras_sam.SAMModel(model, rho=2.0, direction="momentum")
    else:
        wrapped = keras_sam.SAMModel(model, rho=0.05)
    wrapped.compile(
        optimizer=(keras.optimizers.Adam(1e-3) if OPTIMIZER == "adam" else
                   keras.optimizers.SGD(0.01, momentum=0.9)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **({"jit_compile": jit} if keras.backend.backend() == "torch"
           else {}))
    return wrapped, x, y


def run_steps(built, steps: int) -> float:
    wrapped, x, y = built
    start = time.perf_counter()
    wrapped.fit(_Repeat(x, y, steps), epochs=1, verbose=0, shuffle=False)
    return (time.perf_counter() - start) / steps


def _dynamo_counts():
    """(graph breaks, graphs) that dynamo counted since the last clear."""
    from torch._dynamo.utils import counters

    return (sum(counters["graph_break"].values()),
            counters["stats"]["unique_graphs"])


def time_model(models, model_name: str, rounds: int, seconds: float,
               script: str = None) -> dict:
    t = {v: [] for v in VARIANTS}
    built = {v: build(models, model_name, v) for v in VARIANTS}
    for b in built.values():
        run_steps(b, 10)   # compile and warm up
    steps = max(10, int(seconds / run_steps(built["floor"], 10)))
    for r in range(rounds):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            t[v].append(run_steps(built[v], steps))
    t = {v: np.array(t[v]) for v in VARIANTS}
    out = {}
    if keras.backend.backend() == "torch" and script is not None:
        out = compiled_figures(script, model_name, rounds, steps, t["SAM"])
    return {**out, "base_ms": 1e3 * float(np.median(t["base"])),
            "floor_ms": 1e3 * float(np.median(t["floor"])),
            "sam_ms": 1e3 * float(np.median(t["SAM"])),
            "sam_over_base": float(np.median(t["SAM"] / t["base"])),
            "sam_over_floor": float(np.median(t["SAM"] / t["floor"])),
            "msam_ms": 1e3 * float(np.median(t["MSAM"])),
            "msam_over_base": float(np.median(t["MSAM"] / t["base"]))}


def compiled_child(models, model_name: str, variant: str, rounds: int,
                   steps: int) -> dict:
    """PyTorch: one compiled variant in this (fresh) process: its first 10
    steps (compile), dynamo's counts over them, then `rounds` timings."""
    from torch._dynamo.utils import counters

    built = build(models, model_name, variant)
    counters.clear()
    first = 10 * run_steps(built, 10)
    breaks, graphs = _dynamo_counts()
    times = [run_steps(built, steps) for _ in range(rounds)]
    return {"first_s": first, "times": times, "breaks": breaks,
            "graphs": graphs}


def compiled_figures(script: str, model_name: str, rounds: int, steps: int,
                     sam_eager) -> dict:
    """The compiled variants' figures, each from `compiled_child` in a
    fresh process."""
    runs = {}
    for variant in COMPILED:
        res = subprocess.run(
            [sys.executable, script, "--backend", "torch", "--compiled-child",
             model_name, variant, "--steps", str(steps), "--rounds",
             str(rounds), "--optimizer", OPTIMIZER],
            capture_output=True, text=True, check=True, env=dict(os.environ))
        runs[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    out = {}
    for v, run in runs.items():
        key, ms = v.split()[0].lower(), float(np.median(run["times"]))
        out[f"{key}_c_ms"] = 1e3 * ms
        out[f"{key}_compile_s"] = run["first_s"] - 10 * ms
        out[f"{key}_breaks"], out[f"{key}_graphs"] = (run["breaks"],
                                                      run["graphs"])
    out["sam_c_over_floor_c"] = out["sam_c_ms"] / out["floor_c_ms"]
    out["sam_c_over_base_c"] = out["sam_c_ms"] / out["base_c_ms"]
    out["sam_c_over_sam"] = out["sam_c_ms"] / (1e3 * float(np.median(
        sam_eager)))
    return out


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
             "--memory-child", model_name, variant, "--steps", str(steps),
             "--optimizer", OPTIMIZER],
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
    global OPTIMIZER
    OPTIMIZER = args.optimizer
    if args.compiled_child:
        print(json.dumps(compiled_child(models, *args.compiled_child,
                                        args.rounds, args.steps)))
        return None
    rounds, seconds = (3, 0.5) if args.quick else (9, 1.5)
    rows = []
    for name in args.models:
        row = {"model": name}
        if not args.memory_only:
            row.update(time_model(models, name, rounds, seconds, script))
        row.update(memory_model(script, name, args.steps))
        rows.append(row)
        print(f"measured {name}", file=sys.stderr)
    print(f"\n{device_name()}, Keras {keras.__version__}; "
          f"{'Adam' if OPTIMIZER == 'adam' else 'SGD with momentum'}; "
          f"median of {rounds} alternating rounds\n")
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
    if any("sam_c_ms" in r for r in rows):
        compiled_table(rows)
    return rows


def compiled_table(rows) -> None:
    """PyTorch, `jit_compile=True`: ms per step, ratios, compile time and
    dynamo's graph breaks / graphs for base, floor and SAM."""
    print("\nCompiled (`jit_compile=True`; base: Keras's own compiled step, "
          "floor and SAM: keras_sam's; each in a fresh process, ratios of "
          "medians)\n")
    print("| model | base compiled ms/step | floor compiled ms/step "
          "| SAM compiled ms/step | SAM/floor compiled | SAM/base compiled "
          "| SAM compiled/SAM eager | compile s (base, floor, SAM) "
          "| graph breaks (base, floor, SAM) | graphs (base, floor, SAM) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "sam_c_ms" not in r:
            continue
        trio = lambda key, f: ", ".join(  # noqa: E731
            format(r[f"{k}_{key}"], f) for k in ("base", "floor", "sam"))
        print(f"| {r['model']} | {r['base_c_ms']:.2f} | "
              f"{r['floor_c_ms']:.2f} | {r['sam_c_ms']:.2f} | "
              f"{r['sam_c_over_floor_c']:.3f} | "
              f"{r['sam_c_over_base_c']:.3f} | {r['sam_c_over_sam']:.3f} | "
              f"{trio('compile_s', '.1f')} | {trio('breaks', 'd')} | "
              f"{trio('graphs', 'd')} |")
