"""Robustness card of a checkpoint: adversarial accuracy, and how easily each map moves.

    python robustness_xai.py                                   # every part, the defaults
    python robustness_xai.py --parts accuracy --accuracy-images 1000
    python robustness_xai.py --methods saliency gradcam --num-images 50

Writes into --output-dir:
- robustness.json and robustness.md: the card, one section per method;
- accuracy.png: accuracy against ε under FGSM and PGD;
- fragility.png: how far each method's map moves against ε, attack and random noise;
- manipulation.png: one manipulated map (original, target, manipulated, |δ| amplified).

The parts are `xai_attacks.py`'s and `adversarial.py`'s: robust accuracy (FGSM, PGD-k,
L∞) on the first test records; Ghorbani et al.'s fragility attack against random-sign noise of the same ε;
Dombrowski et al.'s manipulation and their β-smoothing defence; and the Monte Carlo and
adversarial sensitivities of each map (`xai_metrics.sensitivity`,
`adversarial.adversarial_sensitivity`). Every number comes from --seed.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import adversarial as adv
import cifar10_data
import xai_attacks
import xai_cards
import xai_cli as cli
import xai_visualizations as xv
from cifar10_data import EXACT_TEST_RECORDS
from xai_io import atomic_write

PARTS = ("accuracy", "fragility", "manipulation", "sensitivity")
ATTACK_SAMPLES = 16  # each sampled method's `cost` option here, unless given


def default_methods() -> tuple:
    """The methods attacked by default: the input-gradient (`differentiable`) methods,
    and the methods the demo compares every network on (Grad-CAM) beside them."""
    return tuple(m for m, spec in xv.METHODS.items()
                 if spec.differentiable or "compare" in spec.figures)


def option_defaults() -> tuple:
    """(method, option, value) over the registry's defaults: the attacks differentiate
    through every sample of a map, so each method's sample count (its `cost` option) is
    `ATTACK_SAMPLES`."""
    return tuple((m, spec.cost, ATTACK_SAMPLES) for m, spec in xv.METHODS.items()
                 if spec.cost)


@dataclasses.dataclass(frozen=True)
class RobustnessConfig:
    checkpoint: Optional[str] = None      # default: cifar10_model.pkl, else pretrained/
    data_dir: Optional[str] = None        # default: $CIFAR10_DIR, then tfds, then download
    output_dir: str = "xai_results/robustness"
    parts: Tuple[str, ...] = PARTS
    methods: Optional[Tuple[str, ...]] = None  # attacked; default: `default_methods()`
    accuracy_images: int = EXACT_TEST_RECORDS  # first test records for the accuracy
    accuracy_epsilons: Tuple[float, ...] = (0, 1, 2, 4, 8)  # in 1/255
    pgd_steps: int = 20
    num_images: int = 200                 # first test records for the fragility
    sensitivity_images: int = 100         # first test records for the sensitivities
    fragility_epsilons: Tuple[float, ...] = (2, 4, 8)  # in 1/255
    attack_steps: int = 10                # steps of the attacks on explanations
    top_k: int = 100                      # pixels in Ghorbani et al.'s top-k
    beta: float = 10.0                    # the attacks' softplus surrogate
    defence_beta: float = 5.0             # β-smoothing, the defence
    manipulation_method: str = "saliency"
    manipulation_images: int = 100
    manipulation_steps: int = 100
    sensitivity_radius: float = 0.02      # the L∞ ball of the sensitivities
    sensitivity_samples: int = 10
    # (method, option, value) over `option_defaults()`, e.g. the command line's
    options: Tuple[Tuple[str, str, Any], ...] = ()
    chunk: int = 50                       # images per attacked call (a fixed shape)
    seed: int = 0
    apply_kwargs: Tuple[Tuple[str, Any], ...] = ()  # to model.apply, e.g. (("train", False),)
    quiet: bool = False

    def method_options(self, method):
        """The options of `method` that this config sets."""
        return xv.options_for(method, option_defaults() + self.options)

    def batch_size(self):
        """Every sample of a chunk in one call: no loop inside the differentiated maps."""
        costs = [{**xv.METHODS[m].defaults, **self.method_options(m)}[xv.METHODS[m].cost]
                 for m in self.methods or default_methods() if xv.METHODS[m].cost]
        return self.chunk * max(costs, default=1)


def run(config: RobustnessConfig, model=None, variables=None, data=None):
    """Runs the card's parts and writes its files; returns the report dict."""
    if model is None:
        config, model, variables = cli.load_card_checkpoint(config, "attacking")
    kwargs = dict(config.apply_kwargs)
    if config.methods is None:
        config = dataclasses.replace(config, methods=default_methods())
    for method in config.methods:
        xv.check_options(method, model, config.method_options(method), variables=variables,
                         apply_kwargs=kwargs)
    if data is None:
        data = cifar10_data.load_cifar10(config.data_dir)
    n = max(config.accuracy_images if "accuracy" in config.parts else 0,
            config.num_images, config.sensitivity_images, config.manipulation_images)
    n = min(n, len(data.test_labels))
    images = jnp.asarray(data.test_images[:n], jnp.float32) / 255.0
    labels = jnp.asarray(data.test_labels[:n])
    attacked = xai_cards.prepare_attacks(config, model, variables, images, labels, kwargs)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": cli.describe_device(), "config": dataclasses.asdict(config),
              "seconds": {}, "methods": {}}
    report.update(earlier_parts(out / "robustness.json", config))

    def save():
        atomic_write(out / "robustness.json",
                     lambda f: f.write(json.dumps(report, indent=2).encode()))
        atomic_write(out / "robustness.md", lambda f: f.write(markdown(report).encode()))

    if "accuracy" in config.parts:
        start = time.perf_counter()
        m = min(config.accuracy_images, n)
        with tqdm(total=m, desc="robust accuracy", disable=config.quiet) as bar:
            report["accuracy"] = {"num_images": m, "pgd_steps": config.pgd_steps,
                                  **xai_attacks.robust_accuracy(
                model, variables, images[:m], labels[:m], jax.random.fold_in(attacked.key, 3),
                epsilons=[e / 255 for e in config.accuracy_epsilons], steps=config.pgd_steps,
                batch_size=config.chunk * 4, apply_kwargs=kwargs, bar=bar)}
        report["accuracy"]["epsilons_255"] = list(config.accuracy_epsilons)
        report["seconds"]["accuracy"] = round(time.perf_counter() - start, 1)
        plot_accuracy(out / "accuracy.png", report["accuracy"])
        save()
    for part in ("fragility", "sensitivity"):
        if part not in config.parts:
            continue
        start = time.perf_counter()
        images = config.num_images if part == "fragility" else config.sensitivity_images
        steps = -(-min(images, n) // config.chunk) * len(config.methods) * (
            len(config.fragility_epsilons) if part == "fragility" else 1)
        with tqdm(total=steps, desc=part, disable=config.quiet) as bar:
            for method in config.methods:
                report["methods"].setdefault(method, {"label": xv.METHODS[method].label})
                report["methods"][method][part] = getattr(xai_cards, part)(
                    attacked, method, bar)._asdict()
                save()
        report["seconds"][part] = round(time.perf_counter() - start, 1)
    if "fragility" in config.parts:
        plot_fragility(out / "fragility.png", report)
    if "manipulation" in config.parts:
        start = time.perf_counter()
        chunks = -(-min(config.manipulation_images, n) // config.chunk)
        with tqdm(total=2 * chunks, desc="manipulation", disable=config.quiet) as bar:
            found, example = xai_cards.manipulation(attacked, bar)
            report["manipulation"] = found._asdict()
        report["seconds"]["manipulation"] = round(time.perf_counter() - start, 1)
        plot_manipulation(out / "manipulation.png", example, report["manipulation"])
    save()
    return report


def earlier_parts(path, config) -> dict:
    """The parts this run does not redo, from the card already in the output folder when
    it is of the same checkpoint, so that parts can run one at a time (on the CPU)."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if earlier.get("config", {}).get("checkpoint") != config.checkpoint:
        return {}
    kept = {part: earlier[part] for part in ("accuracy", "manipulation")
            if part not in config.parts and part in earlier}
    methods = {}
    for method, card in earlier.get("methods", {}).items():
        redone = config.parts if method in config.methods else ()
        card = {k: v for k, v in card.items()
                if k == "label" or (k in PARTS and k not in redone)}
        if len(card) > 1:
            methods[method] = card
    seconds = {k: v for k, v in earlier.get("seconds", {}).items() if k not in config.parts}
    # (a part run again for other methods reports its latest run's seconds)
    return {**kept, "methods": methods, "seconds": seconds,
            "earlier_parts": sorted(set(kept) | {p for c in methods.values() for p in c
                                                 if p != "label"})}


# ----------------------------------------------------------------------------------------
# The card and its figures.


def markdown(report) -> str:
    c = report["config"]
    lines = [f"# Robustness card: {c['checkpoint']}", "",
             f"Device: {report['device']}. Seed {c['seed']}. Seconds per part: "
             f"{report['seconds']}."
             + (f" Kept from an earlier run of the same checkpoint: "
                f"{', '.join(report['earlier_parts'])}." if report.get("earlier_parts") else ""),
             ""]
    acc = report.get("accuracy")
    if acc:
        lines += [f"## Accuracy under attack (first {acc['num_images']} test records, L∞)", "",
                  "| ε | " + " | ".join(f"{e:g}/255" for e in acc["epsilons_255"]) + " |",
                  "| --- |" + " --- |" * len(acc["epsilons_255"]),
                  "| FGSM | " + " | ".join(f"{100 * a:.1f} %" for a in acc["fgsm"]) + " |",
                  f"| PGD-{acc['pgd_steps']} | "
                  + " | ".join(f"{100 * a:.1f} %" for a in acc["pgd"]) + " |", ""]
    for method, card in report["methods"].items():
        lines += [f"## {card['label']} (`{method}`)", ""]
        frag = card.get("fragility")
        if frag:
            lines += [f"Fragility (Ghorbani et al.) on {frag['num_images']} images: "
                      f"top-{frag['top_k']} "
                      "intersection, Spearman ρ of |map| and centre-of-mass shift (px) against "
                      "the clean map, random ±ε noise / the targeted attack "
                      f"({frag['attack_steps']} steps, softplus β = {frag['beta']:g}); lower "
                      "intersection and ρ mean a more fragile map.", "",
                      "| ε | top-k random | top-k attack | ρ random | ρ attack | shift random "
                      "| shift attack | class kept (random / attack) | attack < random (p) |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for eps, row in frag["by_eps"].items():
                r, a, t = row["random"], row["attack"], row["attack_vs_random"]
                lines.append(f"| {eps}/255 | {r['top_k']:.3f} | {a['top_k']:.3f} | "
                             f"{r['spearman']:.3f} | {a['spearman']:.3f} | "
                             f"{r['center_shift']:.2f} | {a['center_shift']:.2f} | "
                             f"{100 * r['kept']:.0f} % / {100 * a['kept']:.0f} % | "
                             f"{VERDICT.get(t['verdict'], t['verdict'])} ({t['p_value']:.2g}) |")
            lines.append("")
        sens = card.get("sensitivity")
        if sens:
            lines += [f"Sensitivity in the L∞ ball of radius {sens['radius']:g}, "
                      f"{sens['num_images']} images, {sens['samples']} draws (mean / median): "
                      f"max {sens['max']['mean']:.3f} / {sens['max']['median']:.3f}, "
                      f"average {sens['avg']['mean']:.3f} / {sens['avg']['median']:.3f}, "
                      f"local Lipschitz {sens['lipschitz']['mean']:.3g} / "
                      f"{sens['lipschitz']['median']:.3g}, adversarial (PGD) max "
                      f"{sens['adversarial']['mean']:.3f} / {sens['adversarial']['median']:.3f}"
                      f" (median {sens['adversarial_over_max']:.2f}× the Monte Carlo max).", ""]
    man = report.get("manipulation")
    if man:
        s, b, t = man["standard"], man["beta_smoothed"], man["beta_smoothed_transfer"]
        lines += [f"## Manipulation (Dombrowski et al.), {man['method']}", "",
                  f"{man['num_images']} images, ‖δ‖∞ ≤ {man['eps_255']}/255, "
                  f"{man['steps']} Adam steps; each image's target is the next image's map. "
                  "MSE of maps as shares × H·W (mean 1).", "",
                  "| maps | MSE to target before | after | class kept |",
                  "| --- | --- | --- | --- |",
                  f"| standard (ReLU) | {s['mse_before']:.3f} | {s['mse_after']:.3f} | "
                  f"{100 * s['kept']:.0f} % |",
                  f"| β-smoothed (β = {man['defence_beta']:g}), attack made for the standard "
                  f"maps | {t['mse_before']:.3f} | {t['mse_after']:.3f} | |",
                  f"| β-smoothed, attacked directly | {b['mse_before']:.3f} | "
                  f"{b['mse_after']:.3f} | {100 * b['kept']:.0f} % |", "",
                  f"Accuracy on these images: standard {100 * man['standard_accuracy']:.1f} %, "
                  f"β-smoothed network {100 * man['beta_smoothed_accuracy']:.1f} %.", ""]
    return "\n".join(lines)


VERDICT = {"better": "✓", "worse": "✗", "tie": "="}


def _pyplot():
    import matplotlib  # noqa: PLC0415 - figures only
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def plot_accuracy(path, acc):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    eps = acc["epsilons_255"]
    ax.plot(eps, 100 * np.asarray(acc["fgsm"]), "o-", label="FGSM")
    ax.plot(eps, 100 * np.asarray(acc["pgd"]), "s-", label=f"PGD-{acc['pgd_steps']}")
    ax.set(xlabel="ε (/255, L∞)", ylabel="accuracy (%)", ylim=(0, 100),
           title=f"first {acc['num_images']} test records")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def plot_fragility(path, report):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, measure, label in zip(axes, ("top_k", "spearman", "center_shift"),
                                  ("top-k intersection", "Spearman ρ", "centre shift (px)")):
        for i, (method, card) in enumerate(report["methods"].items()):
            frag = card.get("fragility")
            if not frag:
                continue
            eps = [0] + frag["epsilons_255"]
            clean = 0.0 if measure == "center_shift" else 1.0
            for kind, style in (("attack", "-"), ("random", "--")):
                ax.plot(eps, [clean] + [frag["by_eps"][f"{e:g}"][kind][measure]
                                        for e in frag["epsilons_255"]],
                        style, color=f"C{i}", marker="o", ms=3,
                        label=f"{card['label']} ({kind})")
        ax.set(xlabel="ε (/255)", title=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def plot_manipulation(path, example, result):
    plt = _pyplot()
    delta = np.asarray(example["adversarial"] - example["image"])
    panels = [("image", np.asarray(example["image"])),
              ("original map", np.asarray(example["original"])),
              ("target map", np.asarray(example["target"])),
              ("manipulated map", np.asarray(example["manipulated"])),
              ("adversarial image", np.asarray(example["adversarial"])),
              ("|δ| × 10", np.clip(10 * np.abs(delta), 0, 1))]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6))
    for ax, (title, a) in zip(axes, panels):
        ax.imshow(a if a.ndim == 3 else np.abs(a), cmap=None if a.ndim == 3 else "hot")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{result['method']}: MSE to target {result['standard']['mse_before']:.2f} "
                 f"-> {result['standard']['mse_after']:.2f} (mean of {result['num_images']})",
                 fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# The command line.


def parse_args(argv=None) -> RobustnessConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = RobustnessConfig()
    cli.add_input_flags(parser, defaults.output_dir)
    cli.add_apply_kwargs_flag(parser)
    parser.add_argument("--parts", nargs="+", default=defaults.parts, choices=PARTS,
                        help="default: all")
    parser.add_argument("--methods", nargs="+", default=None, choices=tuple(xv.METHODS),
                        help=f"default: {' '.join(default_methods())}")
    parser.add_argument("--manipulation-method", default=defaults.manipulation_method,
                        choices=adv.differentiable_methods(), help="default: %(default)s")
    for name in ("accuracy_epsilons", "fragility_epsilons"):
        parser.add_argument("--" + name.replace("_", "-"), nargs="+", type=_nonnegative,
                            default=getattr(defaults, name), help="in 1/255 (default: %(default)s)")
    for name, text in [("accuracy_images", "first test records for the accuracy"),
                       ("pgd_steps", "PGD steps of the accuracy"),
                       ("num_images", "first test records for the fragility"),
                       ("sensitivity_images", "first test records for the sensitivities"),
                       ("attack_steps", "steps of the attacks on explanations"),
                       ("top_k", "pixels in the top-k intersection"),
                       ("manipulation_images", "first test records manipulated"),
                       ("manipulation_steps", "Adam steps of the manipulation"),
                       ("sensitivity_samples", "Monte Carlo draws of the sensitivities"),
                       ("chunk", "images per attacked call"),
                       ("seed", "seeds every random draw")]:
        parser.add_argument("--" + name.replace("_", "-"),
                            type=cli.int_at_least(0 if name == "seed" else 1),
                            default=getattr(defaults, name),
                            help=f"{text} (default: %(default)s)")
    for name, text in [("beta", "softplus β of the attacks' surrogate network"),
                       ("defence_beta", "softplus β of the β-smoothing defence"),
                       ("sensitivity_radius", "L∞ radius of the sensitivities")]:
        parser.add_argument("--" + name.replace("_", "-"), type=_positive,
                            default=getattr(defaults, name),
                            help=f"{text} (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    cli.add_method_flags(parser, xv.METHODS, option_defaults())
    namespace = parser.parse_args(argv)
    options = cli.method_options(parser, namespace, xv.METHODS)
    args = {k: v for k, v in vars(namespace).items() if ":" not in k}
    args["options"], args["apply_kwargs"] = options, tuple(args["apply_kwargs"])
    for name in ("parts", "methods", "accuracy_epsilons", "fragility_epsilons"):
        if args[name] is not None:
            args[name] = tuple(dict.fromkeys(args[name]))
    return RobustnessConfig(**args)


def _number(text, *, positive):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(
            f"must be a {'positive' if positive else 'non-negative'} number, got {text!r}")
    return value


def _positive(text):
    return _number(text, positive=True)


def _nonnegative(text):
    return _number(text, positive=False)


@cli.entry_point
def main(argv=None):
    config = parse_args(argv)
    cli.check_writable(config.output_dir, "--output-dir", folder=True)
    report = run(config)
    if not config.quiet:
        print(markdown(report))
        print(f"wrote {config.output_dir}/robustness.json, robustness.md and the figures")


if __name__ == "__main__":
    main()
