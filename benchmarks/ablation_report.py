"""The ablation study's report (README, "Does the baseline hold?"): from the study's two comparisons it writes
docs/ablation/compare.json (both, run paths made relative), docs/ablation/ablation.png (each change's validation
loss difference from the baseline with its 95% confidence interval) and prints the README's markdown table.

Usage: python benchmarks/ablation_report.py [STUDY_DIR]   (default runs/ablation-study; benchmarks/ablation_study.sh
runs it last)
"""

import json
import sys
from pathlib import Path

from minsota.stats import confidence_half_width

DOCS = Path(__file__).resolve().parent.parent / "docs" / "ablation"


def relative(value, root: str):
    """compare.json with the machine's paths cut to the study directory's (runs) and the repository's (recipes)."""
    if isinstance(value, dict):
        return {k: relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [relative(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root + "/", "").replace(str(DOCS.parent.parent) + "/", "")
    return value


def table(result: dict) -> str:
    budget = result["budget"]
    lines = [
        "| recipe | params | val loss (mean ± 95% CI) | Δ val vs base [95% CI] | p |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in result["recipes"]:
        if "runs" not in row:
            lines.append(
                f"| {row['recipe']} | {row['parameters'] / 1e3:.0f}k | {'diverged' if 'diverged' in row else 'short of budget'} | | |"
            )
            continue
        n = len(row["runs"])
        val = row["val_loss"]
        d = row.get("vs_base", {}).get("val_loss")
        diff = f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" if d else "(base)"
        p = f"{d['p_value']:.2g}" if d else ""
        bold = "**" if d and d["p_value"] < 0.05 else ""
        lines.append(
            f"| {row['recipe']} | {row['parameters'] / 1e3:.0f}k | {val['mean']:.4f} ± {confidence_half_width(val['std'], n):.4f} "
            f"| {bold}{diff}{bold} | {p} |"
        )
    lines.append(
        f"\nValidation loss at an equal budget of {budget['value']:,.0f} {budget['unit']} ({budget['kind']}); "
        f"spread over seeds: {result['variance']['measured']}."
    )
    return "\n".join(lines)


def plot(result: dict, order: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in result["recipes"][1:] if "vs_base" in row]
    varied = {row["recipe"]: row for row in (order or {"recipes": []})["recipes"][1:] if "vs_base" in row}
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.6))

    def bar(d, y, colour, marker, label=None):
        error = [[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]]
        ax.errorbar(d["mean"], y, xerr=error, fmt=marker, color=colour, capsize=3, label=label)

    for i, row in enumerate(reversed(rows)):
        d = row["vs_base"]["val_loss"]
        bar(d, i, "C3" if d["p_value"] < 0.05 and d["mean"] > 0 else "C2" if d["p_value"] < 0.05 else "C7", "o")
        if row["recipe"] in varied:  # the same difference when the seed also sets the data order
            label = "data order varied too" if not ax.get_legend_handles_labels()[0] else None
            bar(varied[row["recipe"]]["vs_base"]["val_loss"], i - 0.3, "C0", "s", label)
    ax.set_yticks(range(len(rows)), [row["recipe"].removeprefix("ablation-") for row in reversed(rows)])
    ax.axvline(0, color="k", lw=0.8)
    if varied:
        ax.legend(loc="lower right", fontsize=8)
    n = len(rows[0]["runs"])
    ax.set_xlabel(f"validation loss − baseline's (paired by seed, {n} seeds; bars: 95% CI)")
    ax.set_title("One change at a time from ablation-base (red: worse, green: better, p < 0.05)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(study: Path) -> None:
    study = study.resolve()
    results = {
        name: json.loads((study / name / "compare.json").read_text())
        for name in ("init", "data-order")
        if (study / name / "compare.json").exists()
    }
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "compare.json").write_text(json.dumps(relative(results, str(study)), indent=1) + "\n")
    plot(results["init"], results.get("data-order"), DOCS / "ablation.png")
    for name, result in results.items():
        print(f"### {name}\n\n{table(result)}\n")
    print(f"wrote {DOCS / 'compare.json'} and {DOCS / 'ablation.png'}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ablation-study"))
