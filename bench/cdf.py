"""Latency CDF plots (PNG) for wqs-bench and the comparison: matplotlib, imported lazily."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the latency CDF plot needs matplotlib: "
                          "pip install 'wqs[bench]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_series(series: Iterable[tuple[str, np.ndarray]], path: str, title: str) -> None:
    """One CDF line per (label, latencies in ns); log-scale x axis in microseconds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    drawn = 0
    for label, lat in series:
        if lat is None or not len(lat):
            continue
        x = np.sort(np.asarray(lat, dtype=np.float64)) / 1e3
        y = np.arange(1, x.size + 1) / x.size
        if x.size > 20000:  # keep the file small: every quantile step of 1/20000
            idx = np.unique(np.linspace(0, x.size - 1, 20000).astype(np.int64))
            x, y = x[idx], y[idx]
        ax.step(x, y, where="post", label=f"{label} (n={len(lat)})")
        drawn += 1
    for q in (0.5, 0.99):
        ax.axhline(q, color="0.8", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("latency (µs, log scale)")
    ax.set_ylabel("fraction of requests ≤ latency")
    ax.set_ylim(0, 1.001)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_cdf(results, path: str) -> None:
    """The total latency CDF of every job and direction of a wqs-bench run."""
    series = []
    for r in results:
        for d in ("read", "write"):
            lat = r.dirs[d].lat
            if lat.size:
                series.append((f"{r.name} {d}", lat))
        for k, v in r.extra_lat.items():
            series.append((f"{r.name} {k}", v))
    plot_series(series, path, "wqs-bench latency CDF")
