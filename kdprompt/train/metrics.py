"""Run logging: JSON-lines metrics, TensorBoard through Accelerate, and PNG curves."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdprompt.io import atomic_write


class MetricsLog:
    """Append-only JSONL metrics on the main process, mirrored to the accelerator's trackers."""

    def __init__(self, path: Path, accelerator: Any | None = None) -> None:
        self.path = Path(path)
        self.accelerator = accelerator
        self.enabled = accelerator is None or accelerator.is_main_process
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, row: dict[str, Any], step: int) -> None:
        """Record ``row`` at ``step``."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in row.items()}}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            numeric = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
            self.accelerator.log(numeric, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run re-logs them)."""
        if not self.enabled or not self.path.is_file():
            return
        rows = read_jsonl(self.path)
        kept = "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step)
        atomic_write(self.path, lambda p: p.write_text(kept, encoding="utf-8"))


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (a torn last line from a crash is ignored)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_curves(jsonl: Path, png: Path, keys: Sequence[str], title: str = "") -> Path | None:
    """Plot ``keys`` against step from a metrics file into ``png`` (one panel per key)."""
    rows = read_jsonl(jsonl) if Path(jsonl).is_file() else []
    present = [k for k in keys if any(isinstance(r.get(k), int | float) for r in rows)]
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present, strict=True):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(png, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return Path(png)
