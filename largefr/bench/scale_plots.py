"""PNG plots of a ``largefr bench scale`` sweep (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _series(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["weight_dtype"], row["storage"], row["world_size"], row["sample_rate"])
        groups.setdefault(key, []).append(row)
    return {k: sorted(v, key=lambda r: r["num_classes"]) for k, v in groups.items()}


def plot_results(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "memory_vs_classes.png", out / "step_vs_sampled_rows.png"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (dtype, storage, world, rate), series in _series(rows).items():
        classes = [r["num_classes"] / 1e6 for r in series]
        line = ax.plot(classes, [r["peak_mb"] / 1024 for r in series], "o-", label=f"measured {dtype} {storage} N={world} r={rate}")[0]
        ax.plot(classes, [r["planned_mb"] / 1024 for r in series], "x--", color=line.get_color(), label=f"planner {dtype} {storage}")
    ax.set_xlabel("classes (millions)")
    ax.set_ylabel("peak memory per rank (GiB, above the process baseline)")
    ax.set_title("Head memory vs classes: measured and planned")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (dtype, storage, world, rate), series in _series(rows).items():
        rows_per_step = [r["rows_per_step"] / 1e3 for r in series]
        ax.plot(rows_per_step, [r["step_ms"] for r in series], "o-", label=f"step {dtype} {storage} N={world} r={rate}")
        ax.plot(rows_per_step, [r["fp32_floor_ms"] for r in series], "x:", label=f"fp32 GEMM floor {dtype} N={world}")
        for r, x in zip(series, rows_per_step):
            ax.annotate(f"{r['num_classes'] / 1e6:g}M", (x, r["step_ms"]), fontsize=6)
    ax.set_xlabel("sampled rows per rank + global batch (thousands)")
    ax.set_ylabel("step time (ms)")
    ax.set_title("Step time follows r x C_local + B (labels: total classes C)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
