"""Compression card of a checkpoint: what each quantised or pruned variant costs in size,
speed and accuracy, and whether its explanations survive.

    python compress_xai.py --checkpoint pretrained/cifar10_cnn.pkl
    python compress_xai.py --variants int8 filters --parts size accuracy speed
    python compress_xai.py --parts survival --methods gradcam saliency --num-images 50

Variants (`xai_compression`): 'int8' (Qwix, weights and activations, activations
calibrated on training images), 'int8_weights' and 'int4_weights' (weights only),
'bf16' (every weight rounded to bfloat16), 'int4_weights_qat' (int4 weights after
quantisation-aware fine-tuning), 'sparse50', 'sparse70' and 'sparse90' (global magnitude
pruning at that sparsity, then fine-tuned with the masks kept), and 'filters' (structured pruning of --filter-fraction
of every conv's filters, a really narrower network, then fine-tuned). Each variant is
saved as a checkpoint (`<output-dir>/variants/<name>.pkl`) that `load_checkpoint` reads.

Parts, each rewriting compression.json and compression.md as it finishes (a later run of
some parts into the same --output-dir keeps the others, for the same checkpoint and
variants):
- size: stored weight bytes, parameters, sparsity and FLOPs;
- accuracy: on the first 1,000 test records and on all, and the share of predictions
  that agree with the original's;
- speed: CPU latency at batch 1 and throughput at batch 256, as ratios to the original
  timed side by side in this run;
- survival: for every method that explains both, per image the Spearman ρ of |map| and
  the top-k intersection between the original's and the variant's maps for the original's
  predicted class, with bootstrap intervals, and a figure (survival.png);
- faithfulness: each variant's own ROAD MoRF and LeRF AUCs, paired against the
  original's on the same images (Wilcoxon), and its cascading-randomisation ρ beside the
  original's.
"""

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import cifar10_data
import train_cifar10 as tc
import xai_cards
import xai_cli as cli
import xai_compression as xc
import xai_metrics as xm
import xai_visualizations as xv
from architectures import registry_name
from checkpoints import compression_record, load_checkpoint, save_checkpoint, shown
from cifar10_data import EXACT_TEST_RECORDS
from evaluate_xai import EvalConfig
from xai_io import atomic_write, file_sha256

QUANTIZED = xc.QUANTIZATIONS  # 'int8', 'int8_weights', 'int4_weights', 'bf16'
# quantisation-aware fine-tuning (Qwix's fake quantisation, straight-through gradients)
# of the float weights, then the same quantisation; for weight-only schemes, whose
# training steps need no activation statistics
QAT = {"int4_weights_qat": "int4_weights"}
SPARSE = {"sparse50": 0.5, "sparse70": 0.7, "sparse90": 0.9}
VARIANTS = QUANTIZED + tuple(QAT) + tuple(SPARSE) + ("filters",)
PARTS = ("size", "accuracy", "speed", "survival", "faithfulness")
VERDICT_MARKS = {"better": "✓", "worse": "✗", "tie": "="}


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    checkpoint: Optional[str] = None      # default: cifar10_model.pkl, else pretrained/
    data_dir: Optional[str] = None        # default: $CIFAR10_DIR, then tfds, then download
    output_dir: str = "xai_results/compression"
    variants: Tuple[str, ...] = VARIANTS
    parts: Tuple[str, ...] = PARTS
    methods: Optional[Tuple[str, ...]] = None  # default: every method that fits
    num_images: int = 50                  # first test records explained
    calibration_images: int = 1024        # first training images calibrating int8
    finetune_epochs: int = 1              # after pruning
    finetune_lr: float = 0.01             # peak, warmup and cosine as in training
    finetune_images: Optional[int] = None  # first training images; default all
    finetune_batch_size: int = 128
    variants_from: Optional[str] = None   # a folder of variants saved by an earlier run
    filter_fraction: float = 0.3          # of every conv's filters, for 'filters'
    filter_criterion: str = "l1"          # or 'bn_scale'
    top_k: int = 100                      # pixels in the top-k intersection
    timing_repeats: int = 20              # timed calls per model and batch size
    step: int = 64                        # pixels per ROAD curve point
    seed: int = 0
    quiet: bool = False


# ---------------------------------------------------------------- variants


def build_variant(name, model, variables, data, config: CompressConfig):
    """(model, variables, record) of one variant of the original."""
    if name in QUANTIZED:
        calibration = jnp.asarray(data.train_images[:config.calibration_images],
                                  jnp.float32) / 255.0
        qmodel, qvariables = xc.quantize(model, variables, name, calibration,
                                         quiet=config.quiet)
        return qmodel, qvariables, xc.record(qmodel)
    tune = tc.TrainConfig(model=registry_name(model), epochs=max(config.finetune_epochs, 1),
                          lr=config.finetune_lr, batch_size=config.finetune_batch_size,
                          seed=config.seed, quiet=config.quiet)
    images = data.train_images[:config.finetune_images]
    labels = data.train_labels[:config.finetune_images]
    if name in QAT:
        scheme = QAT[name]
        tuned = tc.fine_tune(xc.quantized_model(model, scheme), variables, images, labels,
                             tune, desc=name) if config.finetune_epochs else variables
        qmodel, qvariables = xc.quantize(model, tuned, scheme)
        record = {**xc.record(qmodel), "quantization_aware_epochs": config.finetune_epochs,
                  **_tuned_on(config)}
        type(qmodel).compression = record
        return qmodel, qvariables, record
    if name in SPARSE:
        masks = xc.magnitude_masks(variables["params"], SPARSE[name])
        pruned = xc.prune(variables, masks)
        if config.finetune_epochs:
            pruned = tc.fine_tune(model, pruned, images, labels, tune,
                                  keep=xc.keep_pruned(masks), desc=name)
        return model, pruned, {"pruning": "magnitude", "sparsity": SPARSE[name],
                               "finetune_epochs": config.finetune_epochs, **_tuned_on(config)}
    narrow, pruned = xc.prune_filters(model, variables, config.filter_fraction,
                                      config.filter_criterion)
    if config.finetune_epochs:
        pruned = tc.fine_tune(narrow, pruned, images, labels, tune, desc=name)
    return narrow, pruned, {"pruning": "filters", "fraction": config.filter_fraction,
                            "criterion": config.filter_criterion,
                            "finetune_epochs": config.finetune_epochs, **_tuned_on(config)}


def earlier_parts(path, config, report) -> dict:
    """{variant: {part: result}} for the parts this run does not redo, from the card
    already at `path` when it is of the same checkpoint and the variant has the same
    record, so that parts can run one at a time (the expensive ones on their own)."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if earlier.get("checkpoint") != report["checkpoint"]:
        return {}
    return {name: {part: row[part] for part in PARTS
                   if part in row and part not in config.parts}
            for name, row in earlier.get("variants", {}).items()
            if name in report["variants"] and row.get("record") == report["variants"][name][
                "record"]}


def _tuned_on(config):
    """Where the fine-tuning ran, for the record (a variant may be tuned on a GPU and
    measured on this CPU, through --variants-from)."""
    return {"finetune_device": cli.describe_device()} if config.finetune_epochs else {}


def _matches(name, record):
    if name in QUANTIZED:
        return record.get("quantization") == name
    if name in QAT:
        return (record.get("quantization") == QAT[name]
                and "quantization_aware_epochs" in record)
    if name in SPARSE:
        return record.get("pruning") == "magnitude" and record.get("sparsity") == SPARSE[name]
    return record.get("pruning") == "filters"


def load_variant(path, name):
    """(model, variables, record) of the variant `name` that an earlier run saved at
    `path` (its `variants/<name>.pkl`), checked to be that variant."""
    model, variables = load_checkpoint(path)
    record = compression_record(path) or {}
    if not _matches(name, record):
        raise ValueError(f"--variants-from: {str(path)!r} is not the variant {name!r}: it "
                         f"records {record or 'no compression'}")
    return model, variables, record


def _variant(name, model, variables, data, config):
    """A saved variant from --variants-from where it has one, else a new one."""
    saved = Path(config.variants_from or "") / f"{name}.pkl"
    if config.variants_from and saved.is_file():
        return load_variant(saved, name)
    return build_variant(name, model, variables, data, config)


def _logits(model, variables, images, batch_size=500):
    fn = jax.jit(lambda v, x: model.apply(v, x))
    return np.concatenate([np.asarray(fn(variables, jnp.asarray(images[i:i + batch_size],
                                                                 jnp.float32) / 255.0))
                           for i in range(0, len(images), batch_size)])


# ---------------------------------------------------------------- parts


def size_part(model, variables, record):
    """Stored weight bytes, parameters (and nonzero ones), sparsity and FLOPs."""
    scheme = (record or {}).get("quantization")
    stored = xc.stored_params(model, variables) if scheme else jax.tree.map(
        np.asarray, variables["params"])
    leaves = jax.tree.leaves(variables["params"])
    return {"weight_bytes": xc.weight_bytes(stored, scheme),
            "parameters": int(sum(np.size(v) for v in leaves)),
            "nonzero_parameters": int(sum(np.count_nonzero(np.asarray(v)) for v in leaves)),
            "sparsity": xc.sparsity_of(variables["params"]),
            "flops": xc.flops(model, variables)}


def accuracy_part(logits, reference_logits, labels):
    preds, reference = logits.argmax(-1), reference_logits.argmax(-1)
    n = min(EXACT_TEST_RECORDS, len(labels))
    return {"accuracy_first1000": float(np.mean(preds[:n] == labels[:n])),
            "accuracy": float(np.mean(preds == labels)),
            "agreement": float(np.mean(preds == reference))}


def _time(fn, variables, x, repeats):
    jax.block_until_ready(fn(variables, x))  # compiled and warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(variables, x))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def speed_part(models, images, repeats):
    """{name: {'latency_ms', 'throughput', 'latency_ratio', 'throughput_ratio'}} for
    `models` {name: (model, variables)}, the first being the original; the models are
    timed in turns, so that a change of the machine's load touches them all."""
    batches = {1: jnp.asarray(images[:1], jnp.float32) / 255.0,
               256: jnp.asarray(np.resize(images, (256,) + images.shape[1:]),
                                jnp.float32) / 255.0}
    fns = {name: jax.jit(lambda v, x, m=m: m.apply(v, x)) for name, (m, _) in models.items()}
    # on the device, every model alike: a checkpoint loads as numpy arrays, which a call
    # would copy to the device each time (7.5 MB for the CNN: half its batch-1 latency)
    models = {name: (m, jax.device_put(v)) for name, (m, v) in models.items()}
    seconds = {name: {b: [] for b in batches} for name in models}
    for _ in range(3):
        for name, (_, v) in models.items():
            for b, x in batches.items():
                seconds[name][b].append(_time(fns[name], v, x, max(1, repeats // 3)))
    out, original = {}, next(iter(models))
    for name in models:
        latency = float(np.median(seconds[name][1]))
        throughput = 256 / float(np.median(seconds[name][256]))
        out[name] = {"latency_ms": 1000 * latency, "throughput": throughput}
    for name in models:
        out[name]["latency_ratio"] = out[name]["latency_ms"] / out[original]["latency_ms"]
        out[name]["throughput_ratio"] = out[name]["throughput"] / out[original]["throughput"]
    return out


def method_list(config, model, variants):
    """The methods asked for (default: all) that can explain the original and every
    variant; and {method: why} for those asked that cannot."""
    skipped = {}
    for m in xv.METHODS:
        for candidate in [model] + [v[0] for v in variants.values()]:
            why = xv.unsupported(m, candidate)
            if why:
                skipped[m] = why
                break
    asked = config.methods or tuple(xv.METHODS)
    return (tuple(m for m in asked if m not in skipped),
            {m: w for m, w in skipped.items() if m in asked})


def explained(method, model, variables, images, targets, seed):
    """`method`'s maps of `images` for `targets`, with the registry's default options."""
    options = xv.check_options(method, model, {}, images.shape[1:], variables)
    key = jax.random.key(seed)
    fn = jax.jit(lambda v, x, t: xv.explain(method, model, v, x, t, key, **options).maps)
    return np.asarray(fn(variables, images, targets))


def survival_part(maps, reference, config):
    """Per-image survival of a variant's `maps` against the original's, with 95 %
    bootstrap intervals."""
    found = xm.map_survival(jnp.asarray(maps), jnp.asarray(reference), k=config.top_k)
    return {name: xm.mean_interval(np.asarray(v), config.seed) for name, v in found.items()}


def faithfulness_part(cards, config):
    """ROAD per image of the original and the variant, paired; randomisation side by
    side. `cards` is {'original': Card, 'variant': Card} from `xai_cards.card`."""
    out = {}
    for measure, lower in (("road_morf_auc", True), ("road_lerf_auc", False)):
        original = np.asarray(cards["original"].measures[measure])
        variant = np.asarray(cards["variant"].measures[measure])
        out[measure] = {"original": xm.mean_interval(original, config.seed),
                        "variant": xm.mean_interval(variant, config.seed),
                        "variant_vs_original": xm.paired_verdict(variant, original,
                                                                 lower_is_better=lower)}
    for side, c in cards.items():
        r = c.summary["randomization"]
        out[f"randomization_{side}"] = (float(np.mean(r["spearman_abs"])) if r else None)
    return out


# ---------------------------------------------------------------- the card


def markdown(report):
    lines = [f"Compression card of `{report['checkpoint']}`; {report['device']}; explanations "
             f"on the first {report['num_images']} test records, each for the original's "
             "predicted class."]
    rows = report["variants"]
    base = rows["original"]
    lines += _table(rows, "size", ("how", "weight bytes", "× smaller", "parameters",
                                   "sparsity", "FLOPs", "× fewer"), lambda r, s: (
        _how(r["record"]), f"{s['weight_bytes']:,}",
        f"{base['size']['weight_bytes'] / s['weight_bytes']:.2f}", f"{s['parameters']:,}",
        f"{s['sparsity']:.1%}", f"{s['flops']:,.0f}", f"{base['size']['flops'] / s['flops']:.2f}"))
    lines += _table(rows, "accuracy", ("test, first 1,000", "test, all",
                                       "agrees with the original"), lambda r, a: (
        f"{a['accuracy_first1000']:.1%}", f"{a['accuracy']:.1%}", f"{a['agreement']:.1%}"))
    lines += _table(rows, "speed", ("latency, batch 1", "× original", "throughput, batch 256",
                                    "× original"), lambda r, s: (
        f"{s['latency_ms']:.2f} ms", f"{s['latency_ratio']:.2f}", f"{s['throughput']:.0f} img/s",
        f"{s['throughput_ratio']:.2f}"))
    if any("survival" in r for r in rows.values()):
        lines += ["", f"Survival: mean [95 % interval] over images of the Spearman ρ of |map| "
                  f"and of the top-{report['config']['top_k']} intersection, variant against "
                  "original.", "", "| variant | method | ρ | top-k |", "| --- | --- | --- | --- |"]
        for name, r in rows.items():
            for method, s in (r.get("survival") or {}).items():
                lines.append(f"| {name} | {method} | {_interval(s['spearman'])} | "
                             f"{_interval(s['top_k'])} |")
    if any("faithfulness" in r for r in rows.values()):
        lines += ["", "Faithfulness: ROAD AUCs (MoRF ↓, LeRF ↑) of the original and the "
                  "variant on the same images, the variant marked ✓ better, ✗ worse or = a "
                  "tie (paired Wilcoxon, p < 0.05); mean randomisation ρ (below 0.5 passes).",
                  "", "| variant | method | MoRF original | MoRF variant | LeRF original | "
                  "LeRF variant | randomisation ρ, original → variant |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in rows.items():
            for method, f in (r.get("faithfulness") or {}).items():
                cells = []
                for m in ("road_morf_auc", "road_lerf_auc"):
                    mark = VERDICT_MARKS[f[m]["variant_vs_original"]["verdict"]]
                    cells += [f"{f[m]['original']['mean']:.3f}",
                              f"{f[m]['variant']['mean']:.3f} {mark}"]
                rho = [f[f"randomization_{s}"] for s in ("original", "variant")]
                lines.append(f"| {name} | {method} | " + " | ".join(cells) + " | " + (
                    f"{rho[0]:.2f} → {rho[1]:.2f}" if None not in rho else "–") + " |")
    if report.get("skipped"):
        lines += ["", "Methods left out, since they cannot explain every model here: "
                  + "; ".join(f"{m} ({why})" for m, why in report["skipped"].items()) + "."]
    return "\n".join(lines) + "\n"


def variant_report(report, name):
    """One variant's report, as its checkpoint's JSON: how it was made, from what, by
    which command on which machine, and what the card measured of it; `metrics` holds
    the test accuracies under the names training reports use."""
    row = report["variants"][name]
    accuracy = row.get("accuracy") or {}
    return {"compressed_from": report["checkpoint"], "command": report.get("command"),
            "device": report["device"], "compression": row["record"],
            "metrics": {"compressed_from": report["checkpoint"],
                        **({"test_accuracy_first1000": accuracy["accuracy_first1000"],
                            "test_accuracy": accuracy["accuracy"],
                            "agreement_with_original": accuracy["agreement"]}
                           if accuracy else {})},
            **{part: row[part] for part in PARTS if part in row},
            "original": {part: report["variants"]["original"][part]
                         for part in ("size", "accuracy", "speed")
                         if part in report["variants"]["original"]}}


def _table(rows, part, columns, cells):
    """A Markdown table of one part, a row per variant that has it: `cells(row, part's
    values)` gives the cells after the variant's name. No rows: no table."""
    body = [f"| {name} | " + " | ".join(cells(r, r[part])) + " |"
            for name, r in rows.items() if part in r]
    if not body:
        return []
    return ["", "| variant | " + " | ".join(columns) + " |",
            "| --- |" + " --- |" * len(columns), *body]


def _how(record):
    if not record:
        return "float32"
    if "quantization" in record:
        qat = record.get("quantization_aware_epochs")
        how = ("bfloat16" if record["quantization"] == xc.BF16
               else f"Qwix {record['quantization']}")
        return how + (f", {qat} ep. QAT" if qat else "") + _where(record)
    if record["pruning"] == "magnitude":
        return (f"magnitude {record['sparsity']:.0%}, {record['finetune_epochs']} ep."
                f"{_where(record)}")
    return (f"filters −{record['fraction']:.0%} ({record['criterion']}), "
            f"{record['finetune_epochs']} ep.{_where(record)}")


def _where(record):
    """' on GPU' for a variant fine-tuned on one."""
    return " on GPU" if record.get("finetune_device", "").startswith("gpu") else ""


def _interval(s):
    return f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def plot_survival(path, images, maps, num_images=2):
    """For each of the first `num_images` images, one row per method: the image, the
    original's map, then each variant's (|map|, each scaled to its own maximum).
    `maps`: {(variant, method): {'original', 'variant'}}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for _, m in maps))
    variants = list(dict.fromkeys(v for v, _ in maps))
    rows = [(i, m) for i in range(min(num_images, len(images))) for m in methods]
    fig, axes = plt.subplots(len(rows), len(variants) + 2, squeeze=False,
                             figsize=(1.1 * (len(variants) + 2), 1.15 * len(rows)))
    for r, (i, method) in enumerate(rows):
        axes[r, 0].imshow(images[i])
        axes[r, 0].set_ylabel(method, fontsize=6)
        shown = [next(v["original"] for (_, m), v in maps.items() if m == method)]
        shown += [maps[(v, method)]["variant"] if (v, method) in maps else None
                  for v in variants]
        for c, source in enumerate(shown, 1):
            if source is not None:
                cell = np.abs(source[i])
                axes[r, c].imshow(cell / (cell.max() + 1e-12), cmap="jet")
            if r == 0:
                axes[r, c].set_title((["original"] + variants)[c - 1], fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


def compress(config: CompressConfig, model=None, variables=None, data=None):
    """Builds the variants, runs the parts and writes the card; returns the report."""
    if model is None:
        config, model, variables = cli.load_card_checkpoint(config, "compressing")
    if "filters" in config.variants:  # checked before any work
        xc.prune_filters(model, variables, config.filter_fraction, config.filter_criterion)
    if data is None:
        data = cifar10_data.load_cifar10(config.data_dir)
    out = Path(config.output_dir)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    origin = {"checkpoint": shown(config.checkpoint), "sha256": file_sha256(config.checkpoint)}
    variants = {}  # each recording its original, so that the explorer pairs them
    for name in tqdm(config.variants, desc="variants", disable=config.quiet):
        m, v, r = _variant(name, model, variables, data, config)
        variants[name] = (m, v, {**r, "original": origin})
    everything = {"original": (model, variables, None), **variants}
    report = {"checkpoint": str(config.checkpoint), "device": cli.describe_device(),
              "command": "python " + " ".join(map(shlex.quote, sys.argv)) if sys.argv[0].endswith(
                  "compress_xai.py") else None,
              "num_images": min(config.num_images, len(data.test_labels)),
              "config": dataclasses.asdict(config),
              "variants": {name: {"record": r} for name, (_, _, r) in everything.items()}}
    for name, parts in earlier_parts(out / "compression.json", config, report).items():
        report["variants"][name].update(parts)  # parts run one at a time into one card

    def write(checkpoints=False):
        """The card and each variant's report; with `checkpoints`, each variant's
        checkpoint too (whose metrics change only with the accuracy part)."""
        atomic_write(out / "compression.json",
                     lambda f: f.write(json.dumps(report, indent=2).encode()))
        atomic_write(out / "compression.md", lambda f: f.write(markdown(report).encode()))
        for name, (m, v, r) in variants.items():
            own = variant_report(report, name)
            if checkpoints:
                save_checkpoint(out / "variants" / f"{name}.pkl", m, v,
                                metrics=own["metrics"], compression=r)
            atomic_write(out / "variants" / f"{name}.json",
                         lambda f, own=own: f.write(json.dumps(own, indent=2).encode()))

    write(checkpoints=True)

    if "size" in config.parts:
        for name, (m, v, r) in everything.items():
            report["variants"][name]["size"] = size_part(m, v, r)
        write()
    if "accuracy" in config.parts:
        logits = {name: _logits(m, v, data.test_images) for name, (m, v, _) in
                  tqdm(everything.items(), desc="accuracy", disable=config.quiet)}
        for name in everything:
            report["variants"][name]["accuracy"] = accuracy_part(
                logits[name], logits["original"], np.asarray(data.test_labels))
        write(checkpoints=True)
    if "speed" in config.parts:
        found = speed_part({n: (m, v) for n, (m, v, _) in everything.items()},
                           data.test_images[:256], config.timing_repeats)
        for name, row in found.items():
            report["variants"][name]["speed"] = row
        write()
    n = report["num_images"]
    images = jnp.asarray(data.test_images[:n], jnp.float32) / 255.0
    methods, report["skipped"] = method_list(config, model, variants)
    if "survival" in config.parts:
        targets = jnp.argmax(model.apply(variables, images), -1)
        reference = {method: explained(method, model, variables, images, targets, config.seed)
                     for method in methods}  # the original's maps, once
        figure = {}
        for name, (m, v, _) in tqdm(variants.items(), desc="survival", disable=config.quiet):
            report["variants"][name]["survival"] = {}
            for method in methods:
                maps = explained(method, m, v, images, targets, config.seed)
                figure[(name, method)] = {"original": reference[method], "variant": maps}
                report["variants"][name]["survival"][method] = survival_part(
                    maps, reference[method], config)
            write()
        plot_survival(out / "survival.png", np.asarray(images), figure)
    if "faithfulness" in config.parts:
        setup = EvalConfig(num_images=n, step=config.step, randomization_images=min(4, n),
                           chunk=n, batch_size=256, focus_mosaics=0, faithfulness_subsets=10,
                           infidelity_perturbations=4, seed=config.seed, quiet=True)
        labels = jnp.asarray(data.test_labels[:n])
        run = xai_cards.prepare(setup, model, variables, images, labels)
        original = {method: xai_cards.card(run, method) for method in methods}  # once
        for name, (m, v, _) in tqdm(variants.items(), desc="faithfulness",
                                    disable=config.quiet):
            run = xai_cards.prepare(setup, m, v, images, labels)
            report["variants"][name]["faithfulness"] = {
                method: faithfulness_part({"original": original[method],
                                           "variant": xai_cards.card(run, method)}, config)
                for method in methods}
            write()
    write()
    return report


# ---------------------------------------------------------------- command line


def parse_args(argv=None) -> CompressConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = CompressConfig()
    cli.add_input_flags(parser, defaults.output_dir)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="default: all of them")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=None,
                        help="default: all of them")
    parser.add_argument("--methods", nargs="+", choices=tuple(xv.METHODS), default=None,
                        help="default: every method that explains the original and each "
                             "variant")
    for name, minimum, text in [
            ("num_images", 1, "first test records explained"),
            ("calibration_images", 1, "first training images that calibrate int8"),
            ("finetune_epochs", 0, "epochs of fine-tuning after pruning"),
            ("finetune_images", 1, "first training images fine-tuned on (default: all)"),
            ("finetune_batch_size", 1, "images per fine-tuning step"),
            ("top_k", 1, "pixels in the top-k intersection"),
            ("timing_repeats", 1, "timed calls per model and batch size"),
            ("step", 1, "pixels per ROAD curve point"),
            ("seed", 0, "seeds the fine-tuning, the maps and the intervals")]:
        parser.add_argument("--" + name.replace("_", "-"), type=cli.int_at_least(minimum),
                            default=getattr(defaults, name),
                            help=f"{text} (default: %(default)s)")
    parser.add_argument("--finetune-lr", type=float, default=defaults.finetune_lr,
                        help="peak learning rate of the fine-tuning (default: %(default)s)")
    parser.add_argument("--filter-fraction", type=float, default=defaults.filter_fraction,
                        help="share of every conv's filters that 'filters' removes, in "
                             "[0, 1) (default: %(default)s)")
    parser.add_argument("--filter-criterion", choices=xc.CRITERIA,
                        default=defaults.filter_criterion,
                        help="which filters go: lowest L1 norm or BatchNorm |scale| "
                             "(default: %(default)s)")
    parser.add_argument("--variants-from", metavar="DIR",
                        help="take each variant that DIR/<name>.pkl holds (the variants "
                             "folder of an earlier run, e.g. one fine-tuned on a GPU) "
                             "instead of building it again")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    args = vars(parser.parse_args(argv))
    if args["variants_from"] is not None and not Path(args["variants_from"]).is_dir():
        parser.error(f"--variants-from: expected a folder of variant checkpoints, got "
                     f"{args['variants_from']!r}")
    if not 0 <= args["filter_fraction"] < 1:
        parser.error(f"--filter-fraction: must be in [0, 1), got {args['filter_fraction']}")
    if not args["finetune_lr"] > 0:
        parser.error(f"--finetune-lr: must be > 0, got {args['finetune_lr']}")
    for name in ("variants", "parts", "methods"):
        args[name] = (tuple(dict.fromkeys(args[name])) if args[name] is not None
                      else (None if name == "methods" else getattr(defaults, name)))
    return CompressConfig(**args)


@cli.entry_point
def main(argv=None):
    config = parse_args(argv)
    cli.check_writable(config.output_dir, "--output-dir", folder=True)
    report = compress(config)
    if not config.quiet:
        print(markdown(report))
        print(f"wrote {config.output_dir}/compression.json, compression.md and the "
              "variants' checkpoints")


if __name__ == "__main__":
    main()
