"""Compact Markdown tables of the real-data comparisons, for docs/real_data.md.

Reads the ``table.csv`` that ``taskbalance compare`` wrote for each comparison and prints,
per problem, one row per method with the columns a reader compares first (the per-task
AUCs, or the summaries where there are many tasks), both Δm% columns, the mean rank and
the step time. The full tables (every metric) stay in each run folder's ``table.md``.

    taskbalance compare --problem "census_income[group=1]" --seeds 3 \
        --out runs/full/census_incomegroup1
    taskbalance compare --problem "census_income[group=2]" --seeds 3 \
        --out runs/full/census_incomegroup2
    taskbalance compare --problem yeast --seeds 3 --out runs/full/yeast
    python benchmarks/real_data_report.py runs/full
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

#: folder name -> (title, the metric columns shown).
PROBLEMS = {
    "census_incomegroup1": ("Census-Income, group 1", ("income_auc", "marital_auc")),
    "census_incomegroup2": ("Census-Income, group 2", ("education_auc", "marital_auc")),
    "yeast": ("Yeast (K = 14)", ("mean_auc", "hamming")),
}


def _cell(row: dict[str, str], name: str, digits: int) -> str:
    mean, std = row.get(f"{name}_mean", ""), row.get(f"{name}_std", "")
    if not mean:
        return "–"
    text = f"{float(mean):.{digits}f}"
    return f"{text} ± {float(std):.{digits}f}" if std else text


def _signed(row: dict[str, str], name: str) -> str:
    mean, std = row.get(name, ""), row.get(f"{name}_std", "")
    if not mean:
        return "–"
    return f"{float(mean):+.2f} ± {float(std):.2f}" if std else f"{float(mean):+.2f}"


def table(path: Path, metrics: tuple[str, ...]) -> str:
    """One problem's compact table from its ``table.csv``."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    head = ["method", *metrics, "Δm% ↓", "Δm% vs STL ↓", "MR ↓", "time ×EW"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row["seeds_ok"] == "0":
            reason = row["errors"].split(" | ")[0].split(":")[0]
            cells = [row["method"], f"failed on every seed ({reason})"]
            lines.append("| " + " | ".join(cells + [""] * (len(head) - 2)) + " |")
            continue
        bold = row["method"] in ("equal", "single_task", "tuned_static")
        name = f"**{row['method']}**" if bold else row["method"]
        cells = [name, *(_cell(row, m, 4) for m in metrics)]
        cells += [_signed(row, "delta_m"), _signed(row, "delta_m_stl")]
        cells += [f"{float(row['mean_rank']):.3g}", f"{float(row['step_time_ratio']):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(root: str = "runs/full") -> None:
    for folder, (title, metrics) in PROBLEMS.items():
        path = Path(root) / folder / "table.csv"
        if path.exists():
            print(f"### {title}\n\n{table(path, metrics)}\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
