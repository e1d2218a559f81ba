"""The Hessian of the loss, through Hessian-vector products only.

`hessian_eigenvalues` runs the Lanczos iteration: from a random unit
vector q_1 it builds an orthonormal basis Q_m of the Krylov space
span{q, Hq, ..., H^(m-1) q}, in which H is the tridiagonal

    T_m = Q_m^T H Q_m        (diagonal a_j = q_j^T H q_j, off-diagonal b_j)

whose eigenvalues (Ritz values) approach H's extreme eigenvalues fast. An
eigenpair (theta, y) of T_m has residual ||H Q y - theta Q y|| = b_m |y_m|;
iteration stops when that is below `tol * max(1, |theta|)` for each of the
k largest, or after `max_iter` products. Q is kept in float64 and fully
re-orthogonalized, so no spurious copies of converged eigenvalues appear.
Memory: `max_iter` float64 vectors of the size of the trainable weights.

`hessian_trace` is Hutchinson's estimator: for Rademacher v (+-1 entries),
E[v^T H v] = tr(H); the mean over probes, with its standard error
std / sqrt(probes).

Each product H v is the example-weighted mean over all batches of the
batch's H_B v, so any amount of data works, streamed batch by batch.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_sam.analysis._data import (Data, check_model, flatten, functions,
                                      unflatten)


class _Operator:
    """v -> H v over the whole data, on flat float64 vectors."""

    def __init__(self, model, data: Data):
        self.fns = functions(model)
        self.weights = self.fns.weights()
        self.data = data
        self.size = sum(int(np.prod(w.shape)) for w in self.weights)
        self.products = 0

    def __call__(self, vector: np.ndarray) -> np.ndarray:
        parts = [keras.ops.convert_to_tensor(v, w.dtype) for v, w in
                 zip(unflatten(vector, self.weights), self.weights)]
        self.products += 1
        hv = self.data.mean(
            lambda x, y, sw: self.fns.hvp(self.weights, parts, x, y, sw)[1])
        return flatten(hv)


def _check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}; received "
                         f"{value!r}.")


def hessian_eigenvalues(model: keras.Model, x, y=None, k: int = 1, *,
                        batch_size: int = 128, sample_weight=None,
                        steps: int | None = None, max_iter: int = 100,
                        tol: float = 1e-3, seed: int = 0,
                        return_eigenvectors: bool = False,
                        verbose: int = 0):
    """The k largest (algebraically, descending) eigenvalues of the Hessian
    of `model`'s loss over (x, y).

    Args:
        model: any compiled Keras model (a SAMModel or a plain one). The loss
            is its compiled loss plus `model.losses` (the training objective,
            regularizers included), averaged over all examples, in inference
            mode; the Hessian is over its trainable variables.
        x: the data, anything `evaluate` takes: arrays with `y`, a
            `tf.data.Dataset` or a `keras.utils.PyDataset` of `(x, y)` or
            `(x, y, sample_weight)` batches.
        y: the targets for array `x`; None for a dataset.
        k: how many eigenvalues, >= 1.
        batch_size: examples per batch (arrays only).
        sample_weight: per-example weights of the loss (arrays only).
        steps: how many batches to use; None for all.
        max_iter: the most Hessian-vector products (each a pass over the
            data).
        tol: the relative residual at which a Ritz value counts as
            converged.
        seed: of the random start vector.
        return_eigenvectors: also return the eigenvectors, each a list of
            arrays shaped like `model.trainable_variables`.
        verbose: 1 shows a Keras progress bar over the iterations.

    Returns:
        A float64 array of k eigenvalues, or `(eigenvalues, eigenvectors)`.
        Not converged after `max_iter`: the best estimates, with a warning.
        The weights are not changed.

    Raises:
        ValueError: `k`, `max_iter` not positive integers, or k larger than
            the number of trainable weights; the model not compiled.

    Example:

    ```python
    top3 = keras_sam.analysis.hessian_eigenvalues(model, x, y, k=3)
    values, vectors = keras_sam.analysis.hessian_eigenvalues(
        model, dataset, k=1, return_eigenvectors=True)
    ```
    """
    check_model(model)
    _check_int("k", k)
    _check_int("max_iter", max_iter)
    if not tol > 0:
        raise ValueError(f"`tol` must be > 0; received {tol!r}.")
    op = _Operator(model, Data(x, y, sample_weight, batch_size, steps))
    if k > op.size:
        raise ValueError(f"`k`={k} exceeds the number of trainable "
                         f"parameters ({op.size}).")
    max_iter = min(max_iter, op.size)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(op.size)
    basis = [q / np.linalg.norm(q)]
    alphas, betas = [], []
    progress = keras.utils.Progbar(max_iter) if verbose else None
    converged = False
    for j in range(max_iter):
        w = op(basis[j])
        alphas.append(float(basis[j] @ w))
        # Full re-orthogonalization against the whole basis, twice.
        Q = np.stack(basis)
        for _ in range(2):
            w -= Q.T @ (Q @ w)
        beta = float(np.linalg.norm(w))
        theta, vecs = _ritz(alphas, betas)
        top = np.argsort(theta)[::-1][:k]
        residual = beta * np.abs(vecs[-1, top])
        if progress is not None:
            progress.update(j + 1, [("lambda_max", theta[top[0]])])
        if len(theta) >= k and np.all(
                residual <= tol * np.maximum(1.0, np.abs(theta[top]))):
            converged = True
            break
        if beta <= 1e-10 * max(1.0, np.max(np.abs(theta))):
            converged = len(theta) >= k   # an exact invariant subspace
            break
        betas.append(beta)
        basis.append(w / beta)
    if not converged:
        from keras_sam import _warnings

        _warnings.warn(
            f"hessian_eigenvalues: the top {k} eigenvalues did not reach "
            f"tol={tol} in {max_iter} iterations; returning the best "
            "estimates (raise `max_iter` for more).")
    values = theta[top]
    if not return_eigenvectors:
        return values
    Q = np.stack(basis[:len(alphas)])
    vectors = [unflatten(Q.T @ vecs[:, i], op.weights) for i in top]
    return values, vectors


def _ritz(alphas, betas):
    """Eigenpairs of the tridiagonal Lanczos matrix T."""
    m = len(alphas)
    t = np.diag(alphas)
    if m > 1:
        off = np.asarray(betas[:m - 1])
        t += np.diag(off, 1) + np.diag(off, -1)
    return np.linalg.eigh(t)


def hessian_trace(model: keras.Model, x, y=None, *, probes: int = 50,
                  batch_size: int = 128, sample_weight=None,
                  steps: int | None = None, seed: int = 0,
                  verbose: int = 0) -> tuple[float, float]:
    """tr(H) by Hutchinson's estimator: the mean of v^T H v over `probes`
    Rademacher vectors v, and its standard error std / sqrt(probes).

    The loss and the data are those of `hessian_eigenvalues`. The weights
    are not changed.

    Args:
        model: any compiled Keras model (a SAMModel or a plain one).
        x: the data, anything `evaluate` takes: arrays with `y`, a
            `tf.data.Dataset` or a `keras.utils.PyDataset` of `(x, y)` or
            `(x, y, sample_weight)` batches.
        y: the targets for array `x`; None for a dataset.
        probes: how many Rademacher vectors, >= 2; the standard error falls
            as 1 / sqrt(probes).
        batch_size: examples per batch (arrays only).
        sample_weight: per-example weights of the loss (arrays only).
        steps: how many batches to use; None for all.
        seed: of the probes.
        verbose: 1 shows a Keras progress bar over the probes.

    Returns:
        `(trace, standard_error)`, two floats.

    Raises:
        ValueError: `probes` below 2; the model not compiled.

    Example:

    ```python
    trace, standard_error = keras_sam.analysis.hessian_trace(
        model, x, y, probes=50)
    ```
    """
    check_model(model)
    _check_int("probes", probes, low=2)
    op = _Operator(model, Data(x, y, sample_weight, batch_size, steps))
    rng = np.random.default_rng(seed)
    progress = keras.utils.Progbar(probes) if verbose else None
    samples = []
    for i in range(probes):
        v = rng.choice([-1.0, 1.0], size=op.size)
        samples.append(float(v @ op(v)))
        if progress is not None:
            progress.update(i + 1, [("trace", np.mean(samples))])
    samples = np.asarray(samples)
    return float(samples.mean()), float(samples.std(ddof=1)
                                        / np.sqrt(probes))
