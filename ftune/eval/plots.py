"""The eval report's figure: trained vs base side by side for held-out loss, answer problems and
benchmark scores (whichever the report has), one PNG."""

from __future__ import annotations

from pathlib import Path


def _panels(report: dict) -> list[tuple[str, list[str], list[float], list[float | None]]]:
    """(title, labels, trained values, base values) per panel with data."""
    t, b = report["trained"], report.get("base", {})
    panels = []
    figures = [(k, label) for k, label in (("loss", "held-out loss"), ("reward", "reward"),
                                           ("reference_match", "reference found")) if k in t]
    if figures:
        panels.append(("held-out", [label for _, label in figures], [t[k] for k, _ in figures],
                       [b.get(k) for k, _ in figures]))
    if "problem_counts" in t:
        names = sorted(set(t["problem_counts"]) | set(b.get("problem_counts", {}))) or ["none"]
        panels.append((f"answer problems (of {len(t['generations'])})", names,
                       [t["problem_counts"].get(n, 0) for n in names],
                       [b["problem_counts"].get(n, 0) for n in names] if "problem_counts" in b else [None] * len(names)))
    if t.get("benchmarks"):
        keys = [(task, metric) for task, scores in t["benchmarks"].items() for metric in scores]
        panels.append(("benchmarks", [f"{task}\n{metric}" for task, metric in keys],
                       [t["benchmarks"][task][metric] for task, metric in keys],
                       [b.get("benchmarks", {}).get(task, {}).get(metric) for task, metric in keys]))
    return panels


def summary_plot(report: dict, path: Path) -> bool:
    """Write the figure; False when there is nothing to plot."""
    panels = _panels(report)
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, labels, trained, base) in zip(axes[0], panels):
        xs = range(len(labels))
        has_base = any(v is not None for v in base)
        width = 0.4 if has_base else 0.6
        ax.bar([x - (width / 2 if has_base else 0) for x in xs], trained, width, label="trained")
        if has_base:
            ax.bar([x + width / 2 for x in xs], [v if v is not None else 0 for v in base], width, label="base")
        ax.set_xticks(list(xs), labels, fontsize=8, rotation=20 if len(labels) > 3 else 0)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(str(report["subject"])[-80:], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
