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
import xai_lrp
import xai_metrics as xm
import xai_visualizations as xv
from checkpoints import atomic_write, default_checkpoint, describe_checkpoint, load_checkpoint
from cifar10_data import EXACT_TEST_RECORDS, map_batches

# A method passes the randomisation check when the Spearman ρ of its |maps| with the
# trained model's maps, averaged over the cascade's levels, is below this: its maps
# change once the weights are random. At or above it they mostly survive them.
RANDOMIZATION_PASS = 0.5

# Every per-image measure on a card: its label, and whether lower is better (None: a
# property of the map, not a quality, so it gets no verdict against the random map).
MEASURES = {
    "deletion_auc": ("deletion AUC, to black", True),
    "insertion_auc": ("insertion AUC, from blur", False),
    "deletion_blur": ("deletion AUC, to blur", True),
    "road_morf_auc": ("ROAD MoRF AUC", True),
    "road_lerf_auc": ("ROAD LeRF AUC", False),
    "faithfulness_correlation": ("faithfulness correlation", False),
    "infidelity": ("infidelity", True),
    "focus": ("Focus", False),
    "sparseness": ("sparseness (Gini)", None),
    "complexity": ("complexity (entropy)", None),
}
RANDOMIZATION_SETUP = (
    "each level re-initialises one more layer, from the output down, with the model's own "
    "initialisers (model.init with another key); a re-initialised layer's BatchNorm takes "
    "the fresh running statistics too (mean 0, variance 1), so the last level is the "
    "freshly initialised model; every level explains the trained model's predicted class")
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
    ig_steps: int = 64
    smoothgrad_samples: int = 50
    rise_masks: int = 4000
    occlusion_patch: int = 4
    occlusion_stride: int = 2
    lime_samples: int = 1000              # LIME's and KernelSHAP's perturbations per image
    lrp_composite: str = "epsilon_gamma_box"  # LRP's composite (xai_lrp.COMPOSITES)
    layer: Optional[str] = None           # the layer methods' layer; default: the model's
    faithfulness_subsets: int = 100       # random pixel subsets per image (Bhatt et al.)
    infidelity_perturbations: int = 50    # Gaussian perturbations per image (Yeh et al.)
    focus_mosaics: int = 100              # 2 x 2 mosaics of four classes (Focus)
    seed: int = 0
    quiet: bool = False

    def options(self, method):
        """The options of `method` that this config sets (by the options' names)."""
        given = {"layer": self.layer, "steps": self.ig_steps,
                 "n_samples": (self.lime_samples if method in ("lime", "kernel_shap")
                               else self.smoothgrad_samples),
                 "n_masks": self.rise_masks, "patch": self.occlusion_patch,
                 "stride": self.occlusion_stride, "composite": self.lrp_composite}
        return {k: v for k, v in given.items() if k in xv.METHODS[method].options}


def mosaics_for(model, variables, images, labels, key, n):
    """Focus's 2 x 2 mosaics of `n` test images of four classes: (2H, 2W) when the model
    takes them (a GAP head), else of half-size tiles. Empty when n is 0 or fewer than
    four classes are among the images."""
    labels = np.asarray(labels)
    if n == 0 or len(np.unique(labels)) < 4:
        empty = jnp.zeros((0,) + images.shape[1:], images.dtype)
        return empty, jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32)
    h, w, c = images.shape[1:]
    try:
        jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 2 * h, 2 * w, c),
                                                                    images.dtype))
        half = False
    except Exception:  # noqa: BLE001 - any failure to trace means it takes (H, W) only
        half = True
    return xm.focus_mosaics(images, labels, key, n, half_size=half)


def statistics(per_image, reference, seed=0):
    """Each measure of `MEASURES` in `per_image`: its mean with a 95 % bootstrap interval,
    and, where it has a better side, the paired Wilcoxon verdict against the random
    maps' values on the same images."""
    out = {}
    for name, (_, lower) in MEASURES.items():
        if name not in per_image:
            continue
        entry = xm.mean_interval(per_image[name], seed)
        if lower is not None and name in reference:
            entry["vs_random"] = xm.paired_verdict(per_image[name], reference[name],
                                                   lower_is_better=lower)
        out[name] = entry
    return out


def local_split():
    """The sharding that splits a batch's first axis over this process's devices (e.g.
    the GPUs of one host, or CPU devices made with XLA_FLAGS=
    --xla_force_host_platform_device_count=N), or None when it has one device."""
    devices = jax.local_devices()
    if len(devices) == 1:
        return None
    mesh = jax.sharding.Mesh(np.array(devices), ("images",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("images"))


def split_chunk(chunk: int) -> int:
    """`chunk` rounded up to a multiple of this process's device count."""
    devices = jax.local_device_count()
    return -(-chunk // devices) * devices


def run_chunks(fn, arrays, chunk, bar=None):
    """`cifar10_data.map_batches` with a progress bar, sharded over devices and processes.

    Each batch of `chunk` rows (rounded up to a multiple of the local device count) is
    split over this process's devices (`local_split`), so a jitted `fn` runs data-parallel
    on them. In a multi-process run (`xai_cli.start_distributed`) each process maps its
    own contiguous share of the rows (equal shares, the last padded with the final row)
    and every process gets all the outputs back (`process_allgather`), so every process
    holds the whole card. The per-image results are those of one device: each image's
    maps and measures never depend on its batch-mates."""
    on_batch = None if bar is None else bar.update
    split = local_split()
    place = None if split is None else (lambda batch: jax.device_put(batch, split))
    chunk = split_chunk(chunk)
    count = jax.process_count()
    if count == 1:
        return map_batches(fn, arrays, chunk, place=place, on_batch=on_batch)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    n = len(arrays[0])
    share = -(-n // count)
    rows = np.minimum(np.arange(share) + jax.process_index() * share, n - 1)
    out = map_batches(fn, [a[rows] for a in arrays], chunk, place=place, on_batch=on_batch)
    return jax.tree.map(lambda o: np.asarray(o)[:n],
                        multihost_utils.process_allgather(out, tiled=True))


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
        key = jax.random.fold_in(self.key, 5)
        self._faithfulness = jax.jit(lambda v, x, maps, t: {
            "road": xm.road(model, v, x, maps, t, key, batch_size=config.batch_size),
            "deletion_blur": xm.deletion_insertion(
                model, v, x, maps, t, step=config.step, deletion_baseline="blur",
                batch_size=config.batch_size)["deletion_auc"],
            "faithfulness_correlation": xm.faithfulness_correlation(
                model, v, x, maps, t, key, n_subsets=config.faithfulness_subsets,
                subset_size=max(1, x.shape[1] * x.shape[2] // 10),
                batch_size=config.batch_size),
            "infidelity": xm.infidelity(model, v, x, maps, t, key,
                                        n_perturbations=config.infidelity_perturbations,
                                        normalize=True, batch_size=config.batch_size),
            "sparseness": xm.sparseness(maps), "complexity": xm.complexity(maps)})
        self.mosaics, self.mosaic_targets, self.quadrants = mosaics_for(
            model, variables, images, labels, jax.random.fold_in(self.key, 6),
            config.focus_mosaics)
        r = min(config.randomization_images, len(images))
        self.rand_images, self.rand_targets = images[:r], self.preds[:r]
        # A fresh initialisation (its own BatchNorm statistics too): the cascade's last
        # level is this model.
        fresh = jax.jit(model.init)(jax.random.fold_in(self.key, 1), images[:1])
        self.fresh = {c: fresh[c] for c in variables}
        self.levels, self.stacked = xm.cascading_randomization(model, variables, self.fresh,
                                                               images.shape[1:])
        self.fresh_preds = jnp.argmax(jax.jit(model.apply)(self.fresh, self.rand_images),
                                      -1).astype(jnp.int32)
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

    def measures(self, maps):
        """ROAD, deletion to blur, faithfulness correlation, infidelity, sparseness and
        complexity of maps of every image: per-image arrays."""
        def measures(x, m, t):
            out = self._faithfulness(self.variables, x, m, t)
            road = {f"road_{k}": v for k, v in out.pop("road").items()
                    if k in ("morf_auc", "lerf_auc", "morf_correct", "lerf_correct")}
            return {**out, **road}

        bar = tqdm(total=len(maps), desc="  ROAD and the other measures",
                   disable=self.config.quiet, leave=False)
        out = run_chunks(measures, [self.images, maps, self.preds], self.config.chunk, bar)
        bar.close()
        return out

    def reference(self):
        """The random-map reference: every per-image measure of uniform random maps."""
        maps = xm.random_maps(jax.random.fold_in(self.key, 3), self.images.shape[:3])
        out, _ = self.curves(maps)
        out.update(self.measures(maps))
        if len(self.mosaics):
            out["focus"] = np.asarray(xm.focus(
                xm.random_maps(jax.random.fold_in(self.key, 7), self.mosaics.shape[:3]),
                self.quadrants))
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
        fn_any = jax.jit(explain)  # the mosaics' shape compiles its own program
        start = time.perf_counter()
        split, rows = local_split(), split_chunk(chunk)  # the batches of `run_chunks`
        fn = jax.jit(explain).lower(
            self.variables,
            jax.ShapeDtypeStruct((rows, *self.images.shape[1:]), self.images.dtype,
                                 sharding=split),
            jax.ShapeDtypeStruct((rows,), self.preds.dtype, sharding=split)).compile()
        compile_s = time.perf_counter() - start
        bar = tqdm(total=len(self.images), desc=f"  {method}", disable=c.quiet, leave=False)
        out, seconds = _timed(lambda: run_chunks(
            lambda x, t: fn(self.variables, x, t), [self.images, self.preds], chunk, bar))
        bar.close()
        maps = out.maps
        curves, curve_s = self.curves(maps)
        start = time.perf_counter()
        measures = self.measures(maps)
        if len(self.mosaics):
            mosaic_maps = run_chunks(lambda x, t: fn_any(self.variables, x, t).maps,
                                     [self.mosaics, self.mosaic_targets], chunk)
            measures["focus"] = np.asarray(xm.focus(jnp.asarray(mosaic_maps), self.quadrants))
        measures_s = time.perf_counter() - start

        r = len(self.rand_images)
        rand_maps = xm.randomization_maps(lambda *args: explain(*args).maps, self.stacked,
                                          self.rand_images, self.rand_targets)
        randomization = xm.summarize(xm.similarity(rand_maps, maps[:r]))
        # The fully fresh model on its own, for the trained model's target (the last
        # level of the cascade) and for its own prediction.
        fresh_maps = run_chunks(lambda x, t: fn(self.fresh, x, t).maps,
                                [self.rand_images, self.fresh_preds], chunk)
        fresh_model = {
            "for_the_trained_models_target": xm.summarize(
                xm.similarity(rand_maps[-1], maps[:r]), axis=None),
            "for_its_own_prediction": xm.summarize(
                xm.similarity(jnp.asarray(fresh_maps), maps[:r]), axis=None)}
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
            "randomization_setup": RANDOMIZATION_SETUP,
            "fresh_model": fresh_model,
            "random_logit": random_logit,
            "passes_per_image": {"forward": forward, "backward": backward},
            "ms_per_image": round(1000 * seconds / len(self.images), 3),
            "compile_s": round(compile_s, 2),
            "deletion_insertion_s": round(curve_s, 2),
            "measures_s": round(measures_s, 2),
        }
        for name, values in out.extras.items():  # e.g. IG's completeness gap
            card[name] = {"mean": float(np.mean(values)), "median": float(np.median(values)),
                          "max": float(np.max(values))}
        arrays = {"curves": curves, "measures": measures, "example_maps": np.asarray(rand_maps[:, 0]),
                  "example_map": np.asarray(maps[0])}
        return card, arrays


def verdicts(card):
    """Deletion and insertion against the random maps (the paired tests of the card's
    statistics: a tie is not a win), and the randomisation rule."""
    cascade = float(np.mean(card["randomization"]["spearman_abs"]))
    stats = card["statistics"]
    return {"deletion_below_random":
            stats["deletion_auc"]["vs_random"]["verdict"] == "better",
            "insertion_above_random":
            stats["insertion_auc"]["vs_random"]["verdict"] == "better",
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
        marks = {k: VERDICT_MARKS[card["statistics"][k]["vs_random"]["verdict"]]
                 for k in ("deletion_auc", "insertion_auc")}
        lines.append(
            f"| {card['method']} | {card['deletion_auc']:.3f} {marks['deletion_auc']} | "
            f"{card['insertion_auc']:.3f} {marks['insertion_auc']} | {rho[0]:.2f} → {rho[-1]:.2f} "
            f"({v['randomization_mean_abs_spearman']:.2f}, {v['randomization']}) | {card['random_logit']['ssim']:.2f} | "
            f"{card['ms_per_image']:.2f} | {passes['forward']} + {passes['backward']} | "
            f"{params} |")
    if cards:
        levels = next(iter(cards.values()))["randomization_levels"]
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
    writer = cli.is_writer()  # in a multi-process run, only process 0 writes
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    reference = run.reference()
    report = {"num_images": n, "accuracy": float(jnp.mean(run.preds == run.labels)),
              "device": cli.describe_device(), "config": dataclasses.asdict(config),
              "random_reference": {k: float(np.mean(reference[k])) for k in MEASURES
                                   if k in reference},
              "methods": {}, "skipped": skipped}
    arrays = {}
    for method in tqdm(config.methods, desc="methods", disable=config.quiet):
        card, arrays[method] = run.card(method)
        per_image = {**{k: arrays[method]["curves"][k] for k in ("deletion_auc",
                                                                  "insertion_auc")},
                     **arrays[method]["measures"]}
        card["statistics"] = statistics(per_image, reference, config.seed)
        card["verdicts"] = verdicts(card)
        report["methods"][method] = card
        if writer:
            atomic_write(out / "evaluation.json",
                         lambda f: f.write(json.dumps(report, indent=2).encode()))
            atomic_write(out / "evaluation.md", lambda f: f.write(markdown(report).encode()))
    if not writer:
        return report
    plot_curves(out / "deletion_insertion.png", reference,
                {m: a["curves"] for m, a in arrays.items()})
    plot_randomization(out / "randomization.png", np.asarray(images[0]), run.levels,
                       report["methods"], arrays)
    return report


def parse_args(argv=None) -> EvalConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = EvalConfig()
    cli.add_input_flags(parser, defaults.output_dir)
    parser.add_argument("--methods", nargs="+", default=None, choices=tuple(xv.METHODS),
                        help="default: every method that can explain the model")
    parser.add_argument("--layer", default=None,
                        help="the layer that the layer methods (Grad-CAM, Grad-CAM++, "
                             "Guided Grad-CAM) explain (default: the model's explanation "
                             "layer, e.g. conv3 for the CNN)")
    parser.add_argument("--lrp-composite", default=defaults.lrp_composite,
                        choices=xai_lrp.COMPOSITES, help="LRP's composite (default: %(default)s)")
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
                       ("lime_samples", "LIME's and KernelSHAP's perturbations per image"),
                       ("occlusion_patch", "occlusion square side, px"),
                       ("occlusion_stride", "occlusion stride, px"),
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
