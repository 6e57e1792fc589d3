"""Measures every explainer on CIFAR-10 test images: a "saliency card" per method.

    python evaluate_xai.py                          # the first 1,000 (exact) test records
    python evaluate_xai.py --num-images 100 --methods gradcam saliency --step 64

For each method it explains each image's predicted class and reports
  - deletion and insertion AUC (Petsiuk et al. 2018) against random maps' AUC;
  - cascading randomisation (Adebayo et al. 2018): Spearman correlation of |map| and of
    the signed map, and SSIM, with the trained model's map at every level, from the
    output layer down to conv1, on the first --randomization-images images;
  - the random-logit test: SSIM and |Spearman| between the map of the predicted class
    and the map of a random other class;
  - Integrated Gradients' completeness gap;
  - model passes and milliseconds per image, and the parameters used.
It writes evaluation.json, evaluation.md, deletion_insertion.png and randomization.png
to --output-dir, and rewrites the JSON and Markdown after each method.
"""

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import cifar10_data
import xai_cards
import xai_cli as cli
import xai_metrics as xm
import xai_visualizations as xv
from cifar10_data import EXACT_TEST_RECORDS
from xai_cards import MEASURES, RANDOMIZATION_SETUP
from xai_io import atomic_write

VERDICT_MARKS = {"better": "✓", "worse": "✗", "tie": "="}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    checkpoint: Optional[str] = None      # default: cifar10_model.pkl, else pretrained/
    data_dir: Optional[str] = None        # default: $CIFAR10_DIR, then tfds, then download
    output_dir: str = "xai_results/evaluation"
    num_images: int = EXACT_TEST_RECORDS  # the first test records, the exact ones
    methods: Optional[Tuple[str, ...]] = None  # default: every method that fits the model
    step: int = 32                        # pixels removed or inserted per curve point
    deletion_baseline: str = "zero"
    insertion_baseline: str = "blur"
    randomization_images: int = 100
    chunk: int = 100                      # images per explainer call (a fixed shape)
    batch_size: int = 1024                # model inputs per call in the sampling methods
    # (method, option, value) over the registry's defaults, e.g. the command line's
    # ("integrated_gradients", "steps", 16)
    options: Tuple[Tuple[str, str, Any], ...] = ()
    layer: Optional[str] = None           # the layer methods' layer; default: the model's
    faithfulness_subsets: int = 100       # random pixel subsets per image (Bhatt et al.)
    infidelity_perturbations: int = 50    # Gaussian perturbations per image (Yeh et al.)
    focus_mosaics: int = 100              # 2 x 2 mosaics of four classes (Focus)
    seed: int = 0
    apply_kwargs: Tuple[Tuple[str, Any], ...] = ()  # to model.apply, e.g. (("train", False),)
    quiet: bool = False

    def method_options(self, method):
        """The options of `method` that this config sets."""
        return xv.options_for(method, self.options, layer=self.layer)


def markdown(report):
    """The evaluation as Markdown tables."""
    ref, cards = report["random_reference"], report["methods"]
    lines = [f"Evaluated on the first {report['num_images']} test images "
             f"(accuracy {report['accuracy']:.3f}), each explained for its predicted class; "
             f"{report['device']}; curves every {report['config']['step']} px, deletion to "
             f"'{report['config']['deletion_baseline']}', insertion from "
             f"'{report['config']['insertion_baseline']}'.", "",
             "| method | deletion AUC ↓ | insertion AUC ↑ | randomised model: ρ of |map| at the "
             "output layer → all layers (mean) | random-logit SSIM | ms / image | "
             "passes / image (fwd + bwd) | parameters |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| random map | {ref['deletion_auc']:.3f} | {ref['insertion_auc']:.3f} | | | | | |"]
    for card in cards.values():
        v = card["verdicts"]
        passes = card["passes_per_image"]
        rho = (card["randomization"] or {}).get("spearman_abs")
        cascade = (f"{rho[0]:.2f} → {rho[-1]:.2f} ({v['randomization_mean_abs_spearman']:.2f}, "
                   f"{v['randomization']})" if rho else "not run (no parameters)")
        params = ", ".join(f"{k}={val}" for k, val in card["parameters"].items()) or "–"
        marks = {k: VERDICT_MARKS[card["statistics"][k]["vs_random"]["verdict"]]
                 for k in ("deletion_auc", "insertion_auc")}
        lines.append(
            f"| {card['method']} | {card['deletion_auc']:.3f} {marks['deletion_auc']} | "
            f"{card['insertion_auc']:.3f} {marks['insertion_auc']} | {cascade} | "
            f"{card['random_logit']['ssim']:.2f} | "
            f"{card['ms_per_image']:.2f} | {passes['forward']} + {passes['backward']} | "
            f"{params} |")
    levels = next(iter(cards.values()))["randomization_levels"] if cards else []
    if levels:
        lines += ["", "Cascading randomisation, mean Spearman ρ of |map| (ρ of the signed map, SSIM) "
                  f"with the trained model's map; {RANDOMIZATION_SETUP}:",
                  "", "| method | " + " | ".join(levels) + " |",
                  "| --- |" + " --- |" * len(levels)]
        for card in cards.values():
            r = card["randomization"]
            lines.append(f"| {card['method']} | " + " | ".join(
                f"{a:.2f} ({s:.2f}, {q:.2f})" for a, s, q in
                zip(r["spearman_abs"], r["spearman_signed"], r["ssim"])) + " |")
        lines += ["", "The freshly initialised model on its own, mean ρ of |map| with the "
                  "trained model's map: explaining the trained model's predicted class "
                  "(the cascade's last level) and its own prediction:", "",
                  "| method | trained model's class | its own prediction |",
                  "| --- | --- | --- |"]
        for card in cards.values():
            f = card["fresh_model"]
            lines.append(f"| {card['method']} | "
                         f"{f['for_the_trained_models_target']['spearman_abs']:.2f} | "
                         f"{f['for_its_own_prediction']['spearman_abs']:.2f} |")
    if cards:
        shown = [k for k in MEASURES if k in next(iter(cards.values()))["statistics"]]
        lines += ["", "Every measure per image, as the mean and its 95 % bootstrap interval; "
                  "✓ beats the random map on the same images, ✗ loses to it, = a tie "
                  "(paired Wilcoxon signed-rank test, p < 0.05; p-values in "
                  "evaluation.json). ↓/↑: lower/higher is better.", "",
                  "| method | " + " | ".join(
                      MEASURES[k][0] + {True: " ↓", False: " ↑", None: ""}[MEASURES[k][1]]
                      for k in shown) + " |", "| --- |" + " --- |" * len(shown),
                  "| random map | " + " | ".join(
                      f"{ref[k]:.3f}" if k in ref else "" for k in shown) + " |"]
        for card in cards.values():
            cells = []
            for k in shown:
                st = card["statistics"][k]
                mark = VERDICT_MARKS[st["vs_random"]["verdict"]] if "vs_random" in st else ""
                cells.append(f"{st['mean']:.3f} [{st['low']:.3f}, {st['high']:.3f}] {mark}")
            lines.append(f"| {card['method']} | " + " | ".join(cells) + " |")
    skipped = report.get("skipped") or {}
    if skipped:
        lines += ["", "Not evaluated, since they cannot explain this model: "
                  + "; ".join(f"{m} ({why})" for m, why in skipped.items()) + "."]
    for card in cards.values():
        gap = card.get("completeness_gap")
        if gap:
            lines += ["", f"{card.get('label', card['method'])}'s completeness gap: mean "
                      f"{gap['mean']:.4f}, median {gap['median']:.4f}, max {gap['max']:.4f}."]
    return "\n".join(lines) + "\n"


def plot_curves(path, reference, curves):
    """Mean deletion and insertion curves per method, with the random reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind in zip(axes, ("deletion", "insertion")):
        x = np.asarray(reference["fractions"])
        for name, c in curves.items():
            ax.plot(x, np.mean(np.asarray(c[kind]), 0),
                    label=f"{name} ({float(np.mean(c[kind + '_auc'])):.3f})")
        ax.plot(x, np.mean(np.asarray(reference[kind]), 0), "k--",
                label=f"random ({float(np.mean(reference[kind + '_auc'])):.3f})")
        ax.set(xlabel=f"fraction of pixels {'removed' if kind == 'deletion' else 'shown'}",
               ylabel="probability of the predicted class", title=f"{kind} (AUC)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def plot_randomization(path, image, levels, cards, arrays):
    """Correlation against level per method, and one image's maps: the trained model's,
    then at every level (|map|, each scaled to its own maximum)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(cards)
    fig = plt.figure(figsize=(1.3 * (len(levels) + 2), 1.4 * (len(names) + 3)))
    grid = fig.add_gridspec(len(names) + 2, len(levels) + 2)
    ax = fig.add_subplot(grid[:2, :])
    for name in names:
        ax.plot(range(len(levels) + 1), [1.0] + cards[name]["randomization"]["spearman_abs"],
                "o-", label=name)
    ax.set_xticks(range(len(levels) + 1), ["trained"] + levels, fontsize=7)
    ax.set(ylabel="Spearman ρ of |map| with trained", title="cascading randomisation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    for row, name in enumerate(names, 2):
        maps = [arrays[name].example_map] + list(arrays[name].example_maps)
        cells = [image] + [np.abs(m) for m in maps]
        for col, cell in enumerate(cells[:len(levels) + 2]):
            a = fig.add_subplot(grid[row, col])
            a.imshow(cell if col == 0 else cell / (cell.max() + 1e-12),
                     cmap=None if col == 0 else "jet")
            a.set_xticks([])
            a.set_yticks([])
            if col == 0:
                a.set_ylabel(name, fontsize=7)
            if row == 2:
                a.set_title((["image", "trained"] + levels)[col], fontsize=6)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


def evaluate(config: EvalConfig, model=None, variables=None, data=None):
    """Runs the evaluation and writes its files; returns the report dict."""
    if model is None:
        config, model, variables = cli.load_card_checkpoint(config, "evaluating")
    image_shape = data.test_images.shape[1:] if data is not None else None
    kwargs, skipped = dict(config.apply_kwargs), {}
    if config.methods is None:  # every method that can explain this model
        skipped = {m: why for m in xv.METHODS
                   if (why := xv.unsupported(m, model, image_shape, kwargs))}
        config = dataclasses.replace(config, methods=tuple(m for m in xv.METHODS
                                                           if m not in skipped))
        if skipped and not config.quiet:
            print("skipped: " + "; ".join(f"{m} ({why})" for m, why in skipped.items()))
    for method in config.methods:  # every option checked before any work
        xv.check_options(method, model, config.method_options(method), image_shape, variables,
                         kwargs)
    if data is None:
        data = cifar10_data.load_cifar10(config.data_dir)
    n = min(config.num_images, len(data.test_labels))
    images = jnp.asarray(data.test_images[:n], jnp.float32) / 255.0
    run = xai_cards.prepare(config, model, variables, images,
                            jnp.asarray(data.test_labels[:n]), kwargs)
    out = Path(config.output_dir)
    writer = cli.is_writer()  # in a multi-process run, only process 0 writes
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    reference = xai_cards.reference(run)
    report = {"num_images": n, "accuracy": float(jnp.mean(run.preds == run.labels)),
              "device": cli.describe_device(), "config": dataclasses.asdict(config),
              "random_reference": {k: float(np.mean(reference[k])) for k in MEASURES
                                   if k in reference},
              "methods": {}, "skipped": skipped}
    found = {}
    for method in tqdm(config.methods, desc="methods", disable=config.quiet):
        found[method] = xai_cards.card(run, method)
        per_image = {**{k: found[method].curves[k] for k in ("deletion_auc", "insertion_auc")},
                     **found[method].measures}
        card = found[method].summary
        card["statistics"] = xai_cards.statistics(per_image, reference, config.seed)
        card["verdicts"] = xai_cards.verdicts(card)
        report["methods"][method] = card
        if writer:
            atomic_write(out / "evaluation.json",
                         lambda f: f.write(json.dumps(report, indent=2).encode()))
            atomic_write(out / "evaluation.md", lambda f: f.write(markdown(report).encode()))
    if not writer:
        return report
    plot_curves(out / "deletion_insertion.png", reference,
                {m: c.curves for m, c in found.items()})
    if run.levels:
        plot_randomization(out / "randomization.png", np.asarray(images[0]), run.levels,
                           report["methods"], found)
    return report


def parse_args(argv=None) -> EvalConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = EvalConfig()
    cli.add_input_flags(parser, defaults.output_dir)
    cli.add_apply_kwargs_flag(parser)
    parser.add_argument("--methods", nargs="+", default=None, choices=tuple(xv.METHODS),
                        help="default: every method that can explain the model")
    parser.add_argument("--layer", default=None,
                        help="the layer that the layer methods (Grad-CAM, Grad-CAM++, "
                             "Guided Grad-CAM) explain (default: the model's explanation "
                             "layer, e.g. conv3 for the CNN)")
    for name in ("deletion_baseline", "insertion_baseline"):
        parser.add_argument("--" + name.replace("_", "-"), default=getattr(defaults, name),
                            choices=xm.BASELINES, help="default: %(default)s")
    for name, text in [("num_images", "first test records to explain"),
                       ("step", "pixels removed or inserted per curve point"),
                       ("randomization_images", "images in the randomisation and "
                                                "random-logit tests"),
                       ("chunk", "images per explainer call"),
                       ("batch_size", "model inputs per call in the sampling methods"),
                       ("faithfulness_subsets", "random pixel subsets per image in the "
                                                "faithfulness correlation"),
                       ("infidelity_perturbations", "Gaussian perturbations per image in "
                                                    "the infidelity"),
                       ("focus_mosaics", "2 x 2 mosaics of four test classes for Focus "
                                         "(0: no Focus)"),
                       ("seed", "seeds the random maps, SmoothGrad, RISE and the random "
                                "weights")]:
        parser.add_argument("--" + name.replace("_", "-"),
                            type=cli.int_at_least(0 if name in ("seed", "focus_mosaics")
                                                  else 1),
                            default=getattr(defaults, name),
                            help=f"{text} (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    cli.add_method_flags(parser, xv.METHODS)
    namespace = parser.parse_args(argv)
    options = cli.method_options(parser, namespace, xv.METHODS)
    args = {k: v for k, v in vars(namespace).items() if ":" not in k}
    args["options"], args["apply_kwargs"] = options, tuple(args["apply_kwargs"])
    if args["methods"] is not None:
        args["methods"] = tuple(dict.fromkeys(args["methods"]))
    return EvalConfig(**args)


@cli.entry_point
def main(argv=None):
    config = parse_args(argv)
    cli.check_writable(config.output_dir, "--output-dir", folder=True)
    report = evaluate(config)
    if not cli.is_writer():
        print(f"process {jax.process_index()} of {jax.process_count()}: evaluated its share "
              "of the images; process 0 writes the files")
        return
    if not config.quiet:
        print(markdown(report))
        print(f"wrote {config.output_dir}/evaluation.json, evaluation.md, "
              "deletion_insertion.png, randomization.png")


if __name__ == "__main__":
    main()
