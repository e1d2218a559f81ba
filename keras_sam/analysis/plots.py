"""Pictures of loss landscapes (matplotlib: `pip install keras-sam[plots]`).

Each function draws, writes a PNG when given a path, and returns the
matplotlib figure.
"""

from __future__ import annotations

import numpy as np


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "Plotting needs matplotlib: pip install matplotlib (or "
            "keras-sam[plots]).") from error
    return plt


def plot_landscape_1d(curves: dict, path=None, title: str | None = None,
                      log_scale: bool = False):
    """Several 1-D landscapes on one figure.

    Args:
        curves: {label: result of `loss_landscape(dims=1)`}.
        path: where to write the PNG (None: do not write).
        title: the figure's title.
        log_scale: a logarithmic loss axis.

    Returns:
        The matplotlib `Figure`.

    Raises:
        TypeError: a single result instead of {label: result}.
        ValueError: a 2-D result among the curves.
        ImportError: matplotlib is not installed (`keras-sam[plots]`).

    Example:

    ```python
    keras_sam.analysis.plot_landscape_1d({"SGD": curve_sgd, "SAM": curve_sam},
                                         "landscape_1d.png")
    ```
    """
    if "alphas" in curves:   # one result passed without its label
        raise TypeError(
            "`plot_landscape_1d` takes {label: result}, e.g. "
            "`plot_landscape_1d({'SAM': result})`; received a single result.")
    for label, result in curves.items():
        if "betas" in result:
            raise ValueError(
                f"curves['{label}'] is a 2-D landscape (`dims=2`): draw it "
                "with `plot_landscape_2d(result)`.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, result in curves.items():
        ax.plot(result["alphas"], result["losses"], label=label)
    ax.set_xlabel("step along the direction")
    ax.set_ylabel("loss")
    if log_scale:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _finish(fig, ax, title, path)


def _finish(fig, ax, title, path):
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


def plot_landscape_2d(result: dict, path=None, kind: str = "contour",
                      title: str | None = None, levels=20):
    """A 2-D landscape as a contour map or a 3-D surface.

    Args:
        result: of `loss_landscape(dims=2)`.
        path: where to write the PNG (None: do not write).
        kind: "contour" or "surface".
        title: the figure's title.
        levels: the number of contour levels, or the levels themselves
            (give two maps the same levels to compare them).

    Returns:
        The matplotlib `Figure`.

    Raises:
        ValueError: an unknown `kind`, or a 1-D result.
        ImportError: matplotlib is not installed (`keras-sam[plots]`).

    Example:

    ```python
    grid = keras_sam.analysis.loss_landscape(model, x, y, dims=2)
    keras_sam.analysis.plot_landscape_2d(grid, "landscape_2d.png")
    ```
    """
    if kind not in ("contour", "surface"):
        raise ValueError(f"`kind` must be 'contour' or 'surface'; received "
                         f"{kind!r}.")
    if "betas" not in result:
        raise ValueError(
            "`plot_landscape_2d` draws a result of `loss_landscape(dims=2)`; "
            "this one is 1-D (it has no 'betas'). Draw it with "
            "`plot_landscape_1d({'label': result})`, or compute "
            "`loss_landscape(..., dims=2)`.")
    plt = _pyplot()
    a, b = np.meshgrid(result["alphas"], result["betas"], indexing="ij")
    losses = np.asarray(result["losses"])
    if kind == "contour":
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        filled = ax.contourf(a, b, losses, levels=levels, cmap="viridis")
        ax.contour(a, b, losses, levels=levels, colors="k", linewidths=0.3)
        fig.colorbar(filled, ax=ax, label="loss")
        ax.plot([0], [0], "r+")
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
    else:
        fig = plt.figure(figsize=(4.6, 3.8))
        ax = fig.add_subplot(projection="3d")
        ax.plot_surface(a, b, losses, cmap="viridis", linewidth=0)
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
        ax.set_zlabel("loss")
    return _finish(fig, ax, title, path)
