"""A PNG of a run's main training curves (one panel per metric) from its metric records."""
from __future__ import annotations

import io
from typing import Iterable, Sequence


def curves_png(rows: Sequence[dict], keys: Iterable[str], title: str = "") -> bytes | None:
    """PNG bytes with one panel per key of `keys` found in `rows` (dicts with "step"); None when
    no key has any value. Keys with several series share a panel: "a|b" plots a and b together."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for key in keys:
        series = [(k, [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]) for k in key.split("|")]
        series = [(k, pts) for k, pts in series if pts]
        if series:
            panels.append((key, series))
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (key, series) in zip(axes.flat, panels):
        for name, pts in series:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=1.2)
        ax.set_title(key.replace("|", " / "), fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
