"""LIME and KernelSHAP for images: superpixels, coalitions of them, and a weighted linear
surrogate of the model, fitted for every image at once.

Both methods switch superpixels (segments) on and off, run the model on the perturbed
images and fit a linear model of its score on the on/off pattern z ∈ {0, 1}^M:
- LIME (Ribeiro et al. 2016), as the `lime` package's image explainer: z uniform on
  {0, 1}^M (the first sample all on), weights √exp(−d²/w²) of the cosine distance d
  between z and the all-on pattern (w = 0.25), and a weighted ridge regression with an
  intercept (λ = 1, as sklearn's `Ridge` that lime uses);
- KernelSHAP (Lundberg & Lee 2017): coalition sizes k drawn with probability
  ∝ (M − 1)/(k (M − k)), the Shapley kernel, so the samples weigh equally, and a least
  squares fit under the efficiency constraint Σ φ = f(all on) − f(all off). On a model
  that is linear in the segments it gives the exact Shapley values.

Segments come from scikit-image (SLIC by default; quickshift on request) through a host
callback, so both methods stay one jitted program; all the perturbed forward passes run
in vectorised batches bounded by `batch_size`. Every draw comes from an explicit key:
the same key gives the same map.

Shapes: images (N, H, W, C) in [0, 1]; segments (N, H, W) int32, 0..M_n − 1 for an image
with M_n segments, at most `capacity` of them.
"""

import functools
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xai_core import gaussian_blur, map_pairs

SEGMENTATIONS = ("slic", "quickshift")
FILLS = ("mean", "blur")
LIME_KERNEL_WIDTH = 0.25  # lime_image's default kernel width, on cosine distance
QUICKSHIFT = {"kernel_size": 2, "max_dist": 6, "ratio": 0.5}  # 5–77 segments on CIFAR-10


def capacity(n_segments: int) -> int:
    """The most segments an image may have: twice what SLIC is asked for (SLIC gave
    42–61 for 64 on the first 200 CIFAR-10 test images)."""
    return 2 * n_segments


def segment_numpy(images, segmentation="slic", n_segments=64, compactness=10.0):
    """scikit-image superpixels of float images (N, H, W, C) in [0, 1]: (N, H, W) int32
    labels 0..M_n − 1. Labels past `capacity(n_segments)` − 1 are merged into the last."""
    try:
        import skimage.segmentation as seg  # noqa: PLC0415
    except ImportError as error:  # the GPU machine has no scikit-image
        raise ImportError("LIME and KernelSHAP segment images with scikit-image: "
                          "pip install scikit-image") from error
    images = np.asarray(images, np.float64)
    out = np.empty(images.shape[:3], np.int32)
    for i, image in enumerate(images):
        if segmentation == "slic":
            labels = seg.slic(image, n_segments=n_segments, compactness=compactness,
                              start_label=0, channel_axis=-1)
        else:
            labels = seg.quickshift(image, **QUICKSHIFT)
        labels = seg.relabel_sequential(labels)[0]
        out[i] = np.minimum(labels, capacity(n_segments) - 1)
    _warn_if_unsegmented(out, segmentation)
    return out


def _warn_if_unsegmented(segments, segmentation):
    """One warning naming the images with fewer than 2 segments: a surrogate of one
    segment has nothing to compare, so their maps are constant."""
    alone = np.flatnonzero(segments.reshape(len(segments), -1).max(axis=1) < 1)
    if len(alone) == 0:
        return
    options = ("a larger n_segments or a smaller compactness, or segmentation='quickshift'"
               if segmentation == "slic" else "segmentation='slic' with a larger n_segments")
    warnings.warn(f"LIME and KernelSHAP found a single segment in image(s) "
                  f"{', '.join(map(str, alone))} of the batch ({segmentation}), so their "
                  f"maps are constant there: try {options}", UserWarning, stacklevel=2)


def segment(images, segmentation="slic", n_segments=64, compactness=10.0):
    """`segment_numpy` as a host callback: usable inside jit. The segments are piecewise
    constant in the images, so they pass no gradient: LIME and KernelSHAP differentiate
    (as the attacks on explanations need) through their perturbed forward passes only."""
    fn = functools.partial(segment_numpy, segmentation=segmentation, n_segments=n_segments,
                           compactness=compactness)
    return jax.pure_callback(fn, jax.ShapeDtypeStruct(images.shape[:3], jnp.int32),
                             jax.lax.stop_gradient(images), vmap_method="sequential")


def perturbed(image, segs, filled, z):
    """image with the segments where z is 0 replaced by `filled`."""
    return jnp.where(z[segs][..., None] > 0, image, filled)


def present(segments, m):
    """(N, M) whether each segment label occurs in each image."""
    return jnp.arange(m)[None] < (jnp.max(segments, axis=(1, 2)) + 1)[:, None]


def lime_coalitions(key, n_samples, m):
    """(S, M) uniform on/off patterns, the first all on (as lime draws them)."""
    z = jax.random.bernoulli(key, 0.5, (n_samples, m)).astype(jnp.float32)
    return z.at[0].set(1.0)


def lime_weights(z, mask, width=LIME_KERNEL_WIDTH):
    """√exp(−d²/w²) of the cosine distance d between each pattern's present segments and
    the all-on pattern: (S,) for z (S, M) and an image's presence mask (M,)."""
    zm = z * mask[None]
    cosine = jnp.sum(zm, -1) / (jnp.sqrt(jnp.sum(zm, -1)) * jnp.sqrt(jnp.sum(mask)) + 1e-12)
    d = 1.0 - cosine
    return jnp.sqrt(jnp.exp(-(d ** 2) / width ** 2))


def weighted_ridge(z, y, weights, mask, ridge):
    """Coefficients (M,) of y ≈ c + z·β by weighted ridge regression with an unpenalised
    intercept (sklearn's `Ridge(alpha=ridge).fit(z, y, sample_weight=weights)`), over the
    present segments; absent ones get 0."""
    z = z * mask[None]
    w = weights / jnp.sum(weights)
    zc = z - jnp.sum(w[:, None] * z, 0)[None]
    yc = y - jnp.sum(w * y)
    a = zc.T @ (w[:, None] * zc) * jnp.sum(weights) + ridge * jnp.eye(z.shape[1])
    a = a + jnp.diag(1.0 - mask)  # absent segments: a 1 on the diagonal, β = 0
    b = zc.T @ (w * yc) * jnp.sum(weights)
    return jnp.linalg.solve(a, b) * mask


def shapley_coalitions(key, n_samples, mask):
    """(S, M) coalitions of an image's M_n present segments (mask (M,)): sizes k in
    1..M_n − 1 drawn with probability ∝ (M_n − 1)/(k (M_n − k)), then k of the present
    segments uniformly."""
    m = mask.shape[0]
    count = jnp.sum(mask)
    k = jnp.arange(1, m, dtype=jnp.float32)
    logits = jnp.where(k < count, jnp.log(jnp.maximum(count - 1, 1)) - jnp.log(k)
                       - jnp.log(jnp.maximum(count - k, 1)), -jnp.inf)
    size_key, pick_key = jax.random.split(key)
    sizes = 1 + jax.random.categorical(size_key, logits, shape=(n_samples,))
    order = jnp.where(mask[None] > 0, jax.random.uniform(pick_key, (n_samples, m)), 2.0)
    ranks = jnp.argsort(jnp.argsort(order, axis=-1), axis=-1)
    return (ranks < sizes[:, None]).astype(jnp.float32)


def constrained_shapley(z, y, full, empty, mask):
    """Shapley values φ (M,) from coalitions z (S, M) and scores y (S,), with
    Σ φ = full − empty exactly: the last present segment's φ is eliminated, the others
    fitted by least squares (minimum norm when the samples do not determine them)."""
    m = mask.shape[0]
    last = (jnp.sum(mask) - 1).astype(jnp.int32)
    z_last = z[:, last]
    free = mask * (jnp.arange(m) != last)
    x = (z - z_last[:, None]) * free[None]
    target = y - empty - z_last * (full - empty)
    phi = jnp.linalg.lstsq(x, target)[0] * free
    return phi.at[last].set(full - empty - jnp.sum(phi))


class Surrogate(NamedTuple):
    """How a segment method draws its coalitions and fits its coefficients.

    coalitions: `(key, n_samples, mask (M,)) -> (S, M)` on/off patterns of the segments;
    fit: `(z (S, M), y (S,), mask (M,), full, empty, ridge) -> (M,)` coefficients, where
        `full` and `empty` are the score with every segment on and off.
    """

    coalitions: Callable
    fit: Callable


def _lime_fit(z, y, mask, full, empty, ridge):
    return weighted_ridge(z, y, lime_weights(z, mask), mask, ridge)


def _shapley_fit(z, y, mask, full, empty, ridge):
    return constrained_shapley(z, y, full, empty, mask)


# LIME draws one set of patterns for every image (lime's uniform draws); KernelSHAP draws
# each image's coalitions from the Shapley kernel over its own segments, with one key, so
# an image's map never depends on its place in the batch.
LIME = Surrogate(lambda key, n, mask: lime_coalitions(key, n, mask.shape[0]), _lime_fit)
KERNEL_SHAP = Surrogate(shapley_coalitions, _shapley_fit)


def explain_by_segments(f: Callable, images, targets, key, *, surrogate: Surrogate,
                        n_samples, score, segmentation, n_segments, compactness, fill,
                        ridge, batch_size):
    """Maps (N, H, W) of a segment surrogate (`LIME` or `KERNEL_SHAP`): each pixel carries
    its segment's coefficient. `f(x) -> logits`; `score` 'probability' (softmax, as lime
    explains) or 'logit'; `targets` resolved; `fill` 'mean' or 'blur'
    (`xai_core.gaussian_blur`). Returns (maps, segments, coefficients (N, M))."""
    segments = segment(images, segmentation, n_segments, compactness)
    m = capacity(n_segments)
    mask = present(segments, m).astype(jnp.float32)
    # what an off segment shows: its mean colour (lime's default) or a blurred image
    filled = gaussian_blur(images) if fill == "blur" else _segment_means(images, segments, m)

    def target_score(x, t):
        logits = f(x)
        values = jax.nn.softmax(logits) if score == "probability" else logits
        return jnp.take_along_axis(values, t[:, None], axis=-1)[:, 0]

    z = jax.vmap(lambda msk: surrogate.coalitions(key, n_samples, msk))(mask)

    def scores(s, i):
        x = jax.vmap(perturbed)(images[i], segments[i], filled[i], z[i, s])
        return target_score(x, targets[i])

    y = map_pairs(scores, images.shape[0], n_samples, batch_size, total=False).T  # (N, S)
    full, empty = target_score(images, targets), target_score(filled, targets)
    coef = jax.vmap(surrogate.fit, in_axes=(0, 0, 0, 0, 0, None))(z, y, mask, full, empty,
                                                                   ridge)
    maps = jnp.take_along_axis(coef, segments.reshape(segments.shape[0], -1), axis=1)
    return maps.reshape(segments.shape), segments, coef


def _segment_means(images, segments, m):
    one_hot = jax.nn.one_hot(segments, m, dtype=images.dtype)  # (N, H, W, M)
    sums = jnp.einsum("nhwm,nhwc->nmc", one_hot, images)
    means = sums / jnp.maximum(jnp.sum(one_hot, axis=(1, 2)), 1)[..., None]
    return jnp.einsum("nhwm,nmc->nhwc", one_hot, means)
