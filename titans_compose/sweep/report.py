"""A sweep's results as a printed table and, when matplotlib is installed, a plot (it is not a dependency)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from titans_compose.io import atomic_write

#: the table's measurement columns: (record key, heading, format)
COLUMNS = (
    ("parameters", "params", "{:,}"),
    ("backend", "backend", "{}"),
    ("steps", "steps", "{}"),
    ("tokens_per_s", "tok/s", "{:,.0f}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("val_bits_per_byte", "bits/byte", "{:.4f}"),
    ("val_answer_loss", "answer loss", "{:.4f}"),
    ("val_accuracy", "accuracy", "{:.3f}"),
    ("seconds", "seconds", "{:.1f}"),
)


def table(records: list[dict[str, Any]]) -> str:
    """The results as a fixed-width text table: one row per point, only the columns some point has, failures last
    with their errors below the table."""
    shown = [(key, head, fmt) for key, head, fmt in COLUMNS if any(r.get(key) is not None for r in records)]
    rows = [["point", *(head for _, head, _ in shown), "status"]]
    for r in records:
        cells = ["" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in shown]
        rows.append([r["name"], *cells, r["status"]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join([first, *rest]).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    failed = [r for r in records if r["status"] != "ok"]
    lines += [f"failed: {r['name']}: {r['error']}" for r in failed]
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path, title: str) -> str:
    """Bar charts of the main metric (accuracy, else validation loss, else nothing) and of the throughput per point,
    written to ``path``. Returns a line saying what was written, or why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib to get one)"
    ok = [r for r in records if r["status"] == "ok"]
    metric = next((k for k in ("val_accuracy", "val_bits_per_byte", "val_answer_loss") if ok and k in ok[0]), None)
    if metric is None:
        return "no plot: no point was trained"
    panels = [(metric, {key: head for key, head, _ in COLUMNS}[metric]), ("tokens_per_s", "tokens/s")]
    figure, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(ok) + 1.5), sharey=True)
    names = [r["name"] for r in ok]
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.barh(names, [r[key] for r in ok])
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write(path, buffer.getvalue())
    return f"wrote {path}"
