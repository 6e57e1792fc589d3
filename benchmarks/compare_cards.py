"""Two saliency cards (evaluation.json) compared number by number.

    python evaluate_xai.py --num-images 20 ... --output-dir xai_results/card_before
    (change the code)
    python evaluate_xai.py --num-images 20 ... --output-dir xai_results/card_after
    python benchmarks/compare_cards.py xai_results/card_before/evaluation.json \
        xai_results/card_after/evaluation.json --methods gradcam saliency

Every number of the random reference and of each method's card (those of --methods, by
default every method in both) is compared, except timings and the run's settings; it
prints the largest absolute difference per method and exits 1 when one exceeds
--tolerance, or when a number is in one card and not in the other. This is how a
refactoring of the cards shows that it changed no measure.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import xai_cli as cli  # noqa: E402

TIMINGS = {"ms_per_image", "compile_s", "deletion_insertion_s", "measures_s"}


def numbers(tree, prefix=""):
    """{path: number} of every int or float leaf (bools as 0/1), timings left out."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() if key not in TIMINGS
                for k, v in numbers(value, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, value in enumerate(tree)
                for k, v in numbers(value, f"{prefix}[{i}]").items()}
    if isinstance(tree, (int, float)):
        return {prefix: float(tree)}
    return {}


def differences(before, after):
    """(largest absolute difference, paths in only one of them)."""
    a, b = numbers(before), numbers(after)
    missing = sorted(set(a) ^ set(b))
    worst = max((abs(a[k] - b[k]) for k in set(a) & set(b)), default=0.0)
    return worst, missing


@cli.entry_point
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args(argv)
    before, after = (json.loads(Path(p).read_text()) for p in (args.before, args.after))
    methods = args.methods or [m for m in before["methods"] if m in after["methods"]]
    rows = [("random reference", before["random_reference"], after["random_reference"]),
            ("accuracy", before["accuracy"], after["accuracy"])]
    rows += [(m, before["methods"][m], after["methods"][m]) for m in methods]
    print("| part | numbers | max |difference| | only in one |")
    print("| --- | --- | --- | --- |")
    failed = False
    for name, a, b in rows:
        worst, missing = differences(a, b)
        print(f"| {name} | {len(numbers(a))} | {worst:.3g} | {', '.join(missing) or '–'} |")
        failed |= worst > args.tolerance or bool(missing)
    if failed:
        raise SystemExit(f"the cards differ by more than --tolerance {args.tolerance}")


if __name__ == "__main__":
    main()
