"""Explains a trained CIFAR-10 CNN on test images and writes the figures to xai_results/.

    python demo_xai.py                  # cifar10_model.pkl, else pretrained/cifar10_cnn.pkl
    python demo_xai.py --checkpoint PATH --num-images 8 --seed 1 --layer conv2

It predicts the first --num-eval test records (default 1,000: the exact ones), then draws
  detailed_*.png        one image each: overlays and heatmaps (GradCAM, Grad-CAM++,
                        saliency, SmoothGrad, Integrated Gradients), each with its
                        deletion and insertion AUC on this image next to a random map's,
                        class-specific GradCAM, top-3 probabilities;
  batch_gradcam.png     --num-images images with GradCAM overlays and heatmaps;
                        (GradCAM and Grad-CAM++ explain the --layer, the model's own by default)
  misclassified.png     GradCAM for the predicted and for the true class, side by side;
  confusion_matrix.png  over every evaluated image;
  architectures.png     --num-compare images explained by Grad-CAM, saliency and
                        Integrated Gradients on every shipped network (CNN, ResNet-20, ViT).
"""

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Optional, Tuple

import jax
import numpy as np
from tqdm.auto import tqdm

import cifar10_data
import xai_cli as cli
import xai_metrics
import xai_models
from checkpoints import (default_checkpoint, describe_checkpoint, load_checkpoint,
                         pretrained_checkpoints)
from cifar10_data import CLASS_NAMES, EXACT_TEST_RECORDS
from xai_models import default_layer
from xai_visualizations import (METHODS, Explainer, GradCAM, check_options, normalize_maps,
                                options_for, overlay, unsupported)

EVIDENCE_STEP = 32  # pixels per point of the detailed figure's deletion curve to blur


def figure_methods(figure, model=None):
    """The registry's methods for one of the demo's figures ('detailed' or 'compare',
    `Method.figures`), in the registry's order; with a model, those that can explain it."""
    return tuple(m for m, spec in METHODS.items() if figure in spec.figures
                 and (model is None or not unsupported(m, model)))


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    checkpoint: Optional[str] = None       # default: cifar10_model.pkl, else pretrained/
    data_dir: Optional[str] = None         # default: $CIFAR10_DIR, then tfds, then download
    output_dir: str = "xai_results"
    num_images: int = 16                   # images in the batch grid
    num_detailed: int = 3                   # images with a detailed figure each
    num_eval: int = EXACT_TEST_RECORDS      # test records predicted for the error analysis
    num_misclassified: int = 6             # rows of the misclassification figure
    num_compare: int = 4                   # images explained on every shipped network
    # (method, option, value) over the registry's defaults
    options: Tuple[Tuple[str, str, Any], ...] = ()
    seed: int = 0                           # picks the images and seeds SmoothGrad
    layer: Optional[str] = None             # GradCAM's layer; default: the model's (conv3)
    quiet: bool = False


def predict(model, variables, images, batch_size=250, quiet=False):
    """Softmax probabilities (N, 10) for uint8 images (`xai_models.predict`), with a
    progress bar unless `quiet`."""
    with tqdm(total=len(images), desc="predict", disable=quiet, leave=False) as bar:
        return xai_models.predict(model, variables, images, batch_size=batch_size,
                                  on_batch=bar.update)


def _label(i):
    return CLASS_NAMES[int(i)]


def _show(ax, image, title=None, **kwargs):
    ax.imshow(image, **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _heatmap(fig, ax, heatmap, title, **kwargs):
    _show(ax, heatmap, title, cmap="jet", **kwargs)
    fig.colorbar(ax.images[-1], ax=ax, fraction=0.046, pad=0.04)


def plot_detailed(plt, path, image, label, probs, maps, class_maps, class_targets, evidence):
    """Original, an overlay and a heatmap per method with its evidence on this image
    (`xai_metrics.evidence`, as the explorer shows it), top-3 bars and class-specific
    GradCAM.

    `evidence` maps each method name, and 'random', to its `xai_metrics.Evidence` on
    this image; ✗ marks a measure where the map does worse than the random map.
    """
    pred = int(np.argmax(probs))
    fig, axes = plt.subplots(3, len(maps) + 1, figsize=(3.2 * (len(maps) + 1), 10))
    mark = "correct" if pred == label else "WRONG"
    _show(axes[0, 0], image, f"original\ntrue: {_label(label)}, pred: {_label(pred)} "
          f"({probs[pred]:.2f}, {mark})")
    random = evidence["random"]
    short = {"road_morf": "MoRF", "road_lerf": "LeRF", "deletion_blur": "del. blur"}
    for k, (name, heatmap) in enumerate(maps.items(), 1):
        worse = xai_metrics.evidence_verdicts(evidence[name], random)
        scores = ", ".join(f"{short[m]} {float(getattr(evidence[name], m)):.2f}"
                           f"{' ✗' if worse[m] else ''}" for m in xai_metrics.EVIDENCE)
        _show(axes[0, k], overlay(image, heatmap), f"{name} overlay")
        _heatmap(fig, axes[1, k], heatmap, f"{name} heatmap\n{scores}", vmin=0, vmax=1)
    for ax in axes[2, len(class_maps):]:
        ax.axis("off")
    axes[2, -1].text(0, 0.5, f"Evidence on this image, for the\nprobability of "
                     f"{_label(pred)}: ROAD AUC\nwith the most (MoRF, ↓ better) or\nleast "
                     f"(LeRF, ↑ better) relevant\npixels imputed; deletion AUC to\na blur "
                     f"(↓ better), {EVIDENCE_STEP} px per step.\nA random map scores MoRF "
                     f"{float(random.road_morf):.2f},\nLeRF {float(random.road_lerf):.2f}, "
                     f"del. blur {float(random.deletion_blur):.2f};\n✗ marks a map that does "
                     "worse.", fontsize=8, va="center")
    top3 = np.argsort(probs)[::-1][:3]
    axes[1, 0].barh([_label(c) for c in top3][::-1], probs[top3][::-1], color="tab:blue")
    axes[1, 0].set(xlim=(0, 1), title="top-3 probabilities")
    for k, c in enumerate(top3):
        axes[1, 0].text(min(probs[c], 0.75) + 0.02, 2 - k, f"{probs[c]:.3f}", va="center")
    # Raw maps on one colour scale, so that the classes' evidence can be compared.
    vmax = max(float(class_maps.max()), 1e-12)
    for k, (c, heatmap) in enumerate(zip(class_targets, class_maps)):
        rank = int(np.sum(probs > probs[c])) + 1
        roles = [f"top-{rank}"] if rank <= 4 else []
        role = ", ".join(roles + (["true class"] if c == label else []))
        _heatmap(fig, axes[2, k], heatmap, f"GradCAM for {_label(c)} ({role})\n"
                 f"p={probs[c]:.3f}, raw, shared scale", vmin=0, vmax=vmax)
    fig.suptitle(f"{Path(path).stem}: true {_label(label)}, predicted {_label(pred)}")
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_batch(plt, path, images, labels, preds, heatmaps, per_band=8, layer="conv3"):
    """Bands of three rows: original with its label, GradCAM overlay, heatmap."""
    bands = -(-len(images) // per_band)
    fig, axes = plt.subplots(3 * bands, per_band, figsize=(1.6 * per_band, 5.2 * bands),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, label, pred, heatmap) in enumerate(zip(images, labels, preds, heatmaps)):
        row, col = 3 * (i // per_band), i % per_band
        ok = pred == label
        _show(axes[row, col], image, f"true: {_label(label)}")
        _show(axes[row + 1, col], overlay(image, heatmap),
              f"{'✓' if ok else '✗'} pred: {_label(pred)}")
        axes[row + 1, col].title.set_color("green" if ok else "red")
        _show(axes[row + 2, col], heatmap, "GradCAM", cmap="jet", vmin=0, vmax=1)
    fig.suptitle(f"GradCAM ({layer}) on {len(images)} test images: "
                 f"{int(np.sum(preds == labels))} correct")
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_misclassified(plt, path, images, labels, probs, pred_maps, true_maps, pool_size):
    """Per row: the image, GradCAM for the predicted class, GradCAM for the true class."""
    rows = max(len(images), 1)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.6 * rows), squeeze=False)
    if not len(images):
        for ax in axes.flat:
            ax.axis("off")
        axes[0, 1].text(0.5, 0.5, f"no misclassified images\namong {pool_size}",
                        ha="center", va="center")
    for row, (image, label, p, pred_map, true_map) in enumerate(
            zip(images, labels, probs, pred_maps, true_maps)):
        pred = int(np.argmax(p))
        _show(axes[row, 0], image, f"true {_label(label)}, predicted {_label(pred)}")
        _show(axes[row, 1], overlay(image, pred_map),
              f"GradCAM predicted: {_label(pred)} (p={p[pred]:.2f})")
        _show(axes[row, 2], overlay(image, true_map),
              f"GradCAM true: {_label(label)} (p={p[label]:.2f})")
    fig.suptitle(f"Misclassified test images ({len(images)} shown)")
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_confusion(plt, path, labels, preds):
    """Counts of (true, predicted) pairs, with the accuracy in the title."""
    counts = np.zeros((len(CLASS_NAMES),) * 2, int)
    np.add.at(counts, (labels, preds), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set(xlabel="predicted", ylabel="true")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, n, ha="center", va="center", fontsize=7,
                color="white" if n > counts.max() / 2 else "black")
    ax.set_title(f"Confusion matrix, {len(labels)} test images, accuracy "
                 f"{np.mean(labels == preds):.1%}")
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle
    fig.savefig(path, dpi=80)
    plt.close(fig)


def explain_architectures(networks, images, methods, options=None):
    """{name: (preds (N,), {method: normalised maps (N, H, W)})}: the same images
    explained by the same methods on each network of `networks` ({name: (model,
    variables)}); signed maps by their magnitude."""
    out = {}
    for name, (model, variables) in networks.items():
        maps, preds = {}, None
        for method in methods:
            explainer = Explainer(model, method, **(options or {}).get(method, {}))
            raw, preds, _ = explainer.explain(variables["params"], variables.get("batch_stats"),
                                              images, normalize=False)
            raw = np.abs(raw) if METHODS[method].signed else raw
            maps[method] = np.asarray(normalize_maps(raw))
        out[name] = (np.asarray(preds), maps)
    return out


def plot_architectures(plt, path, images, labels, explained, methods):
    """Per image, one row per network: the image with that network's prediction, then
    each method's overlay."""
    rows = [(i, name) for i in range(len(images)) for name in explained]
    fig, axes = plt.subplots(len(rows), len(methods) + 1,
                             figsize=(1.9 * (len(methods) + 1), 2.0 * len(rows)), squeeze=False)
    for row, (i, name) in enumerate(rows):
        preds, maps = explained[name]
        ok = preds[i] == labels[i]
        _show(axes[row, 0], images[i], f"{name}: {_label(preds[i])} {'✓' if ok else '✗'}")
        axes[row, 0].title.set_color("green" if ok else "red")
        for col, method in enumerate(methods, 1):
            _show(axes[row, col], overlay(images[i], maps[method][i]),
                  METHODS[method].label if row == 0 else None)
    fig.suptitle("The same test images, explained by the same methods on each network "
                 f"(true classes: {', '.join(_label(y) for y in labels)})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def method_options(config: DemoConfig, method):
    """The options of `method` that the demo's config sets."""
    return options_for(method, config.options, layer=config.layer)


def run_demo(config: DemoConfig, model, variables, data: cifar10_data.Cifar10):
    """Writes every figure into `config.output_dir`; returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params, batch_stats = variables["params"], variables.get("batch_stats")
    n_eval = min(config.num_eval, len(data.test_images))
    test_u8, labels = data.test_images[:n_eval], data.test_labels[:n_eval]
    probs = predict(model, variables, test_u8, quiet=config.quiet)
    preds = probs.argmax(axis=1)

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    gradcam = GradCAM(model, target_layer=config.layer)
    explainers = {method: Explainer(model, method, **method_options(config, method))
                  for method in figure_methods("detailed", model)}
    evidence_fn = jax.jit(lambda v, x, m, t: xai_metrics.evidence(
        model, v, x, m, t, jax.random.key(config.seed), step=EVIDENCE_STEP))
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.choice(n_eval, size=min(config.num_images, n_eval), replace=False))
    images = test_u8[chosen] / np.float32(255)
    written = []

    detailed = chosen[:config.num_detailed]
    for k, i in enumerate(tqdm(detailed, desc="detailed", disable=config.quiet,
                               leave=False)):
        image, label = images[k], int(labels[i])
        maps, raws = {}, []
        for method, explainer in explainers.items():
            raw = explainer.explain(params, batch_stats, image, seed=config.seed,
                                    normalize=False)[0]
            spec = METHODS[method]  # signed maps are shown by magnitude
            maps[f"|{spec.label}|" if spec.signed else spec.label] = np.asarray(
                normalize_maps(np.abs(raw) if spec.signed else raw))
            raws.append(np.asarray(raw))
        random_map = np.random.default_rng((config.seed, k)).uniform(
            size=image.shape[:2]).astype(np.float32)
        # The evidence ranks the raw maps (signed ones by their sign), as the explorer does.
        stack = np.stack(raws + [random_map])
        found = evidence_fn(variables, np.repeat(image[None], len(stack), 0), stack,
                            np.full(len(stack), -1, np.int32))
        found = xai_metrics.Evidence(*(np.asarray(v) for v in found))  # one transfer
        evidence = {name: xai_metrics.Evidence(*(v[j] for v in found))
                    for j, name in enumerate(list(maps) + ["random"])}
        # The top-3 and the true class; the top-4th when the true class is in the top-3,
        # so that every call has the same shape and compiles once.
        ranked = list(np.argsort(probs[i])[::-1])
        targets = ranked[:3] + ([ranked[3]] if label in ranked[:3] else [label])
        class_maps = gradcam.compute_gradcam(params, batch_stats,
                                             np.repeat(image[None], len(targets), 0),
                                             np.asarray(targets), normalize=False)[0]
        path = out / f"detailed_{k + 1}_test{i}.png"
        plot_detailed(plt, path, image, label, probs[i], maps, class_maps, targets, evidence)
        written.append(path)

    heatmaps = gradcam.compute_gradcam(params, batch_stats, images)[0]
    written.append(out / "batch_gradcam.png")
    plot_batch(plt, written[-1], images, labels[chosen], preds[chosen], heatmaps,
               layer=config.layer or default_layer(model))

    wrong = np.flatnonzero(preds != labels)
    wrong = np.sort(rng.permutation(wrong)[:config.num_misclassified])
    wrong_images = test_u8[wrong] / np.float32(255)
    pred_maps = true_maps = np.zeros((0,) + images.shape[1:3])
    if len(wrong):
        pred_maps = gradcam.compute_gradcam(params, batch_stats, wrong_images)[0]
        true_maps = gradcam.compute_gradcam(params, batch_stats, wrong_images,
                                            labels[wrong])[0]
    written.append(out / "misclassified.png")
    plot_misclassified(plt, written[-1], wrong_images, labels[wrong], probs[wrong],
                       pred_maps, true_maps, n_eval)

    written.append(out / "confusion_matrix.png")
    plot_confusion(plt, written[-1], labels, preds)

    shipped = pretrained_checkpoints()
    if config.num_compare and len(shipped) > 1:
        networks = {name: load_checkpoint(path) for name, path in shipped.items()}
        compare = images[:config.num_compare]
        methods = tuple(m for m in figure_methods("compare")
                        if all(not unsupported(m, net) for net, _ in networks.values()))
        explained = explain_architectures(
            networks, compare, methods,
            {m: method_options(dataclasses.replace(config, layer=None), m) for m in methods})
        written.append(out / "architectures.png")
        plot_architectures(plt, written[-1], compare, labels[chosen][:config.num_compare],
                           explained, methods)
    if not config.quiet:
        print(f"accuracy {np.mean(preds == labels):.1%} on the first {n_eval} test records")
    return written


def parse_args(argv=None) -> DemoConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = DemoConfig()
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint written by train_cifar10.py (default: "
                             "cifar10_model.pkl when it exists, else the pretrained one)")
    parser.add_argument("--data-dir", default=None,
                        help="CIFAR-10 folder; default: $CIFAR10_DIR, then tfds, then download")
    parser.add_argument("--output-dir", default=defaults.output_dir,
                        help="where the figures go (default: %(default)s)")
    parser.add_argument("--layer", default=None,
                        help="the layer that GradCAM and Grad-CAM++ explain (default: the "
                             "model's explanation layer, e.g. conv3 for the CNN)")
    for name, low, text in [("num_images", 1, "test images in the batch grid"),
                            ("num_detailed", 0, "images with a detailed figure each"),
                            ("num_eval", 1, "first test records predicted for the error "
                                            "analysis"),
                            ("num_misclassified", 0, "rows of the misclassification figure"),
                            ("num_compare", 0, "images explained on every shipped network "
                                               "(architectures.png; 0: none)"),
                            ("seed", 0, "picks the images and seeds SmoothGrad, LIME and "
                                        "KernelSHAP")]:
        parser.add_argument("--" + name.replace("_", "-"), type=cli.int_at_least(low),
                            default=getattr(defaults, name),
                            help=f"{text} (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    cli.add_method_flags(parser, METHODS)
    namespace = parser.parse_args(argv)
    options = cli.method_options(parser, namespace, METHODS)
    return DemoConfig(**{k: v for k, v in vars(namespace).items() if ":" not in k},
                      options=options)


@cli.entry_point
def main(argv=None):
    config = parse_args(argv)
    cli.check_writable(config.output_dir, "--output-dir", folder=True)
    checkpoint = config.checkpoint or default_checkpoint()
    model, variables = load_checkpoint(checkpoint)
    check_options("gradcam", model, {"layer": config.layer}, variables=variables,
                  layer_name="--layer")  # an unknown layer stops here, before any work
    if not config.quiet:
        print(f"explaining {describe_checkpoint(checkpoint)}")
    data = cifar10_data.load_cifar10(config.data_dir)
    written = run_demo(config, model, variables, data)
    if not config.quiet:
        print("wrote:\n" + "\n".join(f"  {path}" for path in written))


if __name__ == "__main__":
    main()
