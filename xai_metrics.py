"""How far to trust a heatmap: faithfulness and sanity checks, vectorised in JAX.

- Faithfulness: deletion and insertion curves and their AUC (Petsiuk et al. 2018). The
  most relevant pixels are removed from the image (deletion; a faithful map makes the
  class probability fall fast, so a low AUC) or revealed on a blurred copy (insertion;
  a high AUC), `step` pixels at a time. Random maps give the reference.
- Sanity: cascading model-parameter randomisation (Adebayo et al. 2018). The layers are
  re-initialised from the output down to the first convolution, one more at each level,
  and each level's maps are compared with the trained model's by Spearman rank
  correlation (of |map| and of the signed map) and SSIM. A map that still looks the
  same once the weights are random does not explain the model.
- The random-logit test (Sixt et al. 2020): the map of the predicted class against the
  map of a random other class; a map that does not change with the class is not
  class-specific.
- Robustness: max- and average sensitivity and a local Lipschitz estimate in an L∞ ball
  (`sensitivity`); `adversarial.py` searches the same ball by PGD.

Maps are (N, H, W), images float (N, H, W, C) in [0, 1], targets int (N,). Everything
here is a pure, jittable function; `evaluate_xai.py` runs it over the test set. A metric
runs the model as the explainers do, `xai_models.forward(model, variables, apply_kwargs)`:
a linen Module with its variables (and `apply_kwargs` such as {"train": False}), or a
plain function f(x) -> logits with None for the variables. The randomisation cascade
needs parameters to re-initialise, so it takes linen models only.
"""

from typing import Dict, List, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from flax import traverse_util

from xai_core import (check_array, check_batch, check_int, check_number, gaussian_blur,
                      map_pairs, normalize_maps, resolve_targets)
from xai_models import forward

BASELINES = ("zero", "blur", "mean")


# ----------------------------------------------------------------------------------------
# Argument checks. Only static shapes and Python values are read, so every function here
# still traces under jit; each message names the argument, what was expected and what
# was given.


def _check_maps(maps, images_shape, name="maps"):
    shape = check_array(name, maps)
    if shape != images_shape[:3]:
        raise ValueError(f"{name} must be (N, H, W) = {images_shape[:3]} to match the "
                         f"images, got shape {shape}")


def _check_explained(images, maps, targets):
    """(N, H, W) of images (N, H, W, C) with their maps (N, H, W) and one target each."""
    n, h, w, _ = check_batch(images)
    _check_maps(maps, images.shape)
    if check_array("targets", targets) != (n,):
        raise ValueError(f"targets must be one class per image, shape ({n},), got shape "
                         f"{tuple(targets.shape)}")
    return n, h, w


def _check_pair(a, b, names=("a", "b")):
    shape_a, shape_b = check_array(names[0], a), check_array(names[1], b)
    if len(shape_a) < 2 or shape_a != shape_b:
        raise ValueError(f"{names[0]} and {names[1]} must be maps (..., H, W) of the same "
                         f"shape, got {shape_a} and {shape_b}")
    return shape_a



# ----------------------------------------------------------------------------------------
# Faithfulness.


def baseline_images(images, kind):
    """What removed pixels become: 'zero' (black), 'blur' (`gaussian_blur`) or 'mean'
    (each image's mean colour)."""
    if kind == "zero":
        return jnp.zeros_like(images)
    if kind == "blur":
        return gaussian_blur(images)
    if kind == "mean":
        return jnp.broadcast_to(jnp.mean(images, axis=(1, 2), keepdims=True), images.shape)
    raise ValueError(f"baseline must be one of {BASELINES}, got {kind!r}")


def pixel_ranks(maps):
    """(N, H, W) int: each pixel's place when sorted by relevance, 0 = the most relevant.
    Ties keep raster order, so the ranking is deterministic."""
    n, h, w = maps.shape
    order = jnp.argsort(-maps.reshape(n, h * w), axis=-1, stable=True)
    return jnp.argsort(order, axis=-1).reshape(n, h, w)


def curve_fractions(pixels, step):
    """Fractions of pixels removed at each point of a curve: 0, step, 2·step, … , all."""
    counts = np.minimum(np.arange(-(-pixels // step) + 1) * step, pixels)
    return counts / pixels


def deletion_insertion(model, variables, images, maps, targets, *, step=32,
                       deletion_baseline="zero", insertion_baseline="blur", batch_size=1024,
                       apply_kwargs=None):
    """Deletion and insertion curves of the target's softmax probability, and their AUC.

    At point k the k · `step` most relevant pixels (all channels) are replaced by the
    deletion baseline, or, for insertion, shown on top of the insertion baseline.
    Curves share the x axis `curve_fractions(H · W, step)`; the AUC is the trapezoid
    area under them, in [0, 1]. The N · (points) pairs of images run in batches of
    `batch_size` pairs.

    Args:
        maps: (N, H, W); higher = more relevant (signed maps rank positive evidence first).
        targets: (N,) classes; `PREDICTED` is each image's prediction.

    Returns:
        {'fractions' (P,), 'deletion' (N, P), 'insertion' (N, P), 'deletion_auc' (N,),
        'insertion_auc' (N,)}.
    """
    n, h, w = _check_explained(images, maps, targets)
    check_int("step", step, 1)
    check_int("batch_size", batch_size, 1)
    for name, kind in (("deletion_baseline", deletion_baseline),
                       ("insertion_baseline", insertion_baseline)):
        if kind not in BASELINES:
            raise ValueError(f"{name} must be one of {BASELINES}, got {kind!r}")
    fractions = curve_fractions(h * w, step)
    counts = jnp.asarray(np.round(fractions * h * w), jnp.int32)
    ranks = pixel_ranks(maps)
    removed = baseline_images(images, deletion_baseline)
    start = baseline_images(images, insertion_baseline)
    f = forward(model, variables, apply_kwargs)
    targets = resolve_targets(f(images), targets)

    def probabilities(k, i):
        top = (ranks[i] < counts[k][:, None, None])[..., None]
        both = jnp.concatenate([jnp.where(top, removed[i], images[i]),
                                jnp.where(top, images[i], start[i])])
        probs = jax.nn.softmax(f(both).astype(jnp.float32))
        p = jnp.take_along_axis(probs, jnp.tile(targets[i], 2)[:, None], axis=-1)[:, 0]
        return p.reshape(2, -1).T  # (B, 2): deletion, insertion

    curves = map_pairs(probabilities, n, len(fractions), batch_size, total=False)
    deletion, insertion = curves[..., 0].T, curves[..., 1].T
    x = jnp.asarray(fractions, jnp.float32)
    xs = jnp.broadcast_to(x, deletion.shape)
    return {"fractions": x, "deletion": deletion, "insertion": insertion,
            "deletion_auc": jnp.trapezoid(deletion, xs, axis=-1),
            "insertion_auc": jnp.trapezoid(insertion, xs, axis=-1)}


# ----------------------------------------------------------------------------------------
# ROAD: RemOve And Debias (Rong et al., ICML 2022).

# The paper's 10 %, 20 %, ..., 90 % of the pixels removed.
ROAD_FRACTIONS = tuple(round(0.1 * k, 1) for k in range(1, 10))
# Noisy linear imputation: a removed pixel is the weighted mean of its 8 neighbours,
# 1/6 for the 4 direct ones and 1/12 for the 4 diagonal ones (the weights sum to 1).
ROAD_NEIGHBOURS = ((-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
                   (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12))


def neighbour_sum(x):
    """Σ_j w_j · x[neighbour j] over the `ROAD_NEIGHBOURS` of every pixel of (H, W, ...)
    arrays; neighbours outside the image are dropped (they add nothing)."""
    h, w = x.shape[:2]
    padded = jnp.pad(x, ((1, 1), (1, 1)) + ((0, 0),) * (x.ndim - 2))
    return sum(weight * padded[1 + di:1 + di + h, 1 + dj:1 + dj + w]
               for di, dj, weight in ROAD_NEIGHBOURS)


def road_impute(images, removed, key, *, noise=0.01, tol=1e-6, maxiter=None):
    """ROAD's noisy linear imputation (Rong et al. 2022, §4): the removed pixels, all
    channels, are filled from their neighbours, then Gaussian noise is added to them.

    Every removed pixel i satisfies x_i = Σ_j w_ij x_j / Σ_j w_ij over its neighbours j
    inside the image (the paper's edge rule: the weights are renormalised), with the
    known pixels fixed. That is one sparse linear system per image, L_rr x_r = W_rk x_k
    with L the weighted grid Laplacian restricted to the removed pixels: symmetric and
    positive definite whenever a pixel is left. It is solved for all images at once by
    Jacobi-preconditioned conjugate gradients (`jax.scipy.sparse.linalg.cg`, vmapped),
    with the stencil applied by shifted sums, never a matrix. Known pixels come back
    unchanged.

    Args:
        images: (N, H, W, C) float.
        removed: (N, H, W) bool, True where a pixel is removed.
        key: the noise's `jax.random.key`. The draw is one (H, W, C) field shared by
            every image, so an image's result never depends on its batch-mates.
        noise: the noise's standard deviation (the paper's 0.01, for images in [0, 1]);
            0 gives the plain linear imputation.
        tol, maxiter: conjugate gradients' relative tolerance and iteration cap (default
            H · W, where it is exact in exact arithmetic).

    Returns:
        (N, H, W, C) imputed images (unclipped).
    """
    n, h, w, c = check_batch(images)
    if check_array("removed", removed) != (n, h, w):
        raise ValueError(f"removed must be a (N, H, W) = {(n, h, w)} mask of the images' "
                         f"pixels, got shape {tuple(removed.shape)}")
    if not jnp.issubdtype(removed.dtype, jnp.bool_):
        raise TypeError(f"removed must be a boolean mask, got dtype {removed.dtype}")
    check_number("noise", noise)
    field = jax.random.normal(key, (h, w, c), images.dtype)
    return linear_impute(images, removed, tol=tol, maxiter=maxiter) + noise_on(removed, noise * field)


def noise_on(removed, field):
    """`field` (H, W, C) or (N, H, W, C) where `removed` (N, H, W) is True, else 0."""
    field = jnp.broadcast_to(field, removed.shape + field.shape[-1:])
    return removed[..., None].astype(field.dtype) * field


def linear_impute(images, removed, *, tol=1e-6, maxiter=None):
    """`road_impute` without the noise (see there): the linear system alone."""
    n, h, w, c = images.shape
    check_number("tol", tol)
    maxiter = h * w if maxiter is None else check_int("maxiter", maxiter, 1)
    degree = neighbour_sum(jnp.ones((h, w, 1), images.dtype))  # Σ_j w_ij inside the image

    def impute(image, mask):
        m = mask[..., None].astype(image.dtype)
        known = image * (1 - m)
        b = m * neighbour_sum(known)

        def laplacian(v):  # v lives on the removed pixels (zero elsewhere)
            return m * (degree * v - neighbour_sum(m * v))

        x, _ = jax.scipy.sparse.linalg.cg(laplacian, b, x0=b / degree, tol=tol,
                                          maxiter=maxiter, M=lambda r: r / degree)
        return known + m * x

    return jax.vmap(impute)(images, removed)


def road(model, variables, images, maps, targets, key, *, fractions=ROAD_FRACTIONS,
         noise=0.01, batch_size=1024, apply_kwargs=None):
    """ROAD curves (Rong et al. 2022): the target's softmax probability once a fraction
    of the pixels is removed and imputed by `road_impute`, most relevant first (MoRF: a
    faithful map makes it fall fast, a low AUC) and least relevant first (LeRF: it
    should stay, a high AUC). Imputation from the neighbours leaves no black holes to
    give away where the pixels were, so the curves measure the information removed,
    not the shift out of the data's distribution that deleting to black causes.

    Args:
        maps: (N, H, W); higher = more relevant.
        targets: (N,) classes; `PREDICTED` is each image's prediction.
        key: the imputation noise's key; fraction k and order use `fold_in`s of it.
        fractions: the fractions of pixels removed, each in (0, 1).
        batch_size: bounds the (fraction, image) pairs evaluated at once (each pair is
            two imputed images, MoRF and LeRF).

    Returns:
        {'fractions' (P,), 'morf' (N, P), 'lerf' (N, P), 'morf_auc' (N,), 'lerf_auc'
        (N,), 'morf_correct' (N, P), 'lerf_correct' (N, P)}: the `*_correct` are whether
        the prediction is still the target (the paper's accuracy curves, averaged over
        images); the AUC is the trapezoid area over the fractions, divided by their span.
    """
    n, h, w = _check_explained(images, maps, targets)
    fractions = tuple(fractions)
    if not fractions or not all(isinstance(f, (int, float)) and 0 < f < 1 for f in fractions):
        raise ValueError(f"fractions must be numbers in (0, 1), got {fractions!r}")
    check_int("batch_size", batch_size, 1)
    check_number("noise", noise)
    counts = jnp.asarray(np.round(np.asarray(fractions) * h * w), jnp.int32)
    ranks = pixel_ranks(maps)
    # One noise field per (fraction, order), shared by the images as in `road_impute`.
    fields = noise * jax.vmap(lambda k: jax.random.normal(k, (2, h, w, images.shape[-1]),
                                                          images.dtype))(
        jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(len(fractions))))
    f = forward(model, variables, apply_kwargs)
    targets = resolve_targets(f(images), targets)

    def scores(k, i):
        morf = ranks[i] < counts[k][:, None, None]
        lerf = ranks[i] >= h * w - counts[k][:, None, None]
        imputed = jnp.concatenate([
            linear_impute(images[i], morf) + noise_on(morf, fields[k, 0]),
            linear_impute(images[i], lerf) + noise_on(lerf, fields[k, 1])])
        logits = f(imputed).astype(jnp.float32)
        t = jnp.tile(targets[i], 2)
        p = jnp.take_along_axis(jax.nn.softmax(logits), t[:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(logits, axis=-1) == t).astype(jnp.float32)
        return jnp.stack([p, correct], -1).reshape(2, -1, 2).transpose(1, 0, 2)  # (B, 2, 2)

    out = map_pairs(scores, n, len(fractions), batch_size, total=False)  # (P, N, order, 2)
    x = jnp.asarray(fractions, jnp.float32)
    span = x[-1] - x[0] if len(fractions) > 1 else 1.0
    curves = {"morf": out[:, :, 0, 0].T, "lerf": out[:, :, 1, 0].T}
    return {"fractions": x, **curves,
            **{f"{k}_auc": jnp.trapezoid(v, jnp.broadcast_to(x, v.shape), axis=-1) / span
               for k, v in curves.items()},
            "morf_correct": out[:, :, 0, 1].T > 0.5, "lerf_correct": out[:, :, 1, 1].T > 0.5}


class Evidence(NamedTuple):
    """One map's evidence on its own image, each (N,): what the demo's detailed figure
    and the explorer show beside every heatmap (`EVIDENCE` names each field)."""

    road_morf: jax.Array
    road_lerf: jax.Array
    deletion_blur: jax.Array


# Each field of `Evidence`: its label, and whether lower is better. These measures hold
# when pixels are removed (Rong et al. 2022): ROAD imputes them from their neighbours, and
# deletion to a blur leaves no black holes, which misjudge maps (docs/evaluating.md).
EVIDENCE = {"road_morf": ("ROAD AUC, most relevant removed first", True),
            "road_lerf": ("ROAD AUC, least relevant removed first", False),
            "deletion_blur": ("Deletion AUC to blur", True)}


def evidence(model, variables, images, maps, targets, key, *, step=32, batch_size=1024,
             apply_kwargs=None) -> Evidence:
    """Per-image evidence for `maps` (N, H, W) (raw values; higher = more relevant):
    ROAD's MoRF and LeRF AUC (`road`, imputation noise from `key`) and the deletion AUC
    to a blur (`deletion_insertion`, `step` pixels per point). Compare it with a random
    map's on the same image (`evidence_verdicts`)."""
    roads = road(model, variables, images, maps, targets, key, batch_size=batch_size,
                 apply_kwargs=apply_kwargs)
    blur = deletion_insertion(model, variables, images, maps, targets, step=step,
                              deletion_baseline="blur", batch_size=batch_size,
                              apply_kwargs=apply_kwargs)
    return Evidence(roads["morf_auc"], roads["lerf_auc"], blur["deletion_auc"])


def evidence_verdicts(found: Evidence, random: Evidence) -> Dict[str, np.ndarray]:
    """{field: bool (N,)}: where a map's evidence is worse than the random map's."""
    return {name: (np.asarray(getattr(found, name)) > np.asarray(getattr(random, name)))
            if lower else (np.asarray(getattr(found, name)) < np.asarray(getattr(random, name)))
            for name, (_, lower) in EVIDENCE.items()}


def random_maps(key, shape):
    """Uniform random maps: the reference every method's curves should beat."""
    if (not isinstance(shape, tuple) or len(shape) < 2
            or not all(isinstance(d, int) and d >= 1 for d in shape)):
        raise ValueError(f"shape must be a tuple (..., H, W) of positive ints, got {shape!r}")
    return jax.random.uniform(key, shape)


# ----------------------------------------------------------------------------------------
# More faithfulness, complexity and localisation (the measures Quantus and Captum users
# expect). Each is pure and batch-first; random subsets and perturbations are drawn once
# per key and shared by every image, so an image's score never depends on its batch-mates.


def _target_logits(f, images, targets):
    """(N,) logits of `targets` (int (N,)) of `f(images)`."""
    logits = f(images).astype(jnp.float32)
    return jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


def faithfulness_correlation(model, variables, images, maps, targets, key, *,
                             subset_size=102, n_subsets=100, baseline="zero",
                             batch_size=1024, apply_kwargs=None):
    """Faithfulness correlation (Bhatt et al., IJCAI 2020): the Pearson correlation,
    over `n_subsets` random subsets S of `subset_size` pixels, between the relevance a
    map gives S, Σ_{i∈S} φ_i, and the drop of the target's logit when S is set to the
    baseline, f(x) − f(x_{S←baseline}). A map that is an exact additive decomposition
    of the logit scores 1.

    Args:
        maps: (N, H, W) (relevance per pixel, all channels).
        targets: (N,) classes; `PREDICTED` is each image's prediction.
        key: draws the subsets, the same for every image.
        subset_size: pixels per subset (Quantus's default is 224 of 224²; ours ~10 %).
        baseline: 'zero', 'blur' or 'mean' (`baseline_images`).

    Returns:
        (N,) correlations in [−1, 1] (0 where either side is constant).
    """
    n, h, w, _ = check_batch(images)
    _check_maps(maps, images.shape)
    check_int("subset_size", subset_size, 1)
    check_int("n_subsets", n_subsets, 2)
    if subset_size > h * w:
        raise ValueError(f"subset_size must be at most the {h * w} pixels, got {subset_size}")
    check_int("batch_size", batch_size, 1)
    removed_to = baseline_images(images, baseline)
    f = forward(model, variables, apply_kwargs)
    targets = resolve_targets(f(images), targets)
    full = _target_logits(f, images, targets)
    subsets = jax.vmap(lambda k: jax.random.permutation(k, h * w)[:subset_size])(
        jax.random.split(key, n_subsets))
    masks = jnp.zeros((n_subsets, h * w), bool).at[
        jnp.arange(n_subsets)[:, None], subsets].set(True).reshape(n_subsets, h, w)

    def drop(s, i):
        cut = jnp.where(masks[s][..., None], removed_to[i], images[i])
        return full[i] - _target_logits(f, cut, targets[i])

    drops = map_pairs(drop, n, n_subsets, batch_size, total=False).T  # (N, S)
    relevance = jnp.einsum("nhw,shw->ns", maps.astype(jnp.float32), masks.astype(jnp.float32))
    return pearson(relevance, drops)


def pearson(a, b):
    """Pearson correlation along the last axis; 0 where either side is constant."""
    a = a - jnp.mean(a, axis=-1, keepdims=True)
    b = b - jnp.mean(b, axis=-1, keepdims=True)
    norm = jnp.sqrt(jnp.sum(a**2, axis=-1) * jnp.sum(b**2, axis=-1))
    return jnp.where(norm > 0, jnp.sum(a * b, axis=-1) / jnp.where(norm > 0, norm, 1), 0.0)


def infidelity(model, variables, images, attributions, targets, key, *, n_perturbations=50,
               noise=0.1, multiply_by_inputs=False, normalize=False, batch_size=1024,
               apply_kwargs=None):
    """Infidelity (Yeh et al., NeurIPS 2019): E_I[(Iᵀφ − (f(x) − f(x − I)))²] over
    Gaussian perturbations I ~ N(0, noise²), f the target's logit. Lower is better.

    Args:
        attributions: (N, H, W, C), or (N, H, W) with one perturbation per pixel shared
            by its channels (so a channel-summed map is scored exactly).
        multiply_by_inputs: the attributions are gradient × input style, so the
            perturbation they are paired with is I / x (Captum's `multiply_by_inputs`;
            0 where x = 0): Gradient × Input of a linear model then scores 0.
        normalize: scale each image's attributions by the β that minimises its
            infidelity, β = E[Iᵀφ · Δf] / E[(Iᵀφ)²] (Captum's `normalize`): the measure
            then ignores the map's overall scale, which differs between methods (and a
            random map's is arbitrary), and compares the maps' shapes.
        key: the perturbations, the same for every image.

    Returns:
        (N,) infidelity.
    """
    n, h, w, c = check_batch(images)
    shape = check_array("attributions", attributions)
    if shape not in ((n, h, w), (n, h, w, c)):
        raise ValueError(f"attributions must be (N, H, W) = {(n, h, w)} or (N, H, W, C) = "
                         f"{(n, h, w, c)} to match the images, got shape {shape}")
    per_pixel = len(shape) == 3
    if per_pixel and multiply_by_inputs:
        raise ValueError("multiply_by_inputs needs attributions per channel (N, H, W, C), "
                         f"got shape {shape}")
    check_int("n_perturbations", n_perturbations, 1)
    check_number("noise", noise)
    check_int("batch_size", batch_size, 1)
    f = forward(model, variables, apply_kwargs)
    targets = resolve_targets(f(images), targets)
    full = _target_logits(f, images, targets)
    draws = noise * jax.random.normal(key, (n_perturbations, h, w, 1 if per_pixel else c))
    perturbations = jnp.broadcast_to(draws, (n_perturbations, h, w, c))
    phi = attributions.astype(jnp.float32)

    def error(s, i):
        pert = perturbations[s]
        if per_pixel:
            paired = jnp.sum(pert[..., 0] * phi[i], axis=(1, 2))
        else:
            scale = (jnp.where(images[i] != 0, pert / jnp.where(images[i] != 0, images[i], 1), 0)
                     if multiply_by_inputs else pert)
            paired = jnp.sum(scale * phi[i], axis=(1, 2, 3))
        drop = full[i] - _target_logits(f, images[i] - pert, targets[i])
        return jnp.stack([paired, drop], -1)

    paired, drop = jnp.moveaxis(map_pairs(error, n, n_perturbations, batch_size,
                                          total=False), -1, 0)  # each (S, N)
    if normalize:
        power = jnp.sum(paired**2, axis=0)
        beta = jnp.where(power > 0, jnp.sum(paired * drop, axis=0) / jnp.where(
            power > 0, power, 1), 0.0)
        paired = beta[None] * paired
    return jnp.mean((paired - drop) ** 2, axis=0)


class Sensitivity(NamedTuple):
    """Monte Carlo robustness of an explanation in an L∞ ball (`sensitivity`); each (N,)."""

    max: jax.Array  # max_δ ‖e(x + δ) − e(x)‖ / ‖e(x)‖ (Captum's sensitivity_max)
    avg: jax.Array  # the mean of the same ratio over the draws (Yeh et al.'s average)
    lipschitz: jax.Array  # max_δ ‖e(x + δ) − e(x)‖ / ‖δ‖ (Alvarez-Melis & Jaakkola 2018)
    worst: jax.Array  # (N, H, W, C) the draw δ that gave `max`


def uniform_noise(key, sample, shape, radius):
    """Draw `sample` of the uniform noise on [−radius, radius]^shape: the same draw for
    every image, so an image's value never depends on its batch-mates."""
    return jax.random.uniform(jax.random.fold_in(key, sample), shape, minval=-radius,
                              maxval=radius)


def sensitivity(explain_fn, images, targets, key, *, radius=0.02, n_samples=10,
                batch_size=256) -> Sensitivity:
    """Max- and average sensitivity (Yeh et al., NeurIPS 2019) and a local Lipschitz
    estimate (Alvarez-Melis & Jaakkola 2018) of an explanation, by Monte Carlo.

    Captum's `sensitivity_max` semantics: `n_samples` draws δ uniform in the L∞ ball of
    `radius` (not clipped to [0, 1]), each image explained again for the same target,
    and ‖e(x + δ) − e(x)‖_F / ‖e(x)‖_F, with a zero map's norm taken as 1. Draw s is the
    same noise for every image.

    Args:
        explain_fn: `(images (B, H, W, C), targets (B,)) -> maps (B, ...)`.
        images: (N, H, W, C); targets: (N,) resolved classes (e.g. the predictions).
        batch_size: how many perturbed images are explained at once.

    Returns:
        Sensitivity of (N,) values, and the worst draw per image.
    """
    n = check_batch(images)[0]
    check_number("radius", radius)
    check_int("n_samples", n_samples, 1)
    check_int("batch_size", batch_size, 1)
    base = explain_fn(images, targets).reshape(n, -1)
    base_norm = jnp.linalg.norm(base, axis=-1)
    base_norm = jnp.where(base_norm > 0, base_norm, 1.0)

    def change(s, i):
        noise = jax.vmap(lambda t: uniform_noise(key, t, images.shape[1:], radius))(s)
        moved = explain_fn(images[i] + noise, targets[i]).reshape(len(i), -1)
        return jnp.stack([jnp.linalg.norm(moved - base[i], axis=-1),
                          jnp.linalg.norm(noise.reshape(len(i), -1), axis=-1)], -1)

    changes, radii = jnp.moveaxis(map_pairs(change, n, n_samples, batch_size, total=False),
                                  -1, 0)  # each (S, N)
    ratios = changes / base_norm[None]
    worst = jnp.argmax(ratios, axis=0)
    return Sensitivity(jnp.max(ratios, axis=0), jnp.mean(ratios, axis=0),
                       jnp.max(changes / jnp.maximum(radii, 1e-12), axis=0),
                       jax.vmap(lambda s: uniform_noise(key, s, images.shape[1:], radius))(worst))


def sparseness(maps):
    """Sparseness (Chalasani et al., ICML 2020): the Gini index of |map| over the pixels,
    (N, H, W) -> (N,), scaled by n / (n − 1) so that a one-hot map scores exactly 1 and
    a constant map 0 (Quantus's `Sparseness` is (n − 1) / n times ours). Higher = more
    concentrated. An all-zero map scores 0."""
    shape = check_array("maps", maps)
    if len(shape) != 3 or shape[1] * shape[2] < 2:
        raise ValueError(f"maps must be (N, H, W) with at least 2 pixels, got shape {shape}")
    a = jnp.sort(jnp.abs(maps.reshape(shape[0], -1)).astype(jnp.float32), axis=-1)
    n = a.shape[-1]
    k = jnp.arange(1, n + 1, dtype=jnp.float32)
    total = jnp.sum(a, axis=-1)
    gini = jnp.sum((2 * k[None] - n - 1) * a, axis=-1) / (n * jnp.where(total > 0, total, 1))
    return gini * n / (n - 1)


def complexity(maps):
    """Complexity (Bhatt et al., IJCAI 2020): the entropy (nats) of the pixels' shares of
    |map|, (N, H, W) -> (N,): 0 for a one-hot map, log(H · W) for a constant one.
    Lower = simpler. An all-zero map scores 0."""
    shape = check_array("maps", maps)
    if len(shape) != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {shape}")
    a = jnp.abs(maps.reshape(shape[0], -1)).astype(jnp.float32)
    p = a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1)), 0), axis=-1)


def focus_mosaics(images, labels, key, n_mosaics, *, half_size=False):
    """2 × 2 mosaics of test images of four different classes for `focus` (Arias-Duart
    et al. 2022): the target's image sits in a random quadrant.

    Args:
        images: (M, H, W, C) float; labels: (M,) int, at least four classes present.
        key: picks the images, classes and quadrants.
        half_size: each tile shrunk to (H/2, W/2) (`jax.image.resize`, linear), so the
            mosaic keeps the input size, for models that take only (H, W) (a ViT with
            fixed position embeddings); else the mosaic is (2H, 2W).

    Returns:
        (mosaics (n, 2H, 2W, C) or (n, H, W, C), targets (n,) int, quadrant (n,) int,
        0..3 in raster order: top-left, top-right, bottom-left, bottom-right).
    """
    m, h, w, c = check_batch(images)
    labels = np.asarray(labels)
    if labels.shape != (m,):
        raise ValueError(f"labels must be one class per image, shape ({m},), got shape "
                         f"{labels.shape}")
    classes = np.unique(labels)
    if len(classes) < 4:
        raise ValueError(f"labels must hold at least 4 classes for 2 x 2 mosaics of "
                         f"different classes, got {classes.tolist()}")
    check_int("n_mosaics", n_mosaics, 1)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    by_class = {k: np.flatnonzero(labels == k) for k in classes}
    picks, targets, quadrants = [], [], []
    for _ in range(n_mosaics):
        four = rng.choice(classes, 4, replace=False)
        picks.append([rng.choice(by_class[k]) for k in four])
        quadrant = int(rng.integers(4))
        targets.append(int(four[quadrant]))
        quadrants.append(quadrant)
    tiles = jnp.asarray(images)[np.asarray(picks)]  # (n, 4, H, W, C)
    if half_size:
        tiles = jax.image.resize(tiles, tiles.shape[:2] + (h // 2, w // 2, c), "linear")
    top = jnp.concatenate([tiles[:, 0], tiles[:, 1]], axis=2)
    bottom = jnp.concatenate([tiles[:, 2], tiles[:, 3]], axis=2)
    return (jnp.concatenate([top, bottom], axis=1), jnp.asarray(targets, jnp.int32),
            jnp.asarray(quadrants, jnp.int32))


def focus(maps, quadrants):
    """Focus (Arias-Duart et al., 2022): the share of a mosaic's positive relevance that
    lies in the target's quadrant, (N, H, W), (N,) -> (N,) in [0, 1]; 1 when all of it
    does, 0.25 on average for a random map. A map without positive relevance scores 0."""
    shape = check_array("maps", maps)
    if len(shape) != 3 or shape[1] % 2 or shape[2] % 2:
        raise ValueError(f"maps must be (N, H, W) with even H and W (2 x 2 mosaics), got "
                         f"shape {shape}")
    if check_array("quadrants", quadrants) != shape[:1]:
        raise ValueError(f"quadrants must be one quadrant per map, shape ({shape[0]},), got "
                         f"shape {tuple(quadrants.shape)}")
    n, h, w = shape
    positive = jnp.maximum(maps.astype(jnp.float32), 0)
    per_quadrant = positive.reshape(n, 2, h // 2, 2, w // 2).sum(axis=(2, 4)).reshape(n, 4)
    total = jnp.sum(per_quadrant, axis=-1)
    inside = jnp.take_along_axis(per_quadrant, quadrants[:, None], axis=-1)[:, 0]
    return jnp.where(total > 0, inside / jnp.where(total > 0, total, 1), 0.0)


# ----------------------------------------------------------------------------------------
# Similarity of maps.


def spearman(a, b):
    """Spearman rank correlation of each pair of maps (..., H, W) -> (...).

    Ties get their average rank (as scipy.stats.spearmanr). A constant map shares no
    ranking with anything, so its correlation is defined as 0 rather than NaN.
    """
    _check_pair(a, b)
    a = a.reshape(a.shape[:-2] + (-1,))
    b = b.reshape(b.shape[:-2] + (-1,))
    return pearson(jax.scipy.stats.rankdata(a, axis=-1), jax.scipy.stats.rankdata(b, axis=-1))


def ssim(a, b, *, size=7, sigma=1.5, data_range=1.0):
    """Structural similarity (Wang et al. 2004) of each pair of maps (..., H, W) -> (...).

    Gaussian window of `size` and `sigma`, no padding, constants K1 = 0.01, K2 = 0.03,
    averaged over the window positions; 1 for identical maps. Normalise maps to [0, 1]
    first (`normalize_maps`) so that `data_range` is 1.
    """
    shape = _check_pair(a, b)
    check_int("size", size, 1)
    if min(shape[-2:]) < size:
        raise ValueError(f"maps must be at least size x size = {size}x{size} for the SSIM "
                         f"window, got {shape[-2]}x{shape[-1]}")
    lead = a.shape[:-2]
    a = a.reshape((-1,) + a.shape[-2:] + (1,)).astype(jnp.float32)
    b = b.reshape((-1,) + b.shape[-2:] + (1,)).astype(jnp.float32)
    taps = jnp.exp(-0.5 * ((jnp.arange(size) - size // 2) / sigma) ** 2)
    window = jnp.outer(taps, taps) / jnp.sum(taps) ** 2

    def mean(x):
        return jax.lax.conv_general_dilated(x, window[:, :, None, None], (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = mean(a), mean(b)
    var_a = mean(a * a) - mu_a**2
    var_b = mean(b * b) - mu_b**2
    cov = mean(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return jnp.mean(s, axis=(1, 2, 3)).reshape(lead)


def similarity(maps, reference):
    """{'spearman_abs', 'spearman_signed', 'ssim'} of maps (..., N, H, W) against the
    reference (N, H, W): rank correlation of |map| and of the map, and SSIM of the
    min-max normalised |map| (Adebayo et al.'s three measures)."""
    shape, ref_shape = check_array("maps", maps), check_array("reference", reference)
    if len(ref_shape) != 3 or shape[-3:] != ref_shape:
        raise ValueError(f"reference must be (N, H, W) and maps (..., N, H, W) with the same "
                         f"last three axes, got maps {shape} and reference {ref_shape}")
    reference = jnp.broadcast_to(reference, maps.shape)
    return {"spearman_abs": spearman(jnp.abs(maps), jnp.abs(reference)),
            "spearman_signed": spearman(maps, reference),
            "ssim": ssim(normalize_maps(jnp.abs(maps)), normalize_maps(jnp.abs(reference)))}


def top_k_intersection(a, b, k):
    """The share of the `k` pixels of largest |a| that are among the `k` of largest |b|,
    for each pair of maps (..., H, W) -> (...): 1 when both maps single out the same
    pixels. Ties are broken by position, as `jax.lax.top_k` breaks them."""
    shape = _check_pair(a, b)
    check_int("k", k, 1)
    if k > shape[-1] * shape[-2]:
        raise ValueError(f"k must be at most the {shape[-1] * shape[-2]} pixels of a map, "
                         f"got {k}")
    flat = lambda m: jnp.abs(m).reshape(m.shape[:-2] + (-1,))  # noqa: E731
    top_a, top_b = jax.lax.top_k(flat(a), k)[1], jax.lax.top_k(flat(b), k)[1]
    return jnp.mean(jnp.any(top_a[..., :, None] == top_b[..., None, :], axis=-1), axis=-1)


def map_survival(maps, reference, *, k):
    """{'spearman', 'top_k'}: how much of each reference map (N, H, W) the maps of
    another model for the same images and targets kept (a compressed model against its
    original): the rank correlation of |map| and the top-`k` intersection."""
    _check_pair(maps, reference, ("maps", "reference"))
    return {"spearman": spearman(jnp.abs(maps), jnp.abs(reference)),
            "top_k": top_k_intersection(maps, reference, k)}


# ----------------------------------------------------------------------------------------
# Sanity checks.




def layer_order(model, variables, image_shape=None, apply_kwargs=None):
    """Paths of the modules that hold parameters, in the order the forward pass calls
    them (recorded with `flax.linen.intercept_methods`, so it follows the model, not
    the order of the checkpoint's keys).

    `image_shape` is one image's (H, W, C); default the model's declared `input_shape`.
    """
    import flax.linen as nn  # noqa: PLC0415

    if not hasattr(variables, "keys") or "params" not in variables:
        raise ValueError(f"variables must be the model's variables, a dict with 'params', "
                         f"got {type(variables).__name__}"
                         + (f" with keys {sorted(variables)}" if hasattr(variables, "keys") else ""))
    image_shape = tuple(image_shape or getattr(model, "input_shape", None) or ())
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be one image's (H, W, C), got {image_shape!r} "
                         f"({type(model).__name__} declares no input_shape)")
    order = []

    def record(next_fun, args, kwargs, context):
        path = tuple(context.module.path)
        if context.method_name == "__call__" and path not in order:
            order.append(path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: forward(model, v, apply_kwargs)(jnp.zeros((1,) + image_shape)),
                       variables)
    owners = {key[:-1] for key in traverse_util.flatten_dict(variables["params"])}
    return [path for path in order if path in owners]  # modules holding parameters


def randomization_levels(model, variables, image_shape=None, apply_kwargs=None
                         ) -> List[Tuple[str, Tuple[Tuple[str, ...], ...]]]:
    """The cascade of Adebayo et al.: layers with weights from the output down to the
    first, each with the normalisation layers the forward pass calls right after it.

    Returns:
        [(label, (module paths, ...)), ...], e.g. ('head/Dense_1', (('head', 'Dense_1'),))
        first and ('block1/Conv_0', (('block1', 'Conv_0'), ('block1', 'BatchNorm_0')))
        last for `CIFAR10CNN`.
    """
    groups = []
    for path in layer_order(model, variables, image_shape, apply_kwargs):
        if groups and "norm" in path[-1].lower():
            groups[-1].append(path)
        else:
            groups.append([path])
    # the root's own parameters (e.g. a ViT's class token and position embeddings) have
    # the empty path
    return [("/".join(g[0]) or "(top level)", tuple(g)) for g in reversed(groups)]


def cascading_randomization(model, variables, random_variables, image_shape=None,
                            apply_kwargs=None):
    """The variables of every level of the cascade, stacked on a leading axis.

    Level l has the first l + 1 groups of `randomization_levels(model, variables)`
    re-initialised from `random_variables`, a fresh initialisation of the same model
    (`model.init` with another key); the rest keep their trained values.

    What a re-initialised layer normalises with: given the whole fresh variables
    ({'params', 'batch_stats'}), its BatchNorm takes the fresh running statistics too
    (mean 0, variance 1), so the last level *is* the freshly initialised model. Given
    only fresh 'params', the trained statistics stay; random weights are then normalised
    with statistics of activations they never produce, which scrambles the activations
    far more than a random initialisation does (on the shipped CNN, Grad-CAM's ρ at the
    last level was 0.08 that way, against 0.45 for the fresh model).

    Returns:
        (labels [L], variables with a leading axis L on every leaf).
    """
    fresh = random_variables
    if hasattr(fresh, "keys") and set(fresh) == set(variables) and (
            jax.tree.structure(fresh) == jax.tree.structure(variables)):
        collections = {c: traverse_util.flatten_dict(fresh[c]) for c in fresh}
    elif jax.tree.structure(fresh) == jax.tree.structure(variables["params"]):
        collections = {"params": traverse_util.flatten_dict(fresh)}
    else:
        raise ValueError(f"random_variables must be a fresh initialisation of the same "
                         f"model, its variables {sorted(variables)} or their 'params', "
                         f"got a different tree")
    levels = randomization_levels(model, variables, image_shape, apply_kwargs)
    current = {c: traverse_util.flatten_dict(variables[c]) for c in variables}
    stacked = []
    for _, paths in levels:
        for path in paths:  # every variable of the module at `path` (the root: its own)
            for c, random in collections.items():
                current[c].update({k: v for k, v in random.items()
                                   if k[:len(path)] == path and (path or len(k) == 1)})
        stacked.append({c: traverse_util.unflatten_dict(flat) for c, flat in current.items()})
    return [label for label, _ in levels], jax.tree.map(lambda *a: jnp.stack(a), *stacked)


def randomization_maps(maps_fn, stacked_variables, images, targets):
    """`maps_fn(variables, images, targets) -> maps` (the model's variables are an
    argument here, unlike `sensitivity`'s `explain_fn(images, targets)`) at every level
    of `cascading_randomization`: (L, N, H, W).

    One level after another, so the memory is one level's explanation (not L of them, as
    under `vmap`), through one compiled program whose level index is an argument.
    """
    level = jax.jit(lambda stacked, i, x, t: maps_fn(
        jax.tree.map(lambda v: v[i], stacked), x, t))
    count = len(jax.tree.leaves(stacked_variables)[0])
    return jnp.stack([level(stacked_variables, i, images, targets) for i in range(count)])


def random_other_classes(key, targets, num_classes):
    """A uniformly random class different from each target."""
    check_int("num_classes", num_classes, 2)
    shift = jax.random.randint(key, targets.shape, 1, num_classes)
    return (targets + shift) % num_classes


# ----------------------------------------------------------------------------------------
# Statistics for the cards: an interval on every mean, and a paired test for every
# comparison, so that a near-tie is printed as a tie, not as a win.


def mean_interval(values, seed: int = 0, *, level: float = 0.95, n_resamples: int = 2000):
    """The mean of per-image `values` and its `level` bootstrap percentile interval
    (`scipy.stats.bootstrap`, resampling images): {'mean', 'low', 'high'}."""
    import scipy.stats  # noqa: PLC0415

    values = np.asarray(values, np.float64).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"values must be finite numbers, at least one, got {values!r}")
    mean = float(np.mean(values))
    if values.size == 1 or np.all(values == values[0]):
        return {"mean": mean, "low": mean, "high": mean}
    ci = scipy.stats.bootstrap((values,), np.mean, confidence_level=level,
                               n_resamples=n_resamples, method="percentile",
                               rng=np.random.default_rng(seed)).confidence_interval
    return {"mean": mean, "low": float(ci.low), "high": float(ci.high)}


def paired_verdict(values, reference, *, lower_is_better: bool, alpha: float = 0.05):
    """Whether per-image `values` beat the `reference` on the same images, by the paired
    two-sided Wilcoxon signed-rank test (`scipy.stats.wilcoxon`).

    Returns:
        {'verdict': 'better' | 'worse' | 'tie', 'p_value', 'median_difference'}: 'tie'
        when p >= `alpha` (or every difference is 0); otherwise the side of the median
        difference values − reference.
    """
    import scipy.stats  # noqa: PLC0415

    values = np.asarray(values, np.float64).ravel()
    reference = np.asarray(reference, np.float64).ravel()
    if values.shape != reference.shape or values.size == 0:
        raise ValueError(f"values and reference must be paired, one per image, got shapes "
                         f"{values.shape} and {reference.shape}")
    difference = values - reference
    median = float(np.median(difference))
    if np.all(difference == 0):
        return {"verdict": "tie", "p_value": 1.0, "median_difference": 0.0}
    p = float(scipy.stats.wilcoxon(values, reference).pvalue)
    if not p < alpha or median == 0:
        verdict = "tie"
    else:
        verdict = "better" if (median < 0) == lower_is_better else "worse"
    return {"verdict": verdict, "p_value": p, "median_difference": median}


def summarize(values: Dict[str, jnp.ndarray], axis=-1) -> Dict[str, list]:
    """Means over `axis` as plain floats (or lists of them), for reports."""
    return {k: np.round(np.asarray(jnp.mean(v, axis=axis)), 4).tolist() for k, v in values.items()}
