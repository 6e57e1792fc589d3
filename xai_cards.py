"""Cards: what an evaluation of explainers measures, as importable functions that return
NamedTuples. `evaluate_xai.py` (the saliency card) and `robustness_xai.py` (the
robustness card) parse flags, call these, and write the JSON, Markdown and figures.

A card's settings come as one object with the named fields (`evaluate_xai.EvalConfig`,
`robustness_xai.RobustnessConfig`). The model is run as every explainer runs it,
`xai_models.forward(model, variables, apply_kwargs)`: a linen Module with its variables,
or a plain function f(x) -> logits with None for the variables. The randomisation
cascade re-initialises parameters, so a model without any (a plain function) gets a
card without it.

Shapes: images float (N, H, W, C) in [0, 1]; labels and targets int (N,); maps (N, H, W).
"""

import time
from typing import Any, Dict, List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import adversarial as adv
import xai_metrics as xm
import xai_visualizations as xv
from xai_core import map_batches
from xai_models import forward, is_module, predict, softplus_relus


# ----------------------------------------------------------------------------------------
# The saliency card (evaluate_xai.py).

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


def mosaics_for(model, variables, images, labels, key, n, apply_kwargs=None):
    """Focus's 2 x 2 mosaics of `n` test images of four classes: (2H, 2W) when the model
    takes them (a GAP head), else of half-size tiles. Empty when n is 0 or fewer than
    four classes are among the images."""
    labels = np.asarray(labels)
    if n == 0 or len(np.unique(labels)) < 4:
        empty = jnp.zeros((0,) + images.shape[1:], images.dtype)
        return empty, jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32)
    h, w, c = images.shape[1:]
    try:
        jax.eval_shape(lambda v, x: forward(model, v, apply_kwargs)(x), variables,
                       jax.ShapeDtypeStruct((1, 2 * h, 2 * w, c), images.dtype))
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
    """`xai_core.map_batches` with a progress bar, sharded over devices and processes.

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


class Run(NamedTuple):
    """One evaluation's model, images and compiled shared pieces (`prepare`)."""

    config: Any                      # the settings (evaluate_xai.EvalConfig's fields)
    model: Any
    variables: Any
    apply_kwargs: dict
    images: jax.Array                # (N, H, W, C)
    labels: jax.Array                # (N,)
    key: jax.Array
    preds: jax.Array                 # (N,) the explained classes
    fractions: np.ndarray            # the curves' x axis
    curves_fn: Any                   # jitted (variables, images, maps, targets) -> curves
    measures_fn: Any                 # jitted (variables, images, maps, targets) -> dict
    mosaics: jax.Array               # Focus's mosaics, their targets and quadrants
    mosaic_targets: jax.Array
    quadrants: jax.Array
    rand_images: jax.Array           # the randomisation and random-logit images
    rand_targets: jax.Array
    other: jax.Array                 # a random other class per randomisation image
    fresh: Optional[dict]            # a fresh initialisation; None without parameters
    levels: List[str]                # the cascade's levels ([] without parameters)
    stacked: Any                     # every level's variables, stacked
    fresh_preds: Optional[jax.Array]


def prepare(config, model, variables, images, labels, apply_kwargs=None) -> Run:
    """The shared pieces of an evaluation: predictions, the compiled curves and
    measures, Focus's mosaics and the randomisation cascade."""
    kwargs = dict(apply_kwargs or {})
    key = jax.random.key(config.seed)
    # Variables are always arguments, never closed over: XLA would constant-fold
    # convolutions of constant inputs at compile time.
    logits_fn = jax.jit(lambda v, x: forward(model, v, kwargs)(x))
    logits = run_chunks(lambda x: logits_fn(variables, x), [images], config.chunk)
    preds = jnp.argmax(logits, -1).astype(jnp.int32)
    curves_fn = jax.jit(lambda v, x, maps, t: xm.deletion_insertion(
        model, v, x, maps, t, step=config.step, deletion_baseline=config.deletion_baseline,
        insertion_baseline=config.insertion_baseline, batch_size=config.batch_size,
        apply_kwargs=kwargs))
    measure_key = jax.random.fold_in(key, 5)
    measures_fn = jax.jit(lambda v, x, maps, t: _measures(config, model, v, x, maps, t,
                                                           measure_key, kwargs))
    mosaics = mosaics_for(model, variables, images, labels, jax.random.fold_in(key, 6),
                          config.focus_mosaics, kwargs)
    r = min(config.randomization_images, len(images))
    rand_images, rand_targets = images[:r], preds[:r]
    fresh, levels, stacked, fresh_preds = None, [], None, None
    if is_module(model) and hasattr(variables, "keys") and "params" in variables:
        # A fresh initialisation (its own BatchNorm statistics too): the cascade's last
        # level is this model.
        init = jax.jit(lambda k, x: model.init(k, x, **kwargs))(jax.random.fold_in(key, 1),
                                                                 images[:1])
        # collections that a fresh model does not make (a quantised model's activation
        # statistics, `xai_compression`) stay the trained model's
        fresh = {c: init.get(c, variables[c]) for c in variables}
        levels, stacked = xm.cascading_randomization(model, variables, fresh,
                                                     images.shape[1:], kwargs)
        fresh_preds = jnp.argmax(logits_fn(fresh, rand_images), -1).astype(jnp.int32)
    other = xm.random_other_classes(jax.random.fold_in(key, 2), rand_targets,
                                    logits.shape[-1])
    return Run(config, model, variables, kwargs, images, labels, key, preds,
               xm.curve_fractions(images.shape[1] * images.shape[2], config.step),
               curves_fn, measures_fn, *mosaics, rand_images, rand_targets, other, fresh,
               levels, stacked, fresh_preds)


def _measures(config, model, variables, images, maps, targets, key, apply_kwargs):
    """Every per-image measure but the curves, of one chunk (jitted by `prepare`)."""
    common = dict(batch_size=config.batch_size, apply_kwargs=apply_kwargs)
    return {
        "road": xm.road(model, variables, images, maps, targets, key, **common),
        "deletion_blur": xm.deletion_insertion(
            model, variables, images, maps, targets, step=config.step,
            deletion_baseline="blur", **common)["deletion_auc"],
        "faithfulness_correlation": xm.faithfulness_correlation(
            model, variables, images, maps, targets, key,
            n_subsets=config.faithfulness_subsets,
            subset_size=max(1, images.shape[1] * images.shape[2] // 10), **common),
        "infidelity": xm.infidelity(model, variables, images, maps, targets, key,
                                    n_perturbations=config.infidelity_perturbations,
                                    normalize=True, **common),
        "sparseness": xm.sparseness(maps), "complexity": xm.complexity(maps)}


def curves(run: Run, maps):
    """Deletion and insertion results for maps of every image, and the seconds taken."""
    c = run.config
    bar = tqdm(total=len(maps), desc="  deletion/insertion", disable=c.quiet, leave=False)
    start = time.perf_counter()

    def chunk_curves(x, m, t):
        out = run.curves_fn(run.variables, x, m, t)
        return {k: v for k, v in out.items() if k != "fractions"}

    out = run_chunks(chunk_curves, [run.images, maps, run.preds], c.chunk, bar)
    jax.block_until_ready(out)
    bar.close()
    return {"fractions": run.fractions, **out}, time.perf_counter() - start


def measures(run: Run, maps):
    """ROAD, deletion to blur, faithfulness correlation, infidelity, sparseness and
    complexity of maps of every image: per-image arrays."""
    def chunk_measures(x, m, t):
        out = run.measures_fn(run.variables, x, m, t)
        road = {f"road_{k}": v for k, v in out.pop("road").items()
                if k in ("morf_auc", "lerf_auc", "morf_correct", "lerf_correct")}
        return {**out, **road}

    bar = tqdm(total=len(maps), desc="  ROAD and the other measures",
               disable=run.config.quiet, leave=False)
    out = run_chunks(chunk_measures, [run.images, maps, run.preds], run.config.chunk, bar)
    bar.close()
    return out


def reference(run: Run):
    """The random-map reference: every per-image measure of uniform random maps."""
    maps = xm.random_maps(jax.random.fold_in(run.key, 3), run.images.shape[:3])
    out, _ = curves(run, maps)
    out.update(measures(run, maps))
    if len(run.mosaics):
        out["focus"] = np.asarray(xm.focus(
            xm.random_maps(jax.random.fold_in(run.key, 7), run.mosaics.shape[:3]),
            run.quadrants))
    return out


class Card(NamedTuple):
    """One method's card (`card`)."""

    summary: Dict[str, Any]          # plain values, as evaluation.json holds them
    curves: Dict[str, Any]           # deletion and insertion curves and AUC per image
    measures: Dict[str, Any]         # every other per-image measure
    example_maps: Optional[np.ndarray]  # image 0's map at every randomisation level
    example_map: np.ndarray          # image 0's map


def _compiled(run: Run, explain, rows):
    """`explain` jitted and compiled for chunks of `rows` split over the devices, and the
    seconds it took."""
    split = local_split()
    start = time.perf_counter()
    fn = jax.jit(explain).lower(
        run.variables,
        jax.ShapeDtypeStruct((rows, *run.images.shape[1:]), run.images.dtype,
                             sharding=split),
        jax.ShapeDtypeStruct((rows,), run.preds.dtype, sharding=split)).compile()
    return fn, time.perf_counter() - start


def _sanity(run: Run, explain, fn, maps, chunk):
    """The cascading randomisation, the fresh model and the random-logit test of one
    method's maps; the randomisation parts are None for a model without parameters."""
    r = len(run.rand_images)
    other_maps = run_chunks(lambda x, t: fn(run.variables, x, t).maps,
                            [run.rand_images, run.other], chunk)
    out = {"random_logit": xm.summarize(xm.similarity(other_maps, maps[:r]), axis=None),
           "randomization": None, "fresh_model": None, "example_maps": None}
    if not run.levels:
        return out
    rand_maps = xm.randomization_maps(lambda *args: explain(*args).maps, run.stacked,
                                      run.rand_images, run.rand_targets)
    # The fully fresh model on its own, for the trained model's target (the last level
    # of the cascade) and for its own prediction.
    fresh_maps = run_chunks(lambda x, t: fn(run.fresh, x, t).maps,
                            [run.rand_images, run.fresh_preds], chunk)
    out["randomization"] = xm.summarize(xm.similarity(rand_maps, maps[:r]))
    out["fresh_model"] = {
        "for_the_trained_models_target": xm.summarize(
            xm.similarity(rand_maps[-1], maps[:r]), axis=None),
        "for_its_own_prediction": xm.summarize(
            xm.similarity(jnp.asarray(fresh_maps), maps[:r]), axis=None)}
    out["example_maps"] = np.asarray(rand_maps[:, 0])
    return out


def card(run: Run, method) -> Card:
    """Everything measured for one method: its maps of every image, their curves and
    measures, Focus on the mosaics, the sanity tests, and the time each took."""
    c, model = run.config, run.model
    spec = xv.METHODS[method]
    options = xv.check_options(method, model, c.method_options(method),
                               run.images.shape[1:], run.variables, run.apply_kwargs)
    key = jax.random.fold_in(run.key, 4)

    def explain(variables, images, targets):
        return xv.explain(method, model, variables, images, targets, key,
                          batch_size=c.batch_size, apply_kwargs=run.apply_kwargs,
                          **options)

    chunk = min(c.chunk, len(run.images))
    fn, compile_s = _compiled(run, explain, split_chunk(chunk))  # `run_chunks`' batches
    bar = tqdm(total=len(run.images), desc=f"  {method}", disable=c.quiet, leave=False)
    start = time.perf_counter()
    out = jax.block_until_ready(run_chunks(lambda x, t: fn(run.variables, x, t),
                                           [run.images, run.preds], chunk, bar))
    seconds = time.perf_counter() - start
    bar.close()
    maps = out.maps
    found, curve_s = curves(run, maps)
    start = time.perf_counter()
    per_image = measures(run, maps)
    if len(run.mosaics):
        fn_any = jax.jit(explain)  # the mosaics' shape compiles its own program
        mosaic_maps = run_chunks(lambda x, t: fn_any(run.variables, x, t).maps,
                                 [run.mosaics, run.mosaic_targets], chunk)
        per_image["focus"] = np.asarray(xm.focus(jnp.asarray(mosaic_maps), run.quadrants))
    measures_s = time.perf_counter() - start
    sanity = _sanity(run, explain, fn, maps, chunk)
    forward_passes, backward = spec.passes(options, run.images.shape[1:])
    summary = {
        "method": method, "label": spec.label, "paper": spec.paper, "signed": spec.signed,
        "parameters": {k: (v if v is None or isinstance(v, (int, float, str)) else "array")
                       for k, v in options.items()},
        "deletion_auc": float(jnp.mean(found["deletion_auc"])),
        "insertion_auc": float(jnp.mean(found["insertion_auc"])),
        "deletion_auc_sem": float(jnp.std(found["deletion_auc"]) / np.sqrt(len(maps))),
        "insertion_auc_sem": float(jnp.std(found["insertion_auc"]) / np.sqrt(len(maps))),
        "randomization_levels": run.levels,
        "randomization": sanity["randomization"],
        "randomization_setup": RANDOMIZATION_SETUP if run.levels else None,
        "fresh_model": sanity["fresh_model"],
        "random_logit": sanity["random_logit"],
        "passes_per_image": {"forward": forward_passes, "backward": backward},
        "ms_per_image": round(1000 * seconds / len(run.images), 3),
        "compile_s": round(compile_s, 2),
        "deletion_insertion_s": round(curve_s, 2),
        "measures_s": round(measures_s, 2),
    }
    for name, values in out.extras.items():  # e.g. IG's completeness gap
        summary[name] = {"mean": float(np.mean(values)),
                         "median": float(np.median(values)), "max": float(np.max(values))}
    return Card(summary, found, per_image, sanity["example_maps"], np.asarray(maps[0]))


def verdicts(card):
    """Deletion and insertion against the random maps (the paired tests of the card's
    statistics: a tie is not a win), and the randomisation rule; `card` is a `Card`'s
    summary with its 'statistics'."""
    stats = card["statistics"]
    out = {f"{name}_{side}_random": stats[f"{name}_auc"]["vs_random"]["verdict"] == "better"
           for name, side in (("deletion", "below"), ("insertion", "above"))}
    if card["randomization"] is None:  # a model without parameters to re-initialise
        return {**out, "randomization_mean_abs_spearman": None, "randomization": "not run"}
    cascade = float(np.mean(card["randomization"]["spearman_abs"]))
    return {**out, "randomization_mean_abs_spearman": round(cascade, 4),
            "randomization": "passes" if cascade < RANDOMIZATION_PASS else "fails"}


# ----------------------------------------------------------------------------------------
# The robustness card (robustness_xai.py).


class AttackRun(NamedTuple):
    """A robustness card's model, test images, predictions and key (`prepare_attacks`)."""

    config: Any                      # the settings (robustness_xai.RobustnessConfig)
    model: Any
    variables: Any
    apply_kwargs: dict
    images: jax.Array
    labels: jax.Array
    preds: jax.Array
    key: jax.Array


def prepare_attacks(config, model, variables, images, labels,
                    apply_kwargs=None) -> AttackRun:
    """The predictions every attack keeps, and the card's key."""
    kwargs = dict(apply_kwargs or {})
    probs = predict(model, variables, images, apply_kwargs=kwargs, batch_size=config.chunk)
    return AttackRun(config, model, variables, kwargs, images, labels,
                     jnp.asarray(probs.argmax(-1), jnp.int32), jax.random.key(config.seed))


def attack_tools(run: AttackRun, method, beta=None):
    """`adversarial.surrogates` of `method` with the card's options and key."""
    c = run.config
    return adv.surrogates(method, run.model, run.variables, beta=beta or c.beta,
                          key=jax.random.fold_in(run.key, 1), batch_size=c.batch_size(),
                          apply_kwargs=run.apply_kwargs, **c.method_options(method))


def _chunks(run: AttackRun, n):
    for start in range(0, n, run.config.chunk):
        yield slice(start, min(start + run.config.chunk, n))


class FragilityCard(NamedTuple):
    """Ghorbani et al.'s attack against random-sign noise of the same ε, per ε."""

    num_images: int
    epsilons_255: List[float]
    top_k: int
    attack_steps: int
    beta: float
    by_eps: Dict[str, dict]          # ε -> {'random', 'attack', 'attack_vs_random'}


def fragility(run: AttackRun, method, bar=None) -> FragilityCard:
    """How far `method`'s maps move under the attack and under random noise."""
    c = run.config
    h, surrogate, predict, _ = attack_tools(run, method)
    h = jax.jit(h)
    n = min(c.num_images, len(run.images))
    runs = {(eps, kind): [] for eps in c.fragility_epsilons
            for kind in ("random", "attack")}
    for part in _chunks(run, n):
        x, t = run.images[part], run.preds[part]
        clean = h(x, t)  # once per chunk, for every ε and both perturbations
        for eps in c.fragility_epsilons:
            runs[eps, "random"].append(adv.random_sign(
                h, predict, x, t, run.key, eps=eps / 255, k=c.top_k, clean=clean))
            runs[eps, "attack"].append(adv.fragility_attack(
                h, surrogate, predict, x, t, eps=eps / 255, steps=c.attack_steps,
                k=c.top_k, clean=clean))
            if bar is not None:
                bar.update(1)
    return FragilityCard(n, list(c.fragility_epsilons), c.top_k, c.attack_steps, c.beta,
                     {f"{eps:g}": _fragility_row(runs, eps)
                      for eps in c.fragility_epsilons})


def _fragility_row(runs, eps):
    row, top_k = {}, {}
    for kind in ("random", "attack"):
        results = runs[eps, kind]
        changes = {k: np.concatenate([np.asarray(r.changes[k]) for r in results])
                   for k in results[0].changes}
        kept = np.concatenate([np.asarray(r.kept) for r in results])
        row[kind] = {**{k: float(np.mean(v)) for k, v in changes.items()},
                     "kept": float(np.mean(kept))}
        top_k[kind] = changes["top_k"]
    test = xm.paired_verdict(top_k["attack"], top_k["random"], lower_is_better=True)
    return {**row, "attack_vs_random": test}


class SensitivityCard(NamedTuple):
    """The Monte Carlo and adversarial sensitivities of a method's maps."""

    num_images: int
    radius: float
    samples: int
    max: dict                        # {'mean', 'median'} over the images
    avg: dict
    lipschitz: dict
    adversarial: dict
    adversarial_over_max: float      # median ratio of the adversarial to the MC maximum


def sensitivity(run: AttackRun, method, bar=None) -> SensitivityCard:
    """`adversarial.adversarial_sensitivity` of `method` on the card's images."""
    c = run.config
    h, surrogate, _, _ = attack_tools(run, method)
    n = min(c.sensitivity_images, len(run.images))
    values = {"max": [], "avg": [], "lipschitz": [], "adversarial": []}
    for part in _chunks(run, n):
        found, mc = adv.adversarial_sensitivity(
            h, surrogate, run.images[part], run.preds[part],
            jax.random.fold_in(run.key, 2),
            radius=c.sensitivity_radius, n_samples=c.sensitivity_samples,
            steps=c.attack_steps, batch_size=c.batch_size())
        for name, v in (("max", mc.max), ("avg", mc.avg), ("lipschitz", mc.lipschitz),
                        ("adversarial", found)):
            values[name].append(np.asarray(v))
        if bar is not None:
            bar.update(1)
    values = {k: np.concatenate(v) for k, v in values.items()}
    stats = {k: {"mean": float(np.mean(v)), "median": float(np.median(v))}
             for k, v in values.items()}
    return SensitivityCard(n, c.sensitivity_radius, c.sensitivity_samples, **stats,
                       adversarial_over_max=float(np.median(
                           values["adversarial"] / np.maximum(values["max"], 1e-12))))


class ManipulationCard(NamedTuple):
    """Dombrowski et al.'s manipulation of the standard maps and of the β-smoothed ones."""

    method: str
    num_images: int
    eps_255: int
    steps: int
    defence_beta: float
    standard: dict                   # {'mse_before', 'mse_after', 'kept'}
    beta_smoothed: dict
    beta_smoothed_transfer: dict     # the defence against the standard maps' attack
    beta_smoothed_accuracy: float
    standard_accuracy: float


def manipulation(run: AttackRun, bar=None):
    """(ManipulationCard, an example {'image', 'original', 'target', 'manipulated',
    'adversarial'} for the figure): each image's target is the next image's map."""
    c = run.config
    method = c.manipulation_method
    n = min(c.manipulation_images, len(run.images))
    x_all, t_all = run.images[:n], run.preds[:n]
    target_images, target_classes = jnp.roll(x_all, -1, 0), jnp.roll(t_all, -1, 0)
    example, manipulated, transfer, found = None, [], [], {}
    for name, beta in (("standard", c.beta), ("beta_smoothed", c.defence_beta)):
        h, surrogate, _, logits_fn = attack_tools(run, method, beta)
        if name == "beta_smoothed":  # the defence explains the softplus network itself
            h = surrogate
        h = jax.jit(h)
        rows = []
        for i, part in enumerate(_chunks(run, n)):
            x, t = x_all[part], t_all[part]
            goal = h(target_images[part], target_classes[part])
            m = adv.manipulate(h, surrogate, logits_fn, x, t, goal, eps=8 / 255,
                               steps=c.manipulation_steps)
            rows.append(m)
            if name == "standard":
                manipulated.append(m.images)
                if i == 0:
                    example = {"image": x[0], "original": h(x, t)[0], "target": goal[0],
                               "manipulated": m.maps[0], "adversarial": m.images[0]}
            else:  # the defence against the attack made for the standard maps
                transfer.append(adv.map_mse(h(manipulated[i], t), goal))
            if bar is not None:
                bar.update(1)
        found[name] = {k: float(np.mean(np.concatenate([np.asarray(getattr(r, k))
                                                        for r in rows])))
                       for k in ("mse_before", "mse_after", "kept")}
    smooth_logits = softplus_relus(forward(run.model, run.variables, run.apply_kwargs),
                                   c.defence_beta)
    result = ManipulationCard(
        method, n, 8, c.manipulation_steps, c.defence_beta, found["standard"],
        found["beta_smoothed"],
        {"mse_before": found["beta_smoothed"]["mse_before"],  # the same clean maps
         "mse_after": float(jnp.mean(jnp.concatenate(transfer)))},
        float(jnp.mean(jnp.argmax(jax.jit(smooth_logits)(x_all), -1) == run.labels[:n])),
        float(jnp.mean(run.preds[:n] == run.labels[:n])))
    return result, example
