"""Pictures of a run: metric curves and scatter plots as PNG."""

from __future__ import annotations

from pathlib import Path


def plot_metrics(history: list[dict[str, float]], keys: list[str], path: str | Path, title: str = "",
                 x: str = "step") -> Path | None:
    """One panel per metric in `keys` against `x` (default the step), with the band from `<key>_ci_low` to
    `<key>_ci_high` where those are logged beside it; returns the path, or None when no key was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in row for row in history)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        rows = [row for row in history if key in row]
        ax.plot([row[x] for row in rows], [row[key] for row in rows], lw=1)
        if all(f"{key}_ci_low" in row and f"{key}_ci_high" in row for row in rows):
            ax.fill_between([row[x] for row in rows], [row[f"{key}_ci_low"] for row in rows],
                            [row[f"{key}_ci_high"] for row in rows], alpha=0.25, lw=0)
        ax.set_title(key)
        ax.set_xlabel(x)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_scatter(x, y, path: str | Path, xlabel: str, ylabel: str, title: str = "") -> Path:
    """A scatter plot of y against x (e.g. a learned reward against the true return)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.scatter(x, y, s=6, alpha=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
