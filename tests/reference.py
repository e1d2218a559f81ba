"""An independent NumPy float64 reference of the SAM step.

Nothing here imports keras_sam or Keras: forward pass, backward pass and the
optimizers are written out by hand from their textbook definitions (with
Keras's conventions for momentum and Adam's bias correction), so the tests
compare the library against arithmetic it does not share.
"""

from __future__ import annotations

import numpy as np


class TanhMLP:
    """out = tanh(x W1 + b1) W2 + b2; loss = mean((out - y)^2) + l2 * |W1|^2.

    Parameters are the list [W1, b1, W2, b2] in float64, in the order of a
    Keras `Sequential([Dense(h, "tanh", kernel_regularizer=L2(l2)),
    Dense(k)])`'s `trainable_variables`.
    """

    def __init__(self, l2: float = 0.0):
        self.l2 = l2

    def loss(self, params, x, y) -> float:
        w1, b1, w2, b2 = params
        out = np.tanh(x @ w1 + b1) @ w2 + b2
        return float(np.mean((out - y) ** 2) + self.l2 * np.sum(w1**2))

    def grad(self, params, x, y) -> list[np.ndarray]:
        w1, b1, w2, b2 = params
        h = np.tanh(x @ w1 + b1)
        out = h @ w2 + b2
        d_out = 2.0 * (out - y) / out.size
        d_z = (d_out @ w2.T) * (1.0 - h**2)
        return [
            x.T @ d_z + 2.0 * self.l2 * w1,
            d_z.sum(axis=0),
            h.T @ d_out,
            d_out.sum(axis=0),
        ]


def sam_gradient(net, params, x, y, rho: float):
    """(g_sam, sharpness): the gradient at w + rho g/||g|| and L(w+e) - L(w)."""
    g = net.grad(params, x, y)
    norm = np.sqrt(sum(np.sum(gi**2) for gi in g))
    scale = rho / norm if norm > 0 else 0.0
    perturbed = [p + scale * gi for p, gi in zip(params, g)]
    sharpness = net.loss(perturbed, x, y) - net.loss(params, x, y)
    return net.grad(perturbed, x, y), sharpness


class SGD:
    """v <- momentum * v - lr * g; w <- w + v, or with Nesterov
    w <- w + momentum * v - lr * g (v = -lr * g without momentum)."""

    def __init__(self, learning_rate: float, momentum: float = 0.0,
                 nesterov: bool = False):
        self.lr, self.momentum, self.nesterov = (learning_rate, momentum,
                                                 nesterov)
        self.velocity = None

    def first_moment(self, params):
        """u, the momentum in the gradient's sign: -v (zeros at first)."""
        if self.velocity is None:
            return [np.zeros_like(p) for p in params]
        return [-v for v in self.velocity]

    def step(self, params, grads):
        if self.velocity is None:
            self.velocity = [np.zeros_like(p) for p in params]
        self.velocity = [
            self.momentum * v - self.lr * g
            for v, g in zip(self.velocity, grads)
        ]
        if self.nesterov:
            return [p + self.momentum * v - self.lr * g
                    for p, v, g in zip(params, self.velocity, grads)]
        return [p + v for p, v in zip(params, self.velocity)]


class Adam:
    """Adam with bias correction folded into the step size, as Keras does:

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    w <- w - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + epsilon)
    """

    def __init__(self, learning_rate: float, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-7):
        self.lr, self.b1, self.b2, self.eps = (
            learning_rate, beta_1, beta_2, epsilon)
        self.t, self.m, self.v = 0, None, None

    def first_moment(self, params):
        """u = m, the first moment (zeros at first)."""
        if self.m is None:
            return [np.zeros_like(p) for p in params]
        return list(self.m)

    def step(self, params, grads):
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
        self.t += 1
        self.m = [self.b1 * m + (1 - self.b1) * g
                  for m, g in zip(self.m, grads)]
        self.v = [self.b2 * v + (1 - self.b2) * g**2
                  for v, g in zip(self.v, grads)]
        alpha = self.lr * np.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        return [p - alpha * m / (np.sqrt(v) + self.eps)
                for p, m, v in zip(params, self.m, self.v)]


def sam_train(net, optimizer, params, batches, rho: float):
    """Run SAM over `batches` [(x, y), ...]; returns (params, sharpnesses)."""
    params = [np.asarray(p, np.float64) for p in params]
    sharpnesses = []
    for x, y in batches:
        g_sam, sharpness = sam_gradient(net, params, x, y, rho)
        params = optimizer.step(params, g_sam)
        sharpnesses.append(sharpness)
    return params, sharpnesses


class WeightedTanhMLP(TanhMLP):
    """TanhMLP with per-example weights s_i, reduced as Keras's default
    "sum_over_batch_size": loss = sum_i s_i mean_j (out_ij - y_ij)^2 / n."""

    def __init__(self, sample_weight, l2: float = 0.0):
        super().__init__(l2)
        self.s = np.asarray(sample_weight, np.float64)

    def loss(self, params, x, y) -> float:
        w1, b1, w2, b2 = params
        out = np.tanh(x @ w1 + b1) @ w2 + b2
        per_example = np.mean((out - y) ** 2, axis=1)
        return float(np.sum(self.s * per_example) / len(x)
                     + self.l2 * np.sum(w1**2))

    def grad(self, params, x, y):
        w1, b1, w2, b2 = params
        h = np.tanh(x @ w1 + b1)
        out = h @ w2 + b2
        d_out = 2.0 * (out - y) * self.s[:, None] / out.size
        d_z = (d_out @ w2.T) * (1.0 - h**2)
        return [x.T @ d_z + 2.0 * self.l2 * w1, d_z.sum(axis=0),
                h.T @ d_out, d_out.sum(axis=0)]


class OwnLossTanhMLP(TanhMLP):
    """TanhMLP whose model defines its own loss (a `compute_loss`
    override): the compiled mean squared error plus c mean(out^2),
    loss = mean((out - y)^2) + c mean(out^2) + l2 |W1|^2."""

    def __init__(self, c: float, l2: float = 0.0):
        super().__init__(l2)
        self.c = c

    def loss(self, params, x, y) -> float:
        w1, b1, w2, b2 = params
        out = np.tanh(x @ w1 + b1) @ w2 + b2
        return float(np.mean((out - y) ** 2) + self.c * np.mean(out**2)
                     + self.l2 * np.sum(w1**2))

    def grad(self, params, x, y):
        w1, b1, w2, b2 = params
        h = np.tanh(x @ w1 + b1)
        out = h @ w2 + b2
        d_out = (2.0 * (out - y) + 2.0 * self.c * out) / out.size
        d_z = (d_out @ w2.T) * (1.0 - h**2)
        return [x.T @ d_z + 2.0 * self.l2 * w1, d_z.sum(axis=0),
                h.T @ d_out, d_out.sum(axis=0)]


class EmbeddingBag:
    """out = mean_t E[tokens[:, t]] @ W + b; loss = mean((out - y)^2).

    Parameters [E, W, b]. The gradient of E is dense here (a full table with
    zero rows), built row by row with np.add.at, so repeated tokens add up.
    """

    def loss(self, params, tokens, y) -> float:
        table, w, b = params
        out = table[tokens].mean(axis=1) @ w + b
        return float(np.mean((out - y) ** 2))

    def grad(self, params, tokens, y):
        table, w, b = params
        pooled = table[tokens].mean(axis=1)
        out = pooled @ w + b
        d_out = 2.0 * (out - y) / out.size
        d_pooled = d_out @ w.T
        d_table = np.zeros_like(table)
        steps = tokens.shape[1]
        for t in range(steps):
            np.add.at(d_table, tokens[:, t], d_pooled / steps)
        return [d_table, pooled.T @ d_out, d_out.sum(axis=0)]


def clip_by_norm(grads, clipnorm):
    """Each gradient scaled to norm <= clipnorm on its own (Keras clipnorm)."""
    return [g * min(1.0, clipnorm / max(np.sqrt(np.sum(g**2)), 1e-30))
            for g in grads]


def clip_by_global_norm(grads, clipnorm):
    """All gradients scaled together to global norm <= clipnorm."""
    norm = np.sqrt(sum(np.sum(g**2) for g in grads))
    return [g * min(1.0, clipnorm / norm) for g in grads]


class AdamW(Adam):
    """Adam with decoupled weight decay, applied first: w <- w - lr wd w."""

    def __init__(self, learning_rate, weight_decay, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.wd = weight_decay

    def step(self, params, grads):
        params = [p - self.lr * self.wd * p for p in params]
        return super().step(params, grads)


def sam_gradient_masked(net, params, x, y, rho, trainable):
    """sam_gradient when only params[i] with trainable[i] are perturbed and
    counted in ||g|| (frozen layers)."""
    g = net.grad(params, x, y)
    norm = np.sqrt(sum(np.sum(gi**2) for gi, t in zip(g, trainable) if t))
    scale = rho / norm if norm > 0 else 0.0
    perturbed = [p + scale * gi if t else p
                 for p, gi, t in zip(params, g, trainable)]
    return net.grad(perturbed, x, y)


# --- SAM variants ---------------------------------------------------------
# Written from the papers' formulas (see keras_sam.variants for the same
# formulas in the library), on flat lists of float64 arrays.

def _dot(a, b):
    return sum(float(np.sum(x * y)) for x, y in zip(a, b))


def _norm(a, p=2.0):
    if np.isinf(p):
        return max(float(np.max(np.abs(x))) for x in a)
    return sum(float(np.sum(np.abs(x) ** p)) for x in a) ** (1.0 / p)


def perturbation(grads, params, rho, p=2.0, adaptive=False, eta=0.01,
                 mask=None):
    """e = rho T sign(Tg) |Tg|^(q-1) / ||Tg||_q^(q-1), T = |w| + eta (ASAM)
    or 1; variables with mask False get e = 0 and stay out of the norm."""
    mask = mask or [True] * len(grads)
    idx = [i for i, m in enumerate(mask) if m]
    t = {i: (np.abs(params[i]) + eta if adaptive else np.ones_like(params[i]))
         for i in idx}
    tg = {i: t[i] * grads[i] for i in idx}
    e = [np.zeros_like(g) for g in grads]
    if np.isinf(p):
        for i in idx:
            e[i] = rho * t[i] * np.sign(tg[i])
        return e
    q = p / (p - 1.0)
    denom = _norm([tg[i] for i in idx], q) ** (q - 1.0)
    if denom == 0.0:
        return e
    for i in idx:
        e[i] = rho * t[i] * np.sign(tg[i]) * np.abs(tg[i]) ** (q - 1.0) / denom
    return e


def split_batch(x, y, m):
    """m contiguous chunks, sizes as equal as possible, larger first."""
    return list(zip(np.array_split(x, m), np.array_split(y, m)))


def variant_train(net, optimizer, params, batches, rho, *, p=2.0,
                  adaptive=False, eta=0.01, gsam_alpha=0.0, sam_every=1,
                  looksam_alpha=None, num_batch_splits=1, mask=None):
    """Train with every SAM variant's rule; returns (params, sharpness of
    each SAM step, g_v). `rho` is a float or a function of the iteration."""
    params = [np.asarray(w, np.float64) for w in params]
    g_v = [np.zeros_like(w) for w in params]
    sharpnesses = []
    for t, (x, y) in enumerate(batches):
        r = rho(t) if callable(rho) else rho
        chunks = split_batch(x, y, num_batch_splits)
        shares = [len(cx) / len(x) for cx, _ in chunks]
        chunk_grads = [net.grad(params, cx, cy) for cx, cy in chunks]
        g = [sum(s * gc[i] for s, gc in zip(shares, chunk_grads))
             for i in range(len(params))]
        if t % sam_every == 0:
            g_s = [np.zeros_like(w) for w in params]
            sharp = 0.0
            for s, (cx, cy), gc in zip(shares, chunks, chunk_grads):
                e = perturbation(gc, params, r, p, adaptive, eta, mask)
                moved = [w + d for w, d in zip(params, e)]
                g_s = [a + s * b for a, b in zip(g_s, net.grad(moved, cx, cy))]
                sharp += s * (net.loss(moved, cx, cy) - net.loss(params, cx, cy))
            sharpnesses.append(sharp)
            d = g_s
            if gsam_alpha:
                c = _dot(g, g_s) / _dot(g_s, g_s)
                d = [gs - gsam_alpha * (gi - c * gs) for gi, gs in zip(g, g_s)]
            if looksam_alpha is not None:
                c = _dot(g, g_s) / _dot(g, g)
                g_v = [gs - c * gi for gi, gs in zip(g, g_s)]
        else:
            d = g
            if looksam_alpha is not None and _norm(g_v) > 0:
                scale = looksam_alpha * _norm(g) / _norm(g_v)
                d = [gi + scale * v for gi, v in zip(g, g_v)]
        params = optimizer.step(params, d)
    return params, sharpnesses, g_v


def msam_train(net, optimizer, params, batches, rho, *, p=2.0,
               adaptive=False, eta=0.01, mask=None):
    """Momentum-SAM (Becker et al., 2024): the only gradient of a step at
    w + e, e = -rho u / ||u|| from the optimizer's first moment u (or the
    ball of `perturbation` with -u for g). Returns (params, losses at
    w + e). `rho` is a float or a function of the iteration."""
    params = [np.asarray(w, np.float64) for w in params]
    losses = []
    for t, (x, y) in enumerate(batches):
        r = rho(t) if callable(rho) else rho
        u = optimizer.first_moment(params)
        e = perturbation([-ui for ui in u], params, r, p, adaptive, eta,
                         mask)
        moved = [w + d for w, d in zip(params, e)]
        losses.append(net.loss(moved, x, y))
        params = optimizer.step(params, net.grad(moved, x, y))
    return params, losses


class LoRATanhMLP:
    """TanhMLP whose first kernel is frozen and adapted by LoRA:
    out = tanh(x (W1 + s A B) + b1) W2 + b2, loss = mean((out - y)^2).

    Parameters are [b1, A, B, W2, b2], the order of the trainable variables
    of that Sequential after `layers[0].enable_lora(r)` (W1 frozen, given
    here). `loss` and `grad` take `shift`: e added to the merged W1 + s A B.
    """

    def __init__(self, w1, scale: float):
        self.w1, self.scale = np.asarray(w1, np.float64), scale

    def merged(self, params):
        _, a, b, _, _ = params
        return self.w1 + self.scale * a @ b

    def _forward(self, params, x, shift):
        b1, a, b, w2, b2 = params
        h = np.tanh(x @ (self.merged(params) + shift) + b1)
        return h, h @ w2 + b2

    def loss(self, params, x, y, shift=0.0) -> float:
        _, out = self._forward(params, x, shift)
        return float(np.mean((out - y) ** 2))

    def grad(self, params, x, y, shift=0.0):
        _, a, b, w2, _ = params
        h, out = self._forward(params, x, shift)
        d_out = 2.0 * (out - y) / out.size
        d_z = (d_out @ w2.T) * (1.0 - h**2)
        d_merged = x.T @ d_z
        return [d_z.sum(axis=0), self.scale * d_merged @ b.T,
                self.scale * a.T @ d_merged, h.T @ d_out,
                d_out.sum(axis=0)]


def filter_rms(w):
    """rms of each slice w[..., j] (the whole tensor for rank <= 1)."""
    if w.ndim <= 1:
        return np.sqrt(np.mean(w**2))
    return np.sqrt(np.mean(w**2, axis=tuple(range(w.ndim - 1)),
                           keepdims=True))


def random_perturbation(weights, rho, z):
    """e = rho rms(w_f) z_f per filter, z taken in order from the flat z."""
    eps, start = [], 0
    for w in weights:
        eps.append(rho * filter_rms(w) * z[start:start + w.size].reshape(
            w.shape))
        start += w.size
    return eps


def rwp_train(net, optimizer, params, batches, rho, draws, mask=None):
    """A random e (LPF-SGD, random weight perturbation): the only gradient
    of a step at w + e, e = rho rms(w_f) z_f; `draws[t]` is the step's flat
    z over the perturbed tensors in order (the library's own draws: the
    reference checks what is done with them). Returns (params, losses)."""
    params = [np.asarray(w, np.float64) for w in params]
    mask = mask or [True] * len(params)
    losses = []
    for t, (x, y) in enumerate(batches):
        chosen = [w for w, m in zip(params, mask) if m]
        eps = iter(random_perturbation(chosen, rho, draws[t]))
        moved = [w + next(eps) if m else w for w, m in zip(params, mask)]
        losses.append(net.loss(moved, x, y))
        params = optimizer.step(params, net.grad(moved, x, y))
    return params, losses


def flat_lora_train(net, optimizer, params, batches, rho, draws):
    """Flat-LoRA: the only gradient of a step taken with e on the merged
    W1 + s A B (rms of its filters) and on b1, W2, b2; none on A and B.
    `draws[t]` is the flat z over b1, the merged W1, W2, b2."""
    params = [np.asarray(w, np.float64) for w in params]
    losses = []
    for t, (x, y) in enumerate(batches):
        b1, _, _, w2, b2 = params
        e_b1, e_w1, e_w2, e_b2 = random_perturbation(
            [b1, net.merged(params), w2, b2], rho, draws[t])
        moved = [b1 + e_b1, params[1], params[2], w2 + e_w2, b2 + e_b2]
        losses.append(net.loss(moved, x, y, shift=e_w1))
        params = optimizer.step(params, net.grad(moved, x, y, shift=e_w1))
    return params, losses
