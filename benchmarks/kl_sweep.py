"""One gain-against-KL picture from several `mavis eval` runs (say, one per beta): every
method's row at weight 1 on the objective, labelled with its run's beta, beside the soft
best-of-N frontier of the runs that traced one.

    python benchmarks/kl_sweep.py out-b1 out-b2 out-b4 out-b8 --objective positivity --out sweep.png

Prints the table it draws (method, beta, kl_topk, gain with their intervals).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mavis_lc.frontier import Frontier
from mavis_lc.plots import FrontPoint, GainPanel, save_gain_kl_plot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="output folders of mavis eval (each with results.json)")
    parser.add_argument("--objective", required=True, help="the objective at weight 1")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--title", default="gain against KL over beta")
    args = parser.parse_args()
    points: dict[str, list[FrontPoint]] = {}
    curve: list[tuple[float, float]] = []
    print("| method | beta | kl_topk | gain (base SD) |\n|---|---|---|---|")
    for run in args.runs:
        data = json.loads((Path(run) / "results.json").read_text())
        beta = data["settings"]["beta"]
        for row in data["rows"]:
            if row["method"] == "base" or row["weights"].get(args.objective) != 1.0:
                continue
            if row["method"].startswith("best-of") and points.get(row["method"]):
                continue  # best-of-N does not depend on beta: once is enough
            low, high = row["gain_ci"][args.objective]
            kl_low, kl_high = row["kl_topk_ci"]
            label = row["method"] + (" (oracle reward)" if row["oracle"] else "")
            gain = row["gain_sd"][args.objective]
            shown = "" if row["method"].startswith("best-of") else f"b{beta:g}"
            points.setdefault(label, []).append(
                FrontPoint(shown, row["kl_topk"], gain, (kl_high - kl_low) / 2, (high - low) / 2)
            )
            print(
                f"| {label} | {beta:g} | {row['kl_topk']:.2f} [{kl_low:.2f}, {kl_high:.2f}] "
                f"| {gain:+.2f} [{low:+.2f}, {high:+.2f}] |"
            )
        for f in data.get("frontiers", []):
            if f["weights"].get(args.objective) == 1.0 and not curve:
                frontier = Frontier(f["weights"], f["n_samples"], f["kl"], f["gain"])
                curve = [(k, g) for k, g in zip(frontier.kl, frontier.gain, strict=True) if k <= frontier.reach]
    panel = GainPanel(f"{args.objective} at weight 1", curve, points)
    print(save_gain_kl_plot([panel], args.out, title=args.title))


if __name__ == "__main__":
    main()
