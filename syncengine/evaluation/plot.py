"""A bar chart comparing runs, one panel per metric (as the paper's figure 5 compares sync weights)."""
from __future__ import annotations

from pathlib import Path

from ..errors import SyncEngineError


def plot_runs(results, path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SyncEngineError("the plot needs matplotlib: pip install 'syncengine[eval]' (or pass --no-plot)") from exc
    from .runner import LOWER_IS_BETTER, METRICS

    keys = [k for k in METRICS if any(r.metrics.get(k) is not None for r in results)]
    path = Path(path)
    n = max(1, len(keys))
    fig, axes = plt.subplots(1, n, figsize=(max(3.2 * n, 4), 3.4), squeeze=False)
    labels = [r.label or r.name for r in results]
    colors = plt.get_cmap("viridis")([i / max(1, len(results) - 1) * 0.85 for i in range(len(results))])
    for ax, key in zip(axes[0], keys):
        values = [r.metrics.get(key) for r in results]
        xs = range(len(results))
        ax.bar(xs, [v if v is not None else 0 for v in values], color=colors)
        for x, v in zip(xs, values):
            ax.text(x, v or 0, "n/a" if v is None else f"{v:.3g}", ha="center", va="bottom", fontsize=7)
        ax.margins(y=0.15)
        ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{METRICS[key]} ({'lower' if LOWER_IS_BETTER[key] else 'higher'} is better)", fontsize=9)
    if not keys:
        axes[0][0].text(0.5, 0.5, "no metric available", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
