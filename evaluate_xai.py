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
import time
from pathlib import Path
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import cifar10_data
import xai_cli as cli
import xai_metrics as xm
import xai_visualizations as xv
from checkpoints import atomic_write, default_checkpoint, describe_checkpoint, load_checkpoint
from cifar10_data import EXACT_TEST_RECORDS, map_batches

# A method passes the randomisation check when the Spearman ρ of its |maps| with the
# trained model's maps, averaged over the cascade's levels, is below this: its maps
# change once the weights are random. At or above it they mostly survive them.
RANDOMIZATION_PASS = 0.5


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
    ig_steps: int = 64
    smoothgrad_samples: int = 50
    rise_masks: int = 4000
    occlusion_patch: int = 4
    occlusion_stride: int = 2
    layer: Optional[str] = None           # the layer methods' layer; default: the model's
    seed: int = 0
    quiet: bool = False

    def options(self, method):
        """The options of `method` that this config sets (by the options' names)."""
        given = {"layer": self.layer, "steps": self.ig_steps,
                 "n_samples": self.smoothgrad_samples, "n_masks": self.rise_masks,
                 "patch": self.occlusion_patch, "stride": self.occlusion_stride}
        return {k: v for k, v in given.items() if k in xv.METHODS[method].options}


def run_chunks(fn, arrays, chunk, bar=None):
    """`cifar10_data.map_batches` with a progress bar."""
    return map_batches(fn, arrays, chunk, on_batch=None if bar is None else bar.update)


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


class Evaluation:
    """The model, the images and the compiled shared pieces of one evaluation run."""

    def __init__(self, config: EvalConfig, model, variables, images, labels):
        self.config, self.model, self.variables = config, model, variables
        self.images, self.labels = images, labels
        self.key = jax.random.key(config.seed)
        # Variables are always arguments, never closed over: XLA would constant-fold
        # convolutions of constant inputs at compile time.
        forward = jax.jit(model.apply)
        logits = run_chunks(lambda x: forward(variables, x), [images], config.chunk)
        self.preds = jnp.argmax(logits, -1).astype(jnp.int32)
        self._curves = jax.jit(lambda v, x, maps, t: xm.deletion_insertion(
            model, v, x, maps, t, step=config.step,
            deletion_baseline=config.deletion_baseline,
            insertion_baseline=config.insertion_baseline, batch_size=config.batch_size))
        self.fractions = xm.curve_fractions(images.shape[1] * images.shape[2], config.step)
        r = min(config.randomization_images, len(images))
        self.rand_images, self.rand_targets = images[:r], self.preds[:r]
        fresh = jax.jit(model.init)(jax.random.fold_in(self.key, 1), images[:1])["params"]
        self.levels, self.stacked = xm.cascading_randomization(model, variables, fresh,
                                                               images.shape[1:])
        self.other = xm.random_other_classes(jax.random.fold_in(self.key, 2),
                                             self.rand_targets, model.num_classes)

    def curves(self, maps):
        """Deletion and insertion results for maps of every image, and the seconds taken."""
        c = self.config
        bar = tqdm(total=len(maps), desc="  deletion/insertion", disable=c.quiet, leave=False)
        start = time.perf_counter()
        def curves(x, m, t):
            out = self._curves(self.variables, x, m, t)
            return {k: v for k, v in out.items() if k != "fractions"}

        out = run_chunks(curves, [self.images, maps, self.preds], c.chunk, bar)
        jax.block_until_ready(out)
        bar.close()
        return {"fractions": self.fractions, **out}, time.perf_counter() - start

    def reference(self):
        """The random-map reference: AUCs of uniform random maps."""
        maps = xm.random_maps(jax.random.fold_in(self.key, 3), self.images.shape[:3])
        out, _ = self.curves(maps)
        return out

    def card(self, method):
        """Everything measured for one method, as plain values, plus arrays for figures."""
        c, model = self.config, self.model
        spec = xv.METHODS[method]
        options = xv.check_options(method, model, c.options(method), self.images.shape[1:],
                                   self.variables)
        key = jax.random.fold_in(self.key, 4)

        def explain(variables, images, targets):
            return xv.explain(method, model, variables, images, targets, key,
                              batch_size=c.batch_size, **options)

        chunk = min(c.chunk, len(self.images))
        start = time.perf_counter()
        fn = jax.jit(explain).lower(self.variables, self.images[:chunk],
                                    self.preds[:chunk]).compile()
        compile_s = time.perf_counter() - start
        bar = tqdm(total=len(self.images), desc=f"  {method}", disable=c.quiet, leave=False)
        out, seconds = _timed(lambda: run_chunks(
            lambda x, t: fn(self.variables, x, t), [self.images, self.preds], chunk, bar))
        bar.close()
        maps = out.maps
        curves, curve_s = self.curves(maps)

        r = len(self.rand_images)
        levels = jax.jit(lambda stacked, v, x, t: xm.randomization_maps(
            lambda *args: explain(*args).maps, stacked, v, x, t))
        rand_maps = levels(self.stacked, self.variables, self.rand_images, self.rand_targets)
        randomization = xm.summarize(xm.similarity(rand_maps, maps[:r]))
        other_maps = run_chunks(lambda x, t: fn(self.variables, x, t).maps,
                                [self.rand_images, self.other], chunk)
        random_logit = xm.summarize(xm.similarity(other_maps, maps[:r]), axis=None)
        forward, backward = spec.passes(options, self.images.shape[1:])
        card = {
            "method": method,
            "label": spec.label,
            "paper": spec.paper,
            "signed": spec.signed,
            "parameters": {k: (v if v is None or isinstance(v, (int, float, str)) else "array")
                           for k, v in options.items()},
            "deletion_auc": float(jnp.mean(curves["deletion_auc"])),
            "insertion_auc": float(jnp.mean(curves["insertion_auc"])),
            "deletion_auc_sem": float(jnp.std(curves["deletion_auc"]) / np.sqrt(len(maps))),
            "insertion_auc_sem": float(jnp.std(curves["insertion_auc"]) / np.sqrt(len(maps))),
            "randomization_levels": self.levels,
            "randomization": randomization,
            "random_logit": random_logit,
            "passes_per_image": {"forward": forward, "backward": backward},
            "ms_per_image": round(1000 * seconds / len(self.images), 3),
            "compile_s": round(compile_s, 2),
            "deletion_insertion_s": round(curve_s, 2),
        }
        for name, values in out.extras.items():  # e.g. IG's completeness gap
            card[name] = {"mean": float(np.mean(values)), "median": float(np.median(values)),
                          "max": float(np.max(values))}
        arrays = {"curves": curves, "example_maps": np.asarray(rand_maps[:, 0]),
                  "example_map": np.asarray(maps[0])}
        return card, arrays


def verdicts(card, reference):
    """Pass/fail of one card against the random reference and the randomisation rule."""
    cascade = float(np.mean(card["randomization"]["spearman_abs"]))
    return {"deletion_below_random": card["deletion_auc"] < reference["deletion_auc"],
            "insertion_above_random": card["insertion_auc"] > reference["insertion_auc"],
            "randomization_mean_abs_spearman": round(cascade, 4),
            "randomization": "passes" if cascade < RANDOMIZATION_PASS else "fails"}


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
        rho = card["randomization"]["spearman_abs"]
        passes = card["passes_per_image"]
        params = ", ".join(f"{k}={val}" for k, val in card["parameters"].items()) or "–"
        lines.append(
            f"| {card['method']} | {card['deletion_auc']:.3f}"
            f"{'' if v['deletion_below_random'] else ' ✗'} | {card['insertion_auc']:.3f}"
            f"{'' if v['insertion_above_random'] else ' ✗'} | {rho[0]:.2f} → {rho[-1]:.2f} "
            f"({v['randomization_mean_abs_spearman']:.2f}, {v['randomization']}) | {card['random_logit']['ssim']:.2f} | "
            f"{card['ms_per_image']:.2f} | {passes['forward']} + {passes['backward']} | "
            f"{params} |")
    if cards:
        levels = next(iter(cards.values()))["randomization_levels"]
        lines += ["", "Cascading randomisation, mean Spearman ρ of |map| (ρ of the signed map, SSIM) "
                  "with the trained model's map; each column re-initialises one more layer:",
                  "", "| method | " + " | ".join(levels) + " |",
                  "| --- |" + " --- |" * len(levels)]
        for card in cards.values():
            r = card["randomization"]
            lines.append(f"| {card['method']} | " + " | ".join(
                f"{a:.2f} ({s:.2f}, {q:.2f})" for a, s, q in
                zip(r["spearman_abs"], r["spearman_signed"], r["ssim"])) + " |")
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
        maps = [arrays[name]["example_map"]] + list(arrays[name]["example_maps"])
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
        config = dataclasses.replace(config, checkpoint=str(config.checkpoint
                                                            or default_checkpoint()))
        model, variables = load_checkpoint(config.checkpoint)
        if not config.quiet:
            print(f"evaluating {describe_checkpoint(config.checkpoint)}")
    image_shape = data.test_images.shape[1:] if data is not None else None
    skipped = {}
    if config.methods is None:  # every method that can explain this model
        skipped = {m: why for m in xv.METHODS
                   if (why := xv.unsupported(m, model, image_shape))}
        config = dataclasses.replace(config, methods=tuple(m for m in xv.METHODS
                                                           if m not in skipped))
        if skipped and not config.quiet:
            print("skipped: " + "; ".join(f"{m} ({why})" for m, why in skipped.items()))
    for method in config.methods:  # every option checked before any work
        xv.check_options(method, model, config.options(method), image_shape, variables)
    if data is None:
        data = cifar10_data.load_cifar10(config.data_dir)
    n = min(config.num_images, len(data.test_labels))
    images = jnp.asarray(data.test_images[:n], jnp.float32) / 255.0
    run = Evaluation(config, model, variables, images, jnp.asarray(data.test_labels[:n]))
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    reference = run.reference()
    report = {"num_images": n, "accuracy": float(jnp.mean(run.preds == run.labels)),
              "device": cli.describe_device(), "config": dataclasses.asdict(config),
              "random_reference": {"deletion_auc": float(jnp.mean(reference["deletion_auc"])),
                                   "insertion_auc": float(jnp.mean(reference["insertion_auc"]))},
              "methods": {}, "skipped": skipped}
    arrays = {}
    for method in tqdm(config.methods, desc="methods", disable=config.quiet):
        card, arrays[method] = run.card(method)
        card["verdicts"] = verdicts(card, report["random_reference"])
        report["methods"][method] = card
        atomic_write(out / "evaluation.json",
                      lambda f: f.write(json.dumps(report, indent=2).encode()))
        atomic_write(out / "evaluation.md", lambda f: f.write(markdown(report).encode()))
    plot_curves(out / "deletion_insertion.png", reference,
                {m: a["curves"] for m, a in arrays.items()})
    plot_randomization(out / "randomization.png", np.asarray(images[0]), run.levels,
                       report["methods"], arrays)
    return report


def parse_args(argv=None) -> EvalConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = EvalConfig()
    parser.add_argument("--checkpoint", default=None,
                        help="default: cifar10_model.pkl when it exists, else the pretrained one")
    parser.add_argument("--data-dir", default=None,
                        help="CIFAR-10 folder; default: $CIFAR10_DIR, then tfds, then download")
    parser.add_argument("--output-dir", default=defaults.output_dir,
                        help="where the files go (default: %(default)s)")
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
                       ("ig_steps", "Integrated Gradients path points"),
                       ("smoothgrad_samples", "SmoothGrad noisy samples"),
                       ("rise_masks", "RISE masks"),
                       ("occlusion_patch", "occlusion square side, px"),
                       ("occlusion_stride", "occlusion stride, px"),
                       ("seed", "seeds the random maps, SmoothGrad, RISE and the random "
                                "weights")]:
        parser.add_argument("--" + name.replace("_", "-"),
                            type=cli.int_at_least(0 if name == "seed" else 1),
                            default=getattr(defaults, name),
                            help=f"{text} (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    args = vars(parser.parse_args(argv))
    if args["occlusion_patch"] > 32:
        parser.error(f"--occlusion-patch must be at most 32, got {args['occlusion_patch']}")
    if args["methods"] is not None:
        args["methods"] = tuple(dict.fromkeys(args["methods"]))
    return EvalConfig(**args)


@cli.entry_point
def main(argv=None):
    config = parse_args(argv)
    cli.check_writable(config.output_dir, "--output-dir", folder=True)
    report = evaluate(config)
    if not config.quiet:
        print(markdown(report))
        print(f"wrote {config.output_dir}/evaluation.json, evaluation.md, "
              "deletion_insertion.png, randomization.png")


if __name__ == "__main__":
    main()
