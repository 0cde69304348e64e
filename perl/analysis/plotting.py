"""matplotlib set-up shared by the figures (headless backend, one finishing style)."""

from __future__ import annotations


def new_figure(ncols: int = 1, figsize: tuple[float, float] = (6, 4)):
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    return fig, (list(axes) if ncols > 1 else [axes])


def finish(fig, axes, path: str) -> str:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
