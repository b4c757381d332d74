"""Compare SPIN runs with same-compute SFT baseline runs (`spin.objective=sft`), across seeds.

    python jobs/compare.py runs/spin-s0 runs/spin-s1 runs/sft-s0 runs/sft-s1 [--out DIR]

Prints per-iteration held-out metrics: each arm's mean ± std over seeds and SPIN - SFT (paired by
seed); writes DIR/compare.png and DIR/compare.html. Runs of different models or data are refused
(exit 2), naming the keys; `--per-seed` allows a model and data set per seed (e.g. a p_0 per seed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (run.output_dir of each job)")
    parser.add_argument("--out", default=".", help="where compare.png and compare.html go (default: here)")
    parser.add_argument(
        "--per-seed", action="store_true", help="each seed may use its own model and data; runs of a seed may not"
    )
    args = parser.parse_args(argv)

    from spin_ray import plots
    from spin_ray.comparison import ComparisonError, check_comparable, format_table, load, summarize
    from spin_ray.report import figure, section

    try:
        runs = [load(path) for path in args.runs]
        also_differ = check_comparable(runs, per_seed=args.per_seed)
        summary = summarize(runs)
    except ComparisonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = format_table(summary)
    print(table)
    if also_differ:
        print(f"\nnote: these runs also differ in {', '.join(also_differ)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig = plots.comparison_figure(summary)
    fig.savefig(out / "compare.png", dpi=100)
    page = section("compare", "SPIN vs the same-compute SFT baseline", f"{len(runs)} runs.", f"<pre>{table}</pre>")
    (out / "compare.html").write_text(f"<!doctype html><meta charset=utf-8>{page}{figure(fig, '')}")
    print(f"\nwrote {out / 'compare.png'} and {out / 'compare.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
