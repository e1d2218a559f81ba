"""`compile(jit_compile=True)` on PyTorch: the SAM step under `torch.compile`.

Keras compiles its PyTorch step as `torch.compile(one_step)`; the SAM step
is compiled the same way, with three changes that keep both passes and the
update in one graph:

    pass 1, pass 2   torch.autograd.grad is traced into the graph
                     (dynamo's `trace_autograd_ops`; else a break per pass)
    skip             a non-finite g selects the old values on the device
                     (torch.where), never read on the host (a break)
    dropout masks    pass 2 must see pass 1's masks. Seeded Keras layers
                     draw from their seed variables, the same in both
                     passes. Keras's unseeded `Dropout` calls
                     `torch.nn.functional.dropout`, which draws from torch's
                     global generator; eagerly the step rewinds that
                     generator before pass 2, but reading and setting it
                     are not traceable. Compiled, `SameMasks` computes
                     dropout as keep = rand >= p, x * keep / (1 - p): the
                     first evaluation draws the masks, later ones reuse the
                     mask of the same call and shape.

A model that draws from the global generator in any other way (torch.rand
in a custom layer) keeps the rewind, at 2 graph breaks, with the compiled
random ops drawing from that generator as eager ones do (inductor's
`fallback_random`), so that the rewind replays them. Which model is which
is found once, before the step is compiled, by one forward pass on the
first batch in a `keras.StatelessScope` (nothing is written; the
generator is put back).

Two Keras layers break dynamo's graph at every call, in Keras's own
compiled step too; before compiling, the step gives them what dynamo can
trace (`_keras_compat`): BatchNormalization's reduction axes as a tuple
(not a tracked list), and MultiHeadAttention's `flash_attention=None` as
False (PyTorch then picks flash attention itself where it applies, instead
of Keras asking through a `SDPAParams` object at each call). What still
breaks the graph is Keras's own (optimizers that read the learning rate as
a Python float, such as SGD with momentum; seeded random ops), as in the
base model's compiled step; LookSAM and `sam_every > 1` add one for the
host branch on the iteration.
"""

from __future__ import annotations

import keras
import torch
from torch.nn import functional
from torch.overrides import TorchFunctionMode

from keras_sam import _keras_compat

# Set on the SAMModel once its compiled step is built: whether its forward
# pass draws from torch's global generator (then the step rewinds it).
REWIND_ATTRIBUTE = "_keras_sam_rewinds_rng"


def compiling() -> bool:
    """Whether dynamo is tracing the code that calls this."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def rewinds_rng(sam) -> bool:
    """Whether the compiled step of `sam` rewinds torch's global generator
    before pass 2 (`draws_global_rng` said so when it was built; without
    that probe, as eagerly)."""
    return getattr(sam, REWIND_ATTRIBUTE, True)


def rng_state():
    """torch's global generators' states: the CPU one, the CUDA ones."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() \
        else None
    return torch.get_rng_state(), cuda


def set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _same_state(a, b) -> bool:
    (cpu_a, cuda_a), (cpu_b, cuda_b) = a, b
    return torch.equal(cpu_a, cpu_b) and (cuda_a is None or all(
        torch.equal(x, y) for x, y in zip(cuda_a, cuda_b)))


def _dropout_rate(args, kwargs) -> float:
    return kwargs.get("p", args[1] if len(args) > 1 else 0.5)


def _dropout_applies(args, kwargs) -> bool:
    return kwargs.get("training", args[2] if len(args) > 2 else True) \
        and not kwargs.get("inplace", args[3] if len(args) > 3 else False)


class SameMasks(TorchFunctionMode):
    """`torch.nn.functional.dropout` with one set of masks per step: call j
    on a tensor of shape S draws keep = U[0, 1) >= p the first time and
    reuses it afterwards (pass 2, and pass 1's other chunks, as the eager
    rewind gives); out = x * keep / (1 - p). Traceable by dynamo."""

    def __init__(self):
        super().__init__()
        self.masks, self.calls = {}, 0

    def evaluation(self):
        """Enter for one evaluation of the loss: calls count from 0."""
        self.calls = 0
        return self

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not functional.dropout or \
                not _dropout_applies(args, kwargs):
            return func(*args, **kwargs)
        x, rate = args[0], _dropout_rate(args, kwargs)
        key = (self.calls, tuple(x.shape))
        self.calls += 1
        if key not in self.masks:
            self.masks[key] = torch.rand_like(x) >= rate
        return torch.where(self.masks[key], x / (1.0 - rate),
                           torch.zeros_like(x))


class _NoDropout(TorchFunctionMode):
    """The dropout that `SameMasks` replaces, as the identity (for the
    probe)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is functional.dropout and _dropout_applies(args, kwargs):
            return args[0]
        return func(*args, **kwargs)


def draws_global_rng(sam, data) -> bool:
    """Whether a training forward pass of `sam` on `data` moves torch's
    global generator other than through `torch.nn.functional.dropout`
    (which `SameMasks` replaces). Nothing is written: the pass runs in a
    `keras.StatelessScope` without autograd, and the generator is put back.
    """
    _keras_compat.ensure_built(sam, data)
    x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
    before = rng_state()
    try:
        with torch.no_grad(), keras.StatelessScope(), _NoDropout():
            sam(x, training=True)
        return not _same_state(before, rng_state())
    finally:
        set_rng_state(before)


def train_function(sam):
    """`sam.train_function` for `jit_compile=True`: Keras's one step on a
    batch, compiled on its first call (after `draws_global_rng`)."""
    def one_step_on_data(data):
        return sam.train_step(data[0])

    # Dynamo keeps its compiled graphs per code object, at most
    # `recompile_limit` (8) of them: a code object of its own per model, so
    # that the ninth compiled model in a process does not run eagerly.
    one_step_on_data.__code__ = one_step_on_data.__code__.replace()
    compiled = None
    trace_grad = hasattr(torch._dynamo.config, "trace_autograd_ops")

    def run(data):
        nonlocal compiled
        if compiled is None:
            rewinds = draws_global_rng(sam, data[0])   # builds the model
            _keras_compat.untrack_batchnorm_axes(sam)
            _keras_compat.decide_flash_attention(sam)
            object.__setattr__(sam, REWIND_ATTRIBUTE, rewinds)
            compiled = torch.compile(
                one_step_on_data,
                options={"fallback_random": True} if rewinds else None)
        if not trace_grad:   # an older torch: autograd.grad breaks
            return compiled(data)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(data)

    return run
