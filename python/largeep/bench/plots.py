"""PNG plots of a sweep: latency and logical bandwidth against tokens per rank, one line per backend (and SM count).

One panel per configuration (mode, op, dtype, hidden, top-k, experts, EP); ``latency.png`` shows the median with a
p10-p90 band, ``bandwidth.png`` the logical bandwidth (records without one, the layout and the receive phases, are
left out there, and so is a panel left with no point).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from largeep.bench.records import Extra, Record


def _panel_key(r: Record, e: Extra) -> tuple[str, ...]:
    op = f"{e.phase_of}.{r.op}" if e.phase_of else r.op
    return (r.mode, op, r.dtype, f"H={r.hidden}", f"K={r.num_topk}", f"E={r.num_experts}", f"EP={r.ep}")


def _line_key(r: Record) -> str:
    return r.backend if r.num_sms is None else f"{r.backend} ({r.num_sms} SMs)"


Panels = dict[tuple[str, ...], dict[str, list[tuple[Record, Extra]]]]


def panels_of(records: Sequence[Record], extras: Sequence[Extra], metric: str) -> Panels:
    """The points of one figure: panel -> line -> (record, extra) in tokens order. metric "time": every record;
    "gbps": those with a logical bandwidth (not the layout, not a receive phase), panels without one left out."""
    panels: Panels = defaultdict(lambda: defaultdict(list))
    for r, e in zip(records, extras, strict=False):
        if metric == "gbps" and r.logical_gbps is None:
            continue
        panels[_panel_key(r, e)][_line_key(r)].append((r, e))
    for lines in panels.values():
        for points in lines.values():
            points.sort(key=lambda p: p[0].num_tokens)
    return {k: dict(v) for k, v in panels.items()}


def plot_results(records: Sequence[Record], extras: Sequence[Extra], out_dir: str | Path) -> list[Path]:
    """Writes latency.png and bandwidth.png (when a record has a bandwidth) into ``out_dir``; returns their
    paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = sorted({_line_key(r) for r in records})
    palette = plt.get_cmap("tab10")
    color = {label: palette(i % 10) for i, label in enumerate(labels)}  # one colour per line in every panel
    written = []
    for name, metric in (("latency.png", "time"), ("bandwidth.png", "gbps")):
        panels = panels_of(records, extras, metric)
        keys = list(panels)
        if not keys:
            continue
        cols = min(3, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys, strict=False):
            for label, points in sorted(panels[key].items()):
                xs = [p[0].num_tokens for p in points]
                if metric == "time":
                    ys = [p[0].time_us_median for p in points]
                    ax.plot(xs, ys, marker="o", label=label, color=color[label])
                    ax.fill_between(xs, [p[0].time_us_p10 for p in points], [p[0].time_us_p90 for p in points],
                                    color=color[label], alpha=0.2)
                else:
                    ys = [g for p in points if (g := p[0].logical_gbps) is not None]  # (all: panels_of)
                    ax.plot(xs, ys, marker="o", label=label, color=color[label])
            ax.set_xscale("log", base=2)
            if metric == "time":
                ax.set_yscale("log")
            ax.set_xlabel("tokens per rank")
            ax.set_ylabel("time (us, median, p10-p90)" if metric == "time" else "logical bandwidth (GB/s)")
            ax.set_title(" ".join(key), fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(keys):]:
            ax.set_visible(False)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
