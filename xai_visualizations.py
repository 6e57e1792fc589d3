"""Explainers for any Flax model, batch-first and jitted: Grad-CAM, Grad-CAM++, saliency,
SmoothGrad, Gradient x Input, Integrated Gradients, occlusion, RISE, Guided Backprop,
Guided Grad-CAM, LRP with composites of rules (`xai_lrp`) and, for attention models,
attention rollout.

Shapes: images are float NHWC in [0, 1], (N, H, W, C) at the size the model takes; maps
are (N, H, W). Targets are int32 (N,), one class per example; `PREDICTED` (-1) means
that example's own argmax. A model is a `flax.linen.Module`, run in eval mode (pass what
its `__call__` needs, e.g. `{"train": False}`, as `apply_kwargs`), or, for the methods
that only need f(x) -> logits, a plain function (see `xai_models`). Layers are Flax
module paths (`layers(model, variables, image_shape)` lists them).

Every method is a pure, jittable function with one calling convention,

    fn(model, variables, images, targets, key, *, batch_size, apply_kwargs, **options)
        -> Attribution(maps, logits, targets, extras)

that returns raw attributions: (N, H, W) maps, or (N, H, W, C) for the gradient methods.
`METHODS` holds one `Method` per name: its function, label, sign, options with their
defaults and checks, and its reduction to an (N, H, W) map; `explain` runs any of them by
name. Channel reduction, normalisation and colouring are separate small functions. The
classes (`Explainer`, and the seed's `GradCAM` and `SaliencyMap`) check their inputs,
bind the model and call one function jitted once in `__init__`.
"""

import functools
import math
import types
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import xai_lrp
import xai_surrogates
from xai_cache import enable_compilation_cache
from xai_core import (EPS, PREDICTED, check_images, check_int, check_number, check_targets,
                      jit_by_batch, map_pairs, normalize_maps, resolve_targets, target_logit)
from xai_models import (abstract_variables, as_grid, check_call, default_layer, forward,
                        UnguidedError, frozen_kwargs, guided, guided_relu, is_module,
                        layers, model_name, resolve_layer, split)

__all__ = ["Attribution", "Explainer", "GradCAM", "IntegratedGradients", "METHODS",
           "options_for", "register", "unregister",
           "enable_compilation_cache",
           "LRP", "Method", "Option", "PREDICTED", "SaliencyMap", "explain", "guided_relu",
           "layers", "normalize_maps", "overlay", "unsupported"]

class Attribution(NamedTuple):
    """What every method returns.

    maps: raw attributions, (N, H, W) or (N, H, W, C); `explain` reduces them to (N, H, W).
    logits: (N, K) of the explained images.
    targets: (N,) the classes explained, `PREDICTED` resolved.
    extras: method-specific values, e.g. Integrated Gradients' 'completeness_gap' (N,).
    """

    maps: jax.Array
    logits: jax.Array
    targets: jax.Array
    extras: Dict[str, jax.Array] = {}


# ----------------------------------------------------------------------------------------
# Pure functions: jittable, no checks, raw values out.


def _target_vjp(fn, x, targets):
    """Gradient of each example's target logit of `fn(x)` w.r.t. `x`, in one backward pass.

    The cotangent is one-hot per example, so no example's gradient mixes with another's.
    """
    logits, vjp = jax.vjp(fn, x)
    targets = resolve_targets(logits, targets)
    (grads,) = vjp(jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype))
    return grads, logits, targets


def input_gradients(model, variables, images, targets, *, apply_kwargs=None):
    """∂y_c/∂x for each example's target logit y_c (before softmax).

    Returns:
        (grads (N, H, W, C), logits (N, K), resolved targets (N,)).
    """
    return _target_vjp(forward(model, variables, apply_kwargs), images, targets)


def layer_gradients(model, variables, images, targets, *, layer=None, apply_kwargs=None):
    """A layer's output A and ∂y_c/∂A, both as (N, h, w, C) grids (`xai_models.as_grid`).

    `layer` is a module path or an alias the model declares; None is the model's
    `explanation_layer`. The split at the layer is `xai_models.split`: no hooks.

    Returns:
        (acts, grads, logits (N, K), resolved targets (N,)).
    """
    path = resolve_layer(model, variables, layer, images.shape, apply_kwargs)
    features, head = split(model, variables, path, apply_kwargs)
    acts = features(images)
    grads, logits, targets = _target_vjp(lambda a: head(images, a), acts, targets)
    return as_grid(acts), as_grid(grads), logits, targets


def _cam(acts, weights, images):
    """ReLU(Σ_k w_k A_k), upsampled bilinearly to the image size."""
    cams = jax.nn.relu(jnp.einsum("nhwk,nk->nhw", acts, weights))
    return jax.image.resize(cams, images.shape[:3], method="bilinear")


def grad_cam(model, variables, images, targets, key=None, *, layer=None, batch_size=None,
             apply_kwargs=None):
    """Grad-CAM (Selvaraju et al. 2017), raw.

    α_k is the spatial mean of ∂y_c/∂A_k for the output A of `layer`, and the map is
    ReLU(Σ_k α_k A_k), upsampled bilinearly to the image size.

    Returns:
        Attribution with maps (N, H, W) >= 0.
    """
    acts, grads, logits, targets = layer_gradients(model, variables, images, targets,
                                                   layer=layer, apply_kwargs=apply_kwargs)
    return Attribution(_cam(acts, jnp.mean(grads, axis=(1, 2)), images), logits, targets)


def grad_cam_plus_plus(model, variables, images, targets, key=None, *, layer=None,
                       batch_size=None, apply_kwargs=None):
    """Grad-CAM++ (Chattopadhay et al. 2018), raw.

    With g = ∂y_c/∂A_k at each position, the pixel weights are
    α = g² / (2g² + Σ_ab A_k,ab · g³) (0 where g = 0), the paper's closed form for an
    exponential output, and the map is ReLU(Σ_k w_k A_k) with w_k = Σ_ij α_ij ReLU(g_ij),
    upsampled bilinearly to the image size.

    Returns:
        Attribution with maps (N, H, W) >= 0.
    """
    acts, grads, logits, targets = layer_gradients(model, variables, images, targets,
                                                   layer=layer, apply_kwargs=apply_kwargs)
    g2 = grads**2
    denominator = 2 * g2 + jnp.sum(acts, axis=(1, 2), keepdims=True) * g2 * grads
    alphas = jnp.where(denominator != 0, g2 / jnp.where(denominator != 0, denominator, 1), 0)
    weights = jnp.sum(alphas * jax.nn.relu(grads), axis=(1, 2))
    return Attribution(_cam(acts, weights, images), logits, targets)


def saliency(model, variables, images, targets, key=None, *, batch_size=None,
             apply_kwargs=None):
    """Vanilla gradients (Simonyan et al. 2014): ∂y_c/∂x, (N, H, W, C)."""
    return Attribution(*input_gradients(model, variables, images, targets,
                                        apply_kwargs=apply_kwargs))


def smooth_grad(grad_fn, images, targets, key, *, n_samples=50, noise_level=0.15,
                batch_size=256):
    """SmoothGrad (Smilkov et al. 2017) around any gradient explainer.

    Averages `grad_fn(x + ε, targets)` over `n_samples` draws of ε ~ N(0, σ²), with
    σ = noise_level · (max − min) of each image. The N · n_samples noisy images run as
    vectorised batches of at most `batch_size`, so memory is bounded by `batch_size`.

    Sample s uses the same standard-normal draw (from `fold_in(key, s)`) for every image,
    scaled by that image's σ: an image's map depends only on the key, never on its
    batch-mates or on `batch_size`. (This holds with JAX's default threefry PRNG; with
    the "rbg" implementations a `vmap` over keys draws other numbers than per-key calls.)

    Args:
        grad_fn: `(images, targets) -> grads` of the images' shape; `targets` are
            resolved class indices (no `PREDICTED`). Any attribution of the input's
            shape works, e.g. Integrated Gradients' attributions.
        images: (N, H, W, C).
        targets: (N,) int, already resolved, e.g. the clean images' predictions.
        key: a `jax.random.key`.

    Returns:
        The mean gradient, (N, H, W, C).
    """
    sigma = noise_level * (jnp.max(images, axis=(1, 2, 3)) - jnp.min(images, axis=(1, 2, 3)))
    noise = jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(key, s), images.shape[1:]))

    def noisy_grads(samples, image):
        noisy = images[image] + sigma[image, None, None, None] * noise(samples)
        return grad_fn(noisy, targets[image])

    return map_pairs(noisy_grads, images.shape[0], n_samples, batch_size,
                    total=True) / n_samples


def smoothgrad(model, variables, images, targets, key, *, n_samples=50, noise_level=0.15,
               batch_size=256, apply_kwargs=None):
    """SmoothGrad of the input gradients: `smooth_grad` around `input_gradients`, with
    each image's target fixed from the clean image; (N, H, W, C)."""
    logits = forward(model, variables, apply_kwargs)(images)
    targets = resolve_targets(logits, targets)
    grad_fn = lambda x, t: input_gradients(model, variables, x, t,
                                           apply_kwargs=apply_kwargs)[0]
    grads = smooth_grad(grad_fn, images, targets, key, n_samples=n_samples,
                        noise_level=noise_level, batch_size=batch_size)
    return Attribution(grads, logits, targets)


def gradient_x_input(model, variables, images, targets, key=None, *, batch_size=None,
                     apply_kwargs=None):
    """Gradient ⊙ Input (Shrikumar et al. 2016): x ⊙ ∂y_c/∂x, (N, H, W, C)."""
    grads, logits, targets = input_gradients(model, variables, images, targets,
                                             apply_kwargs=apply_kwargs)
    return Attribution(images * grads, logits, targets)


def integrated_gradients(model, variables, images, targets, key=None, *, baseline=None,
                         steps=64, batch_size=256, apply_kwargs=None):
    """Integrated Gradients (Sundararajan et al. 2017) of each target logit.

    (x − x′) ⊙ (1/m) Σ_k ∇y_c(x′ + α_k (x − x′)) with the midpoint rule α_k = (k + ½)/m,
    k = 0..m−1. The N · m path points run in batches of at most `batch_size`.

    Args:
        baseline: x′, broadcastable to the images; None is the black image (zeros).
        steps: m, the number of path points.

    Returns:
        Attribution with maps (N, H, W, C) and extras['completeness_gap'] (N,):
        |Σ attributions − (y_c(x) − y_c(x′))| / |y_c(x) − y_c(x′)|, the relative error of
        the Riemann sum, 0 for an exact integral.
    """
    f = forward(model, variables, apply_kwargs)
    baseline = jnp.broadcast_to(0.0 if baseline is None else baseline, images.shape)
    logits = f(images)
    targets = resolve_targets(logits, targets)
    delta = images - baseline

    def path_grads(k, i):
        alpha = ((k + 0.5) / steps)[:, None, None, None]
        return _target_vjp(f, baseline[i] + alpha * delta[i], targets[i])[0]

    grads = map_pairs(path_grads, images.shape[0], steps, batch_size, total=True) / steps
    attributions = delta * grads
    change = target_logit(logits, targets) - target_logit(f(baseline), targets)
    gaps = jnp.abs(jnp.sum(attributions, axis=(1, 2, 3)) - change) / jnp.maximum(
        jnp.abs(change), EPS)
    return Attribution(attributions, logits, targets, {"completeness_gap": gaps})


def occlusion_masks(height, width, patch, stride):
    """(P, H, W) bool: one patch × patch square per position, at `stride` from the
    top-left corner; a last row or column of positions is added so the edges are covered."""
    def starts(size):
        last = max(size - patch, 0)
        return sorted(set(range(0, last + 1, stride)) | {last})

    rows, cols = jnp.arange(height), jnp.arange(width)
    return jnp.stack([
        ((rows >= r) & (rows < r + patch))[:, None] & ((cols >= c) & (cols < c + patch))[None]
        for r in starts(height) for c in starts(width)])


def occlusion(model, variables, images, targets, key=None, *, patch=4, stride=2,
              baseline=0.0, batch_size=256, apply_kwargs=None):
    """Occlusion (Zeiler & Fergus 2014): how much the target logit drops when a square is
    hidden.

    Every patch × patch square at `stride` (all channels) is set to `baseline` in turn;
    a pixel's attribution is the mean drop y_c(x) − y_c(x with the square hidden) over the
    squares that cover it. The N · P occluded images run in batches of `batch_size`.

    Returns:
        Attribution with signed maps (N, H, W).
    """
    f = forward(model, variables, apply_kwargs)
    masks = occlusion_masks(images.shape[1], images.shape[2], patch, stride)
    logits = f(images)
    targets = resolve_targets(logits, targets)
    clean = target_logit(logits, targets)

    def drops(p, i):
        hidden = jnp.where(masks[p][..., None], baseline, images[i])
        return clean[i] - target_logit(f(hidden), targets[i])

    drop = map_pairs(drops, images.shape[0], masks.shape[0], batch_size, total=False)
    coverage = jnp.sum(masks, axis=0)
    maps = jnp.einsum("pn,phw->nhw", drop, masks.astype(drop.dtype)) / jnp.maximum(
        coverage, 1)[None]
    return Attribution(maps, logits, targets)


def rise_masks(key, n_masks, *, cell_size=4, keep_prob=0.5, size=(32, 32)):
    """RISE masks (Petsiuk et al. 2018): (n_masks, H, W) in [0, 1].

    A random binary grid of ceil(H / cell_size) + 1 cells a side, each kept with
    probability `keep_prob`, upsampled bilinearly to cell_size pixels a cell and cropped
    to H × W at a random shift in [0, cell_size) per axis.
    """
    h, w = size
    cells = (-(-h // cell_size) + 1, -(-w // cell_size) + 1)
    grid_key, shift_key = jax.random.split(key)
    grid = jax.random.bernoulli(grid_key, keep_prob, (n_masks,) + cells).astype(jnp.float32)
    up = jax.image.resize(grid, (n_masks, cells[0] * cell_size, cells[1] * cell_size),
                          method="bilinear")
    shifts = jax.random.randint(shift_key, (n_masks, 2), 0, cell_size)
    return jax.vmap(lambda m, s: jax.lax.dynamic_slice(m, (s[0], s[1]), (h, w)))(up, shifts)


def rise(model, variables, images, targets, key, *, n_masks=4000, cell_size=4,
         keep_prob=0.5, batch_size=256, apply_kwargs=None):
    """RISE (Petsiuk et al. 2018): Σ_i P_c(x ⊙ M_i) M_i / (N_masks · keep_prob).

    The same `rise_masks(key, ...)` serve every image, so a map depends only on the key.
    The N · n_masks masked images run in batches of `batch_size`.

    Returns:
        Attribution with maps (N, H, W) >= 0.
    """
    f = forward(model, variables, apply_kwargs)
    masks = rise_masks(key, n_masks, cell_size=cell_size, keep_prob=keep_prob,
                       size=images.shape[1:3])
    logits = f(images)
    targets = resolve_targets(logits, targets)

    def scores(m, i):
        probs = jax.nn.softmax(f(images[i] * masks[m][..., None]))
        return target_logit(probs, targets[i])

    p = map_pairs(scores, images.shape[0], n_masks, batch_size, total=False)
    maps = jnp.einsum("mn,mhw->nhw", p, masks) / (n_masks * keep_prob)
    return Attribution(maps, logits, targets)


def guided_backprop(model, variables, images, targets, key=None, *, batch_size=None,
                    apply_kwargs=None):
    """Guided Backprop (Springenberg et al. 2015): the input gradient with every ReLU's
    backward pass replaced by `guided_relu`'s rule, by rewriting the model's traced
    program (`xai_models.guided`): any ReLU network, no hooks, no model field.

    Returns:
        Attribution with maps (N, H, W, C).
    """
    f = guided(forward(model, variables, apply_kwargs))
    return Attribution(*_target_vjp(f, images, targets))


def guided_grad_cam(model, variables, images, targets, key=None, *, layer=None,
                    batch_size=None, apply_kwargs=None):
    """Guided Grad-CAM (Selvaraju et al. 2017): Guided Backprop ⊙ the upsampled Grad-CAM.

    Returns:
        Attribution with maps (N, H, W, C).
    """
    grads, logits, targets, _ = guided_backprop(model, variables, images, targets,
                                                apply_kwargs=apply_kwargs)
    cams = grad_cam(model, variables, images, targets, layer=layer,
                    apply_kwargs=apply_kwargs).maps
    return Attribution(grads * cams[..., None], logits, targets)


class SownAttention(NamedTuple):
    """What a model sows for attention rollout: its logits, each layer's attention
    probabilities (N, heads, T, T) in the order its layers ran, and, for a model that
    pools its tokens by attention (sequence pooling, `architectures.SequencePool`), the
    pooling weights (N, T), else None."""

    logits: jax.Array
    layers: list
    pooling: Optional[jax.Array]


def attention_probabilities(model, variables, images, apply_kwargs=None) -> SownAttention:
    """The attention probabilities a model sows as `intermediates` named 'attention'
    (as `architectures.SelfAttention` does; an empty list when it sows none), and the
    token pooling weights it sows as 'pooling' (None when it sows none)."""
    logits, state = model.apply(variables, images, mutable=["intermediates"],
                                **dict(apply_kwargs or {}))
    flat = traverse_util.flatten_dict(state.get("intermediates", {}))
    sown = lambda name: [a for path, values in flat.items() if path[-1] == name  # noqa
                         for a in values]
    pooling = sown("pooling")
    return SownAttention(logits, sown("attention"), pooling[-1] if pooling else None)


def attention_rollout(model, variables, images, targets, key=None, *, head_fusion="mean",
                      batch_size=None, apply_kwargs=None):
    """Attention rollout (Abnar & Zuidema 2020): how much each patch flows into the
    token the classifier reads, through every layer's attention and residual path.

    Each layer's attention is fused over its heads (`head_fusion`: the paper's mean, or
    max or min), mixed with the identity for the residual connection, Â = ½A + ½I, and
    renormalised per row; the rollout is Â_L ⋯ Â_1. The map is the row of what the
    classifier reads, laid on the s × s grid and upsampled bilinearly to the image size:
    the class token's row over the patch tokens (T − 1 = s²); for a model that pools its
    tokens by attention (sequence pooling, T = s²), the pooling weights' mix of the rows,
    Σ_t w_t · rollout[t], since the classifier reads Σ_t w_t x_t; otherwise (a mean-pooled
    model, T = s²) the mean of all rows. It does not depend on the class: `targets` are
    only resolved and returned.

    Returns:
        Attribution with maps (N, H, W) >= 0.
    """
    logits, attentions, pooling = attention_probabilities(model, variables, images,
                                                          apply_kwargs)
    fuse = {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}[head_fusion]
    tokens = attentions[0].shape[-1]
    rollout = jnp.eye(tokens)[None]
    for a in attentions:
        a = 0.5 * fuse(a, axis=1) + 0.5 * jnp.eye(tokens)[None]
        rollout = (a / jnp.sum(a, axis=-1, keepdims=True)) @ rollout
    side = math.isqrt(tokens - 1)
    if side * side == tokens - 1:  # a class token first
        flow = rollout[:, 0, 1:]
    else:
        side = math.isqrt(tokens)
        flow = (jnp.mean(rollout, axis=1) if pooling is None
                else jnp.einsum("nt,ntk->nk", pooling, rollout))
    grid = flow.reshape(-1, side, side)
    maps = jax.image.resize(grid, images.shape[:3], method="bilinear")
    return Attribution(maps, logits, resolve_targets(logits, targets))


def lrp(model, variables, images, targets, key=None, *, composite="epsilon_gamma_box",
        epsilon=1e-6, gamma=0.25, batch_size=None, apply_kwargs=None):
    """Layer-wise Relevance Propagation (Bach et al. 2015) with a composite of rules
    (`xai_lrp`): the relevance of each target logit at the image. It starts as the
    logit, and what reaches the image is the logit less what biases and stabilisers
    absorb.

    composite: a name of `xai_lrp.COMPOSITES` (Zennit's composites of the same names),
        or an `xai_lrp.Composite` of your own; epsilon and gamma set the named
        composites' ε and γ.

    Returns:
        Attribution with maps (N, H, W, C), signed, and extras 'relevance_kept' (N,):
        Σ relevance / the logit, the share that reached the image.
    """
    if not isinstance(composite, xai_lrp.Composite):
        composite = xai_lrp.named_composite(composite, epsilon, gamma)

    def start(logits):
        return jax.nn.one_hot(resolve_targets(logits, targets), logits.shape[-1]) * logits

    relevance, logits = xai_lrp.relevance(forward(model, variables, apply_kwargs), images,
                                          start, composite, strip_root=is_module(model))
    targets = resolve_targets(logits, targets)
    logit = target_logit(logits, targets)
    kept = jnp.sum(relevance, axis=tuple(range(1, relevance.ndim))) / jnp.where(
        logit == 0, 1.0, logit)
    return Attribution(relevance, logits, targets, {"relevance_kept": kept})


def _by_segments(surrogate, model, variables, images, targets, key, *, n_samples, segmentation,
                 n_segments, compactness, fill, score, ridge, batch_size, apply_kwargs):
    f = forward(model, variables, apply_kwargs)
    logits = f(images)
    targets = resolve_targets(logits, targets)
    maps, segments, _ = xai_surrogates.explain_by_segments(
        f, images, targets, key, surrogate=surrogate, n_samples=n_samples, score=score,
        segmentation=segmentation, n_segments=n_segments, compactness=compactness,
        fill=fill, ridge=ridge, batch_size=batch_size)
    return Attribution(maps, logits, targets,
                       {"segments": jnp.max(segments, axis=(1, 2)) + 1})


def lime(model, variables, images, targets, key, *, n_samples=1000, segmentation="slic",
         n_segments=64, compactness=10.0, fill="mean", score="probability", ridge=1.0,
         batch_size=256, apply_kwargs=None):
    """LIME (Ribeiro et al. 2016) on superpixels (`xai_surrogates`): the coefficients of a
    weighted ridge surrogate of the target's score over `n_samples` random on/off
    patterns of the segments, as the `lime` package's image explainer fits them.

    segmentation: 'slic' (scikit-image, asked for `n_segments` with `compactness`) or
        'quickshift'; fill: what an off segment shows, its 'mean' colour or a 'blur';
        score: 'probability' (the softmax, as lime) or 'logit'; ridge: the ridge λ.

    Returns:
        Attribution with maps (N, H, W), signed (a pixel carries its segment's
        coefficient), and extras 'segments' (N,): how many segments each image had.
    """
    return _by_segments(xai_surrogates.LIME, model, variables, images, targets, key, n_samples=n_samples,
                        segmentation=segmentation, n_segments=n_segments,
                        compactness=compactness, fill=fill, score=score, ridge=ridge,
                        batch_size=batch_size, apply_kwargs=apply_kwargs)


def kernel_shap(model, variables, images, targets, key, *, n_samples=1000,
                segmentation="slic", n_segments=64, compactness=10.0, fill="mean",
                score="probability", batch_size=256, apply_kwargs=None):
    """KernelSHAP (Lundberg & Lee 2017) on LIME's superpixels: Shapley values of the
    segments from `n_samples` coalitions drawn by the Shapley kernel, fitted under
    Σ φ = score(image) − score(every segment off). Options as `lime`.

    Returns:
        Attribution with maps (N, H, W), signed, and extras 'segments' (N,).
    """
    return _by_segments(xai_surrogates.KERNEL_SHAP, model, variables, images, targets, key,
                        n_samples=n_samples, segmentation=segmentation,
                        n_segments=n_segments, compactness=compactness, fill=fill,
                        score=score, ridge=0.0, batch_size=batch_size,
                        apply_kwargs=apply_kwargs)


def _composite(name, value):
    if isinstance(value, xai_lrp.Composite):
        return value
    return _one_of(name, value, xai_lrp.COMPOSITES)


def _needs_lrp_rules(model, image_shape, apply_kwargs):
    """Why LRP cannot explain `model` (e.g. attention), or None when it can."""
    variables = abstract_variables(model, image_shape, frozen_kwargs(apply_kwargs))
    try:
        jax.eval_shape(lambda v, x: xai_lrp.propagate(forward(model, v, apply_kwargs), x,
                                                      strip_root=is_module(model)),
                       variables, jax.ShapeDtypeStruct(image_shape, jnp.float32))
    except xai_lrp.UnsupportedError as e:
        return str(e)
    return None


def _needs_relu(model, image_shape, apply_kwargs):
    """Why Guided Backprop cannot explain `model`, or None when it can."""
    why = getattr(model, "not_replayable", None)  # e.g. xai_compression's int8 model
    if why:
        return ("Guided Backprop replays the model's program equation by equation, and "
                + why)
    variables = abstract_variables(model, image_shape, frozen_kwargs(apply_kwargs))
    try:
        jax.eval_shape(lambda v, x: guided(forward(model, v, apply_kwargs))(x), variables,
                       jax.ShapeDtypeStruct(image_shape, jnp.float32))
    except UnguidedError as e:
        return str(e)
    return None


def _needs_attention(model, image_shape, apply_kwargs):
    """Why attention rollout cannot explain `model`, or None when it can."""
    if not is_module(model):
        return "attention rollout needs a linen model that sows its attention"
    variables = abstract_variables(model, image_shape, frozen_kwargs(apply_kwargs))
    attentions = jax.eval_shape(
        lambda v, x: attention_probabilities(model, v, x, apply_kwargs), variables,
        jax.ShapeDtypeStruct(image_shape, jnp.float32)).layers
    if not attentions:
        return (f"attention rollout needs a model that sows its attention probabilities "
                f"(N, heads, T, T) as intermediates named 'attention', as "
                f"architectures.ViT does; {model_name(model)} sows none")
    tokens = attentions[0].shape[-1]
    if not any(math.isqrt(t) ** 2 == t for t in (tokens, tokens - 1)):
        return (f"attention rollout lays the tokens on a square grid, but "
                f"{model_name(model)} has {tokens} tokens (neither T nor T - 1 is square)")
    return None


def unsupported(method, model, image_shape=None, apply_kwargs=None) -> Optional[str]:
    """Why `method` cannot explain `model` (e.g. Guided Backprop without ReLUs, attention
    rollout without attention), or None when it can. `image_shape` is one image's
    (H, W, C); default the model's declared `input_shape`."""
    image_shape = image_shape or getattr(model, "input_shape", None)
    requires = METHODS[method].requires
    if requires is None or image_shape is None:
        return None
    return _unsupported_cached(requires, model, (1,) + tuple(image_shape[-3:]),
                               frozen_kwargs(apply_kwargs))


@functools.lru_cache(maxsize=256)
def _unsupported_cached(requires, model, images_shape, apply_kwargs):
    """`unsupported`, traced once per requirement, model, image shape and apply_kwargs
    (the evaluation, the explorer and every Explainer ask again); keyed by the
    requirement itself, so a replaced registry entry is asked afresh."""
    return requires(model, images_shape, dict(apply_kwargs))


def reduce_channels(grads):
    """|grads| maxed over the colour channels: (N, H, W, C) -> (N, H, W) (Simonyan et al.)."""
    return jnp.max(jnp.abs(grads), axis=-1)


def sum_channels(attributions):
    """Signed attributions summed over the colour channels: (N, H, W, C) -> (N, H, W).

    For attributions that add up to a change of the output (Gradient ⊙ Input, Integrated
    Gradients), so that a pixel's value is its share of that change.
    """
    return jnp.sum(attributions, axis=-1)


# ----------------------------------------------------------------------------------------
# Rendering.


def overlay(image, heatmap, alpha=0.4, colormap="jet"):
    """Blends a [0, 1] heatmap, coloured with a matplotlib colormap, over an image.

    Args:
        image: (H, W, 3), or (N, H, W, 3), float in [0, 1] or uint8.
        heatmap: (H, W), or (N, H, W), with values in [0, 1] (a normalised map).
        alpha: weight of the coloured heatmap, in [0, 1].
        colormap: a matplotlib colormap name.

    Returns:
        float32 (..., H, W, 3) in [0, 1]: (1 − alpha) · image + alpha · colour(heatmap).
    """
    import matplotlib  # noqa: PLC0415 (only rendering needs it)

    alpha = check_number("alpha", alpha, upper=1)
    try:
        cmap = matplotlib.colormaps[colormap]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"colormap must be a matplotlib colormap name such as 'jet' or "
                         f"'viridis', got {colormap!r}") from None
    image = np.asarray(image)
    image = image / 255.0 if image.dtype == np.uint8 else image
    heatmap = np.asarray(heatmap, np.float32)
    if image.shape[-1:] != (3,) or image.shape[:-1] != heatmap.shape:
        raise ValueError(f"image must be (..., H, W, 3) and heatmap the matching (..., H, W), "
                         f"got image {image.shape} and heatmap {heatmap.shape}")
    if not np.isfinite(heatmap).all() or heatmap.min() < 0 or heatmap.max() > 1:
        raise ValueError(f"heatmap values must be in [0, 1] (use normalize=True or "
                         f"normalize_maps), got range [{np.nanmin(heatmap):.4g}, "
                         f"{np.nanmax(heatmap):.4g}]")
    colour = cmap(heatmap)[..., :3]
    return np.clip((1 - alpha) * image + alpha * colour, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------------------
# Every method by name.


class Option(NamedTuple):
    """One option of a method.

    default: its value when not given; check: `(name, value) -> value`, raising a
        ValueError or TypeError that names the option.
    choices: the values it takes, where they are few (command-line choices, the
        explorer's select box).
    help: one line for `--help`.
    alias: a deprecated command-line spelling, e.g. 'ig-steps' for
        `--integrated-gradients-steps` (the scripts' flags before the registry made them).
    shown: the explorer offers it beside the method.
    traced: its value may be a traced number, so explainer objects pass it to their
        program as an argument: another value compiles nothing.
    """

    default: Any
    check: Callable = lambda name, value: value
    choices: Optional[tuple] = None
    help: str = ""
    alias: Optional[str] = None
    shown: bool = False
    traced: bool = False


class Method(NamedTuple):
    """One explainer in the registry: everything a script, card, attack or the explorer
    needs to know of it, so that none of them tests its name.

    fn: the pure function, `fn(model, variables, images, targets, key, *, batch_size,
        apply_kwargs, **options) -> Attribution` of raw attributions.
    label: its display name.
    signed: whether its maps carry a sign (positive = evidence for the class).
    options: {name: Option}; a `layer` option makes it a layer method.
    reduce: raw attributions -> (N, H, W) maps.
    passes: `(options, image_shape (H, W, C)) -> (forward, backward)` model passes per image.
    paper: where the method comes from.
    sampling: whether it draws random numbers (then it needs a key).
    requires: `(model, images_shape, apply_kwargs) -> None or why the method cannot
        explain that model`; None for methods that explain any model.
    differentiable: its map is a function of the input gradient of f(x) -> logits, so
        the attacks on explanations step on it through a softplus network.
    cost: the option that sets how many model passes it makes per image (a sample
        count), or None.
    limits: `(options, image_shape (H, W, C)) -> None or why these options cannot
        explain images of that shape` (e.g. a patch larger than the image).
    figures: the demo's figures it appears in: 'detailed' (the detailed figure of each
        image) and 'compare' (the comparison of every shipped network).
    """

    fn: Callable
    label: str
    signed: bool
    options: Dict[str, Option]
    reduce: Callable
    passes: Callable
    paper: str
    sampling: bool = False
    requires: Optional[Callable] = None
    differentiable: bool = False
    cost: Optional[str] = None
    limits: Optional[Callable] = None
    figures: Tuple[str, ...] = ("detailed",)

    @property
    def defaults(self) -> Dict[str, Any]:
        return {name: option.default for name, option in self.options.items()}


def _identity(maps):
    return maps


def _positive(name, value):
    return check_int(name, value, 1)


def _probability(name, value):
    value = check_number(name, value, upper=1)
    if value == 0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return value


def _one_of(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _choice(choices, **kwargs):
    """An option that takes one of `choices`; the first is its default."""
    return Option(choices[0], lambda n, v: _one_of(n, v, choices), choices, **kwargs)


def _baseline_image(name, value):
    return None if value is None else check_images(value, name)[0]


def _within_image(*names):
    """`limits` for options that are lengths inside the image (a patch, a cell)."""
    def limits(options, image_shape):
        side = min(image_shape[:2])
        for name in names:
            if options[name] > side:
                return f"{name} must be at most the image side {side}, got {options[name]}"
        return None
    return limits


_SEGMENT_OPTIONS = {
    "n_samples": Option(1000, _positive, help="perturbations per image",
                        alias="lime-samples"),
    "segmentation": _choice(xai_surrogates.SEGMENTATIONS, help="the superpixels"),
    "n_segments": Option(64, lambda n, v: check_int(n, v, 2), help="SLIC's segments asked for"),
    "compactness": Option(10.0, check_number, help="SLIC's compactness"),
    "fill": _choice(xai_surrogates.FILLS, help="what an off segment shows"),
    "score": _choice(("probability", "logit"), help="the score the surrogate fits"),
}
_LAYER = Option(None)  # None: the model's explanation_layer; checked against the model
_ONE_PASS = lambda options, shape: (1, 1)  # noqa: E731
_REGISTRY: Dict[str, Method] = {}
# The registry, read-only: `register` adds a method.
METHODS: Mapping[str, Method] = types.MappingProxyType(_REGISTRY)


def register(name: str, method: Method, *, replace: bool = False) -> Method:
    """Adds `method` to `METHODS` under `name`: `explain`, the classes, the cards, the
    attacks, the demo's figures and the explorer then offer it. `replace=True` swaps an
    existing entry (returned is the one it replaced, or `method`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not isinstance(method, Method):
        raise TypeError(f"method must be a xai_visualizations.Method, got "
                        f"{type(method).__name__}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"a method named {name!r} is registered already; pass replace=True")
    before = _REGISTRY.get(name, method)
    _REGISTRY[name] = method
    return before


def unregister(name: str) -> Method:
    """Removes `name` from `METHODS` and returns its entry."""
    if name not in _REGISTRY:
        raise ValueError(f"name must be one of {tuple(_REGISTRY)}, got {name!r}")
    return _REGISTRY.pop(name)


for _name, _method in {
    "gradcam": Method(grad_cam, "Grad-CAM", False, {"layer": _LAYER}, _identity, _ONE_PASS,
                      "Selvaraju et al. 2017", figures=("detailed", "compare")),
    "gradcam++": Method(grad_cam_plus_plus, "Grad-CAM++", False, {"layer": _LAYER},
                        _identity, _ONE_PASS, "Chattopadhay et al. 2018"),
    "saliency": Method(saliency, "Saliency", False, {}, reduce_channels, _ONE_PASS,
                       "Simonyan et al. 2014", differentiable=True,
                       figures=("detailed", "compare")),
    "smoothgrad": Method(smoothgrad, "SmoothGrad", False,
                         {"n_samples": Option(50, _positive, help="noisy samples per image",
                                              alias="smoothgrad-samples"),
                          "noise_level": Option(0.15, check_number,
                                                help="σ / (max − min) of each image",
                                                traced=True)},
                         reduce_channels,
                         lambda o, shape: (o["n_samples"] + 1, o["n_samples"]),
                         "Smilkov et al. 2017", sampling=True, differentiable=True,
                         cost="n_samples"),
    "grad_x_input": Method(gradient_x_input, "Gradient × Input", True, {}, sum_channels,
                           _ONE_PASS, "Shrikumar et al. 2016", differentiable=True,
                           figures=()),
    "integrated_gradients": Method(integrated_gradients, "Integrated Gradients", True,
                                   {"steps": Option(64, _positive, help="path points",
                                                    alias="ig-steps"),
                                    "baseline": Option(None, _baseline_image)},
                                   sum_channels,
                                   lambda o, shape: (o["steps"] + 2, o["steps"]),
                                   "Sundararajan et al. 2017", differentiable=True,
                                   cost="steps", figures=("detailed", "compare")),
    "occlusion": Method(occlusion, "Occlusion", True,
                        {"patch": Option(4, _positive, help="square side, px"),
                         "stride": Option(2, _positive, help="stride, px"),
                         "baseline": Option(0.0, lambda n, v: check_number(n, v, upper=1),
                                            help="what the patch shows, in [0, 1]")},
                        _identity,
                        lambda o, shape: (len(occlusion_masks(shape[0], shape[1], o["patch"],
                                                              o["stride"])) + 1, 0),
                        "Zeiler & Fergus 2014", limits=_within_image("patch"), figures=()),
    "rise": Method(rise, "RISE", False,
                   {"n_masks": Option(4000, _positive, help="random masks per image",
                                      alias="rise-masks"),
                    "cell_size": Option(4, _positive, help="mask cell side, px"),
                    "keep_prob": Option(0.5, _probability, help="share of cells kept")},
                   _identity, lambda o, shape: (o["n_masks"] + 1, 0), "Petsiuk et al. 2018",
                   sampling=True, cost="n_masks", limits=_within_image("cell_size"),
                   figures=()),
    "guided_backprop": Method(guided_backprop, "Guided Backprop", False, {}, reduce_channels,
                              _ONE_PASS, "Springenberg et al. 2015", requires=_needs_relu,
                              figures=()),
    "guided_gradcam": Method(guided_grad_cam, "Guided Grad-CAM", False, {"layer": _LAYER},
                             reduce_channels, lambda o, shape: (2, 2), "Selvaraju et al. 2017",
                             requires=_needs_relu, figures=()),
    "lrp": Method(lrp, "LRP", True,
                  {"composite": Option("epsilon_gamma_box", _composite,
                                       tuple(xai_lrp.COMPOSITES),
                                       help="the rule for each layer", shown=True),
                   "epsilon": Option(1e-6, check_number, help="the ε of the ε-rules"),
                   "gamma": Option(0.25, check_number, help="the γ of the γ-rule")},
                  sum_channels, _ONE_PASS, "Bach et al. 2015; Montavon et al. 2019",
                  requires=_needs_lrp_rules),
    "lime": Method(lime, "LIME", True,
                   {**_SEGMENT_OPTIONS, "ridge": Option(1.0, check_number,
                                                        help="the ridge λ")},
                   _identity, lambda o, shape: (o["n_samples"] + 1, 0),
                   "Ribeiro et al. 2016", sampling=True, cost="n_samples"),
    "kernel_shap": Method(kernel_shap, "KernelSHAP", True, _SEGMENT_OPTIONS, _identity,
                          lambda o, shape: (o["n_samples"] + 2, 0), "Lundberg & Lee 2017",
                          sampling=True, cost="n_samples"),
    "attention_rollout": Method(
        attention_rollout, "Attention rollout", False,
        {"head_fusion": _choice(("mean", "max", "min"), help="how heads are fused")},
        _identity, lambda o, shape: (1, 0), "Abnar & Zuidema 2020",
        requires=_needs_attention, figures=()),
}.items():
    register(_name, _method)


def options_for(method, given=(), **shared) -> Dict[str, Any]:
    """`method`'s options that a script sets: `given` as (method, option, value) triples
    (the command line's), then `shared` values for options of those names in any method
    (e.g. `layer=`); an option left unset keeps the registry's default."""
    spec = METHODS[method]
    out = {k: v for k, v in shared.items() if k in spec.options and v is not None}
    out.update({name: value for m, name, value in given if m == method})
    return out


def explain(method, model, variables, images, targets=None, key=None, *, batch_size=256,
            apply_kwargs=None, **options) -> Attribution:
    """Any method of `METHODS` by name, maps reduced to (N, H, W); jittable (close over
    the options). Options are taken as given: `check_options` checks them.

    Args:
        method: a key of `METHODS`.
        model: a flax.linen Module, or a plain function f(x) -> logits.
        images: float (N, H, W, C) in [0, 1]; targets: int (N,), `PREDICTED` allowed;
            None explains each image's prediction.
        key: a `jax.random.key`, needed by the sampling methods (SmoothGrad, RISE).
        batch_size: bounds how many model inputs a sampling method runs at once.
        apply_kwargs: passed to `model.apply` unchanged, e.g. {"train": False}.
        options: the method's own, over its defaults.

    Returns:
        Attribution with maps (N, H, W), logits (N, K), resolved targets (N,) and extras.
    """
    spec = METHODS[method]
    if spec.sampling and key is None:
        raise ValueError(f"key must be a jax.random.key for {method}, which samples, got None")
    images = jnp.asarray(images)
    targets = (jnp.full((images.shape[0],), PREDICTED, jnp.int32) if targets is None
               else jnp.asarray(targets, jnp.int32))
    options = {**spec.defaults, **options}
    program = (_program(method, spec, model, apply_kwargs, batch_size, options)
               if _concrete(variables, images, targets, key, options) else None)
    if program is None:  # under the user's trace, or options that cannot key a program
        out = spec.fn(model, variables, images, targets, key, batch_size=batch_size,
                      apply_kwargs=apply_kwargs, **options)
    else:
        out = program(variables, images, targets, key, _traced_options(spec, options))
    return out._replace(maps=_reducer(spec.reduce)(out.maps))


def _concrete(*trees) -> bool:
    """Whether no leaf of `trees` is traced (an eager call, not one inside a jit)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def _traced_options(spec, options):
    """The options a program takes as arguments (`Option.traced`), not closed over."""
    return {k: v for k, v in options.items() if k in spec.options and spec.options[k].traced}


def _program(method, spec, model, apply_kwargs, batch_size, options):
    """The jitted program that explainer objects of these settings share (`_compile`),
    or None when the settings cannot key one (an option holding an array). An eager
    `explain` runs it, so that it gives an `Explainer`'s maps bit for bit: LRP-ε's
    divisions carry a fused program's other order of float32 sums up to 2e-4 of a map's
    scale."""
    traced = _traced_options(spec, options)
    key = (method, spec.fn, model, frozen_kwargs(apply_kwargs or {}), batch_size,
           tuple(sorted((k, v) for k, v in options.items() if k not in traced)))
    try:
        hash(key)
    except TypeError:
        return None
    return _cached_build(_compile, *key)


@functools.lru_cache(maxsize=None)
def _reducer(reduce):
    """`reduce` (a method's maps (N, H, W, C) -> (N, H, W)), jitted once per function."""
    return jax.jit(reduce)


@functools.partial(jax.jit, static_argnames="normalize")
def _scored(maps, logits, targets, normalize):
    """(maps, predicted classes, softmax probability of each explained class)."""
    scores = target_logit(jax.nn.softmax(logits), targets)
    return normalize_maps(maps) if normalize else maps, jnp.argmax(logits, -1), scores


def check_options(method, model, options, image_shape=None, variables=None,
                  apply_kwargs=None, layer_name="layer"):
    """The method's options over its defaults, each checked; errors name the option.

    A layer is checked against the model's layers when the image shape is known (given,
    or the model's declared `input_shape`); otherwise at the first call.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    spec = METHODS[method]
    unknown = set(options) - set(spec.options)
    if unknown:
        raise TypeError(f"{method} takes the options {tuple(spec.options) or 'none'}, got "
                        f"{sorted(unknown)}")
    checked = {**spec.defaults, **options}
    for name, value in checked.items():
        checked[name] = spec.options[name].check(name, value)
    image_shape = image_shape or getattr(model, "input_shape", None)
    for name, value in checked.items():  # image-valued options, e.g. a baseline image
        if image_shape is not None and getattr(value, "ndim", 0) >= 3 and (
                tuple(value.shape[-3:]) != tuple(image_shape[-3:])):
            raise ValueError(f"{name} must have the images' shape {tuple(image_shape[-3:])},"
                             f" got {tuple(value.shape[-3:])}")
    why = (spec.limits(checked, tuple(image_shape[-3:]))
           if spec.limits is not None and image_shape is not None else None)
    if why:
        raise ValueError(why)
    why = unsupported(method, model, image_shape, apply_kwargs) if is_module(model) else None
    if why:
        raise ValueError(f"method {method!r} cannot explain {model_name(model)}: {why}")
    if "layer" in checked and is_module(model):
        if image_shape is not None:
            shape = (1,) + tuple(image_shape[-3:])
            if variables is None:
                variables = abstract_variables(model, shape,
                                               frozen_kwargs(apply_kwargs))
            resolve_layer(model, variables, checked["layer"], shape, apply_kwargs,
                          name=layer_name)
        elif checked["layer"] is None and default_layer(model) is None:
            raise ValueError(f"{layer_name} must be given: {type(model).__name__} declares "
                             "no explanation_layer; xai_visualizations.layers(model, "
                             "variables, image_shape) lists its layers")
    return checked


# ----------------------------------------------------------------------------------------
# Compilation.


# ----------------------------------------------------------------------------------------
# The public classes: checks on the host, then one jitted call.


def _variables(params, batch_stats):
    if params is None and batch_stats is None:
        return None  # a plain function has no variables
    if not hasattr(params, "keys"):
        raise TypeError(f"params must be the dict of model parameters, got "
                        f"{type(params).__name__}")
    if batch_stats is None:
        return {"params": params}
    if not hasattr(batch_stats, "keys"):
        raise TypeError(f"batch_stats must be the dict of BatchNorm statistics or None, got "
                        f"{type(batch_stats).__name__}")
    return {"params": params, "batch_stats": batch_stats}


def _outputs(maps, preds, scores, single):
    """Numpy results; a single image gives (map (H, W), int, float)."""
    maps, preds, scores = np.asarray(maps), np.asarray(preds), np.asarray(scores)
    if single:
        return maps[0], int(preds[0]), float(scores[0])
    return maps, preds, scores


@functools.lru_cache(maxsize=128)
def _cached_build(build, *key):
    return build(*key)


def _compile(method, fn, model, apply_kwargs, batch_size, options):
    """The one jitted program (`jit_by_batch`) of `method`, whose function is `fn` (a
    replaced registry entry gets programs of its own), with the options that are not
    `traced` closed over: the method's own `Attribution`, maps unreduced. Explainer
    objects and eager `explain` calls of the same settings share it."""
    return jit_by_batch(lambda variables, images, targets, key, traced: fn(
        model, variables, images, targets, key, batch_size=batch_size,
        apply_kwargs=dict(apply_kwargs), **dict(options), **traced))


class Explainer:
    """Any method of `METHODS` behind the seed's calling convention, for any linen model.

    `Explainer(model, "occlusion", patch=8)` checks the options once and jits once;
    `.explain(params, batch_stats, image)` returns `(heatmap, pred_class, score)` like
    `GradCAM.compute_gradcam`. `layer` is a layer method's module path (or an alias the
    model declares); `apply_kwargs` go to `model.apply`, e.g. {"train": False}. A plain
    function f(x) -> logits works for the methods without a layer: pass None as params.
    `layer_name` is what errors call the layer (GradCAM's `target_layer`).
    """

    def __init__(self, model, method, *, layer=None, batch_size=256, apply_kwargs=None,
                 layer_name="layer", **options):
        if method in METHODS and layer is not None:
            if "layer" not in METHODS[method].options:
                raise TypeError(f"{method} takes no {layer_name}, got {layer_name}={layer!r}")
            options["layer"] = layer
        self.model, self.method = model, method
        self.apply_kwargs = dict(apply_kwargs or {})
        self.options = check_options(method, model, options, apply_kwargs=self.apply_kwargs,
                                     layer_name=layer_name)
        self.batch_size = check_int("batch_size", batch_size, 1)
        spec = METHODS[method]
        self._traced = _traced_options(spec, self.options)
        # the program eager `explain` calls of these settings share; an option holding an
        # array (a baseline image) cannot key one, and this object builds its own
        self._explain = (_program(method, spec, model, self.apply_kwargs, self.batch_size,
                                  self.options)
                         or _compile(method, spec.fn, model, frozen_kwargs(self.apply_kwargs),
                                     self.batch_size, tuple(sorted(
                                         (k, v) for k, v in self.options.items()
                                         if k not in self._traced))))

    @property
    def signed(self):
        """Whether raw maps carry a sign (positive = evidence for the class)."""
        return METHODS[self.method].signed

    def _inputs(self, params, batch_stats, image, target_class):
        variables = _variables(params, batch_stats)
        images, single = check_images(image)
        layer = {"layer": self.options["layer"]} if "layer" in self.options else {}
        num_classes = check_call(self.model, variables, images.shape, self.apply_kwargs,
                                 **layer)
        return variables, images, single, check_targets(target_class, len(images),
                                                        num_classes)

    def explain(self, params, batch_stats, image, target_class=None, seed=0, normalize=True):
        """Heatmaps for one image or a batch.

        Args:
            params, batch_stats: the model's variables (`batch_stats` None for a model
                without BatchNorm; both None for a plain function).
            image: (H, W, C) or (N, H, W, C), float in [0, 1] or uint8, at the size the
                model takes.
            target_class: None (each image's predicted class), an int, or N ints.
            seed: the sampling methods' seed (SmoothGrad, RISE); the same seed gives the
                same map.
            normalize: min-max scale each map to [0, 1]; False gives the raw values
                (signed for `signed` methods).

        Returns:
            (heatmap, pred_class, score): heatmap (H, W) or (N, H, W); the argmax class;
            the softmax probability of the explained class.
        """
        variables, images, single, targets = self._inputs(params, batch_stats, image,
                                                          target_class)
        seed = check_int("seed", seed, 0)
        key = jax.random.key(seed) if METHODS[self.method].sampling else None
        out = self._explain(variables, images, targets, key, self._traced)
        maps = _reducer(METHODS[self.method].reduce)(out.maps)
        return _outputs(*_scored(maps, out.logits, out.targets, bool(normalize)), single)

    def visualize(self, image, heatmap, alpha=0.4, colormap="jet"):
        """The heatmap coloured by `colormap` over the image: float (H, W, 3) in [0, 1]."""
        return overlay(image, heatmap, alpha, colormap)


class IntegratedGradients(Explainer):
    """Integrated Gradients (Sundararajan et al. 2017), whose `.attributions` also gives
    the per-channel attributions and the completeness gap."""

    def __init__(self, model, *, batch_size=256, apply_kwargs=None, **options):
        super().__init__(model, "integrated_gradients", batch_size=batch_size,
                         apply_kwargs=apply_kwargs, **options)
        self._attributions = self._explain  # the unreduced Attribution

    def attributions(self, params, batch_stats, image, target_class=None):
        """(attributions (…, H, W, C), completeness gap (…)) for one image or a batch;
        the gap is |Σ attributions − (y_c(x) − y_c(x′))| / |y_c(x) − y_c(x′)|."""
        variables, images, single, targets = self._inputs(params, batch_stats, image,
                                                          target_class)
        out = self._attributions(variables, images, targets, None, self._traced)
        attributions = np.asarray(out.maps)
        gaps = np.asarray(out.extras["completeness_gap"])
        return (attributions[0], float(gaps[0])) if single else (attributions, gaps)


class LRP(Explainer):
    """Layer-wise Relevance Propagation (`xai_lrp`) with a composite of rules, e.g.
    `LRP(model, composite="epsilon_plus_flat")` or a `xai_lrp.Composite` of your own;
    `.explain(params, batch_stats, image)` returns `(heatmap, pred_class, score)` like
    every `Explainer`, the raw map (`normalize=False`) signed."""

    def __init__(self, model, composite="epsilon_gamma_box", *, epsilon=1e-6, gamma=0.25,
                 batch_size=256, apply_kwargs=None):
        super().__init__(model, "lrp", batch_size=batch_size, apply_kwargs=apply_kwargs,
                         composite=composite, epsilon=epsilon, gamma=gamma)


class GradCAM:
    """Grad-CAM for a chosen layer of any linen model, e.g.
    `GradCAM(model, target_layer='conv3')`; the layer defaults to the one the model
    declares (`explanation_layer`). Holds only the model and the layer; each call is
    independent and runs one jitted function, compiled once per input shape.
    """

    def __init__(self, model, target_layer=None, *, apply_kwargs=None):
        self.model, self.target_layer = model, target_layer
        self._gradcam = Explainer(model, "gradcam", layer=target_layer,
                                  apply_kwargs=apply_kwargs, layer_name="target_layer")

    def compute_gradcam(self, params, batch_stats, image, target_class=None, normalize=True):
        """Grad-CAM heatmaps for one image or a batch.

        Args:
            params, batch_stats: the model's variables (`batch_stats` may be None for a
                model without BatchNorm).
            image: (H, W, C) or (N, H, W, C), float in [0, 1] (uint8 0..255 is divided
                by 255).
            target_class: None (each image's predicted class), an int, or N ints.
            normalize: min-max scale each map to [0, 1]; False gives the raw
                ReLU(Σ α_k A_k), comparable across images and classes.

        Returns:
            (heatmap, pred_class, score): heatmap (H, W) or (N, H, W); the argmax class;
            the softmax probability of the explained class.
        """
        return self._gradcam.explain(params, batch_stats, image, target_class,
                                     normalize=normalize)

    def visualize(self, image, heatmap, alpha=0.4, colormap="jet"):
        """The heatmap coloured by `colormap` over the image: float (H, W, 3) in [0, 1]."""
        return overlay(image, heatmap, alpha, colormap)


class SaliencyMap:
    """Vanilla gradient saliency (Simonyan et al. 2014) and SmoothGrad over it, for any
    linen model (or a plain function f(x) -> logits, with params None)."""

    def __init__(self, model, *, apply_kwargs=None):
        self.model, self.apply_kwargs = model, apply_kwargs
        self._saliency = Explainer(model, "saliency", apply_kwargs=apply_kwargs)

    def compute_saliency(self, params, batch_stats, image, target_class=None, normalize=True):
        """|∂y_c/∂x| maxed over colour channels, for one image or a batch.

        Arguments and returns are those of `GradCAM.compute_gradcam`; the raw map
        (`normalize=False`) is the gradient magnitude itself.
        """
        return self._saliency.explain(params, batch_stats, image, target_class,
                                      normalize=normalize)

    def compute_smooth_saliency(self, params, batch_stats, image, n_samples=50,
                                noise_level=0.15, target_class=None, seed=0,
                                batch_size=256, normalize=True):
        """SmoothGrad (Smilkov et al. 2017) of the saliency map.

        The gradients of `n_samples` noisy copies (σ = noise_level · (max − min) of each
        image) are averaged, then reduced like `compute_saliency`. The target is fixed
        per image from the clean image (its prediction, or `target_class`). The same
        `seed` always gives the same map; `batch_size` bounds how many noisy images run
        at once.

        Returns:
            As `compute_saliency`.
        """
        smooth = Explainer(self.model, "smoothgrad", batch_size=batch_size,
                           apply_kwargs=self.apply_kwargs, n_samples=n_samples,
                           noise_level=noise_level)
        return smooth.explain(params, batch_stats, image, target_class, seed, normalize)
