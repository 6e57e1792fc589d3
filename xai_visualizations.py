"""Explainers for the CIFAR-10 CNN: Grad-CAM, saliency and SmoothGrad, batch-first and jitted.

Shapes: images are float NHWC in [0, 1], (N, 32, 32, 3); maps are (N, 32, 32).
Targets are int32 (N,), one class per example; `PREDICTED` (-1) means that example's own
argmax. Every explainer runs the model in eval mode (BatchNorm running statistics), so an
image's map never depends on its batch-mates.

The mathematics lives in pure, jittable functions of `(model, variables, images, targets)`
that return raw attributions. Channel reduction, normalisation and colouring are separate
small functions. The seed's classes `GradCAM` and `SaliencyMap` only check their inputs,
bind the model and call one function jitted once in `__init__`.

A model is explainable when it has `features(x)` (a dict of named activations),
`head_from(act, layer=...)` (that activation to logits), `layer_names` and `num_classes`,
as `CIFAR10CNN` does.
"""

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

PREDICTED = -1
IMAGE_SHAPE = (32, 32, 3)
EPS = 1e-8

# XLA:CPU explains a single image 1.4-1.6x faster with YNNPACK convolutions, while batches
# of 4 or more run faster without them (measured with jax 0.10.2 by
# benchmarks/bench_xai.py --plain-jit). So single images get these options on CPU.
_SINGLE_IMAGE_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                             "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


# ----------------------------------------------------------------------------------------
# Pure functions: jittable, no checks, raw values out.


def resolve_targets(logits, targets):
    """Replaces each `PREDICTED` (negative) target with that example's argmax class."""
    return jnp.where(targets < 0, jnp.argmax(logits, axis=-1), targets).astype(jnp.int32)


def _target_vjp(fn, x, targets):
    """Gradient of each example's target logit of `fn(x)` w.r.t. `x`, in one backward pass.

    The cotangent is one-hot per example, so no example's gradient mixes with another's.
    """
    logits, vjp = jax.vjp(fn, x)
    targets = resolve_targets(logits, targets)
    (grads,) = vjp(jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype))
    return grads, logits, targets


def input_gradients(model, variables, images, targets):
    """∂y_c/∂x for each example's target logit y_c (before softmax).

    Returns:
        (grads (N, H, W, C), logits (N, K), resolved targets (N,)).
    """
    return _target_vjp(lambda x: model.apply(variables, x), images, targets)


def grad_cam(model, variables, images, targets, *, layer="conv3"):
    """Grad-CAM (Selvaraju et al. 2017), raw.

    α_k is the spatial mean of ∂y_c/∂A_k for the activation `layer`, and the map is
    ReLU(Σ_k α_k A_k), upsampled bilinearly to the image size.

    Returns:
        (maps (N, H, W) >= 0, logits (N, K), resolved targets (N,)).
    """
    acts = model.apply(variables, images, method=model.features)[layer]
    head = lambda a: model.apply(variables, a, layer=layer, method=model.head_from)
    grads, logits, targets = _target_vjp(head, acts, targets)
    weights = jnp.mean(grads, axis=(1, 2))
    cams = jax.nn.relu(jnp.einsum("nhwk,nk->nhw", acts, weights))
    cams = jax.image.resize(cams, images.shape[:3], method="bilinear")
    return cams, logits, targets


def smooth_grad(grad_fn, images, targets, key, *, n_samples=50, noise_level=0.15,
                batch_size=256):
    """SmoothGrad (Smilkov et al. 2017) around any gradient explainer.

    Averages `grad_fn(x + ε, targets)` over `n_samples` draws of ε ~ N(0, σ²), with
    σ = noise_level · (max − min) of each image. The N · n_samples noisy images run as
    vectorised batches of at most `batch_size`, so memory is bounded by `batch_size`.

    Sample s uses the same standard-normal draw (from `fold_in(key, s)`) for every image,
    scaled by that image's σ: an image's map depends only on the key, never on its
    batch-mates or on `batch_size`.

    Args:
        grad_fn: `(images, targets) -> grads` of the images' shape; `targets` are
            resolved class indices (no `PREDICTED`).
        images: (N, H, W, C).
        targets: (N,) int, already resolved, e.g. the clean images' predictions.
        key: a `jax.random.key`.

    Returns:
        The mean gradient, (N, H, W, C).
    """
    n = images.shape[0]
    total = n * n_samples
    chunk = min(batch_size, total)
    steps = -(-total // chunk)
    sigma = noise_level * (jnp.max(images, axis=(1, 2, 3)) - jnp.min(images, axis=(1, 2, 3)))
    noise = jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(key, s), images.shape[1:]))

    if steps == 1:  # one vectorised batch: (n_samples, N, ...) -> mean over samples
        noisy = images[None] + sigma[None, :, None, None, None] * noise(
            jnp.arange(n_samples))[:, None]
        grads = grad_fn(noisy.reshape((total,) + images.shape[1:]), jnp.tile(targets, n_samples))
        return jnp.mean(grads.reshape((n_samples,) + images.shape), axis=0)

    # Chunks of (sample, image) pairs, sample-major. XLA:CPU runs the backward
    # convolutions about 3x slower inside a loop (it folds the kernel transpose into the
    # convolution there), so the loop is used only when memory needs it.
    def step(total_grads, flat):
        sample, image = flat // n, flat % n
        noisy = images[image] + sigma[image, None, None, None] * noise(sample)
        grads = grad_fn(noisy, targets[image])
        grads = jnp.where((flat < total)[:, None, None, None], grads, 0)
        return total_grads.at[image].add(grads), None

    flat = jnp.arange(steps * chunk).reshape(steps, chunk)
    total_grads, _ = jax.lax.scan(step, jnp.zeros_like(images), flat)
    return total_grads / n_samples


def reduce_channels(grads):
    """|grads| maxed over the colour channels: (N, H, W, C) -> (N, H, W) (Simonyan et al.)."""
    return jnp.max(jnp.abs(grads), axis=-1)


def normalize_maps(maps, eps=EPS):
    """Min-max scales each (H, W) map to [0, 1]; a constant map becomes all zeros."""
    lo = jnp.min(maps, axis=(-2, -1), keepdims=True)
    hi = jnp.max(maps, axis=(-2, -1), keepdims=True)
    return (maps - lo) / (hi - lo + eps)


def _finish(maps, logits, targets, normalize):
    """(maps, predicted classes, softmax probability of each explained class)."""
    scores = jnp.take_along_axis(jax.nn.softmax(logits), targets[:, None], axis=-1)[:, 0]
    return normalize_maps(maps) if normalize else maps, jnp.argmax(logits, -1), scores


def _gradcam_outputs(model, layer, variables, images, targets, normalize):
    maps, logits, targets = grad_cam(model, variables, images, targets, layer=layer)
    return _finish(maps, logits, targets, normalize)


def _saliency_outputs(model, variables, images, targets, normalize):
    grads, logits, targets = input_gradients(model, variables, images, targets)
    return _finish(reduce_channels(grads), logits, targets, normalize)


def _smooth_saliency_outputs(model, variables, images, targets, key, normalize,
                             n_samples, noise_level, batch_size):
    logits = model.apply(variables, images)
    targets = resolve_targets(logits, targets)
    grad_fn = lambda x, t: input_gradients(model, variables, x, t)[0]
    grads = smooth_grad(grad_fn, images, targets, key, n_samples=n_samples,
                        noise_level=noise_level, batch_size=batch_size)
    return _finish(reduce_channels(grads), logits, targets, normalize)


@functools.lru_cache(maxsize=None)
def _compiler_options():
    """The single-image CPU options when this backend and jaxlib accept them, else None."""
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=_SINGLE_IMAGE_CPU_OPTIONS)(jnp.zeros(()))
    except Exception:  # a jaxlib without the option: plain jit everywhere
        return None
    return _SINGLE_IMAGE_CPU_OPTIONS


def _jit(fn, **kwargs):
    """jax.jit of `fn(variables, images, ...)`, compiled with `_compiler_options()` for
    single images and plainly for batches; each compiles once per shape."""
    batched = jax.jit(fn, **kwargs)
    options = _compiler_options()
    if options is None:
        return batched
    single = jax.jit(fn, compiler_options=options, **kwargs)
    return lambda variables, images, *args, **kw: (
        single if images.shape[0] == 1 else batched)(variables, images, *args, **kw)


# ----------------------------------------------------------------------------------------
# Input checks for the public classes: each message names the argument, what was
# expected and what was given.


def check_images(image, name="image"):
    """Returns `image` as a float32 batch (N, 32, 32, 3) and whether it was a single image.

    uint8 input is taken as 0..255 and divided by 255; float input must lie in [0, 1].
    """
    if not isinstance(image, (np.ndarray, jax.Array)):
        if not isinstance(image, (list, tuple)):
            raise TypeError(f"{name} must be an array of shape {IMAGE_SHAPE} or "
                            f"(N, {', '.join(map(str, IMAGE_SHAPE))}), got {type(image).__name__}")
        image = np.asarray(image)
    shape = tuple(image.shape)
    if shape[-3:] != IMAGE_SHAPE or len(shape) not in (3, 4):
        raise ValueError(f"{name} must have shape {IMAGE_SHAPE} or "
                         f"(N, {', '.join(map(str, IMAGE_SHAPE))}), got {shape}")
    if len(shape) == 4 and shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image, got shape {shape}")
    xp = jnp if isinstance(image, jax.Array) else np
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255
    elif not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"{name} must be float in [0, 1] or uint8 in 0..255, got dtype "
                        f"{image.dtype}")
    else:
        if not bool(xp.isfinite(image).all()):
            raise ValueError(f"{name} must be finite, got NaN or inf values")
        lo, hi = float(image.min()), float(image.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"{name} values must be in [0, 1] (divide 0..255 images by "
                             f"255), got range [{lo:.4g}, {hi:.4g}]")
    single = len(shape) == 3
    image = jnp.asarray(image, jnp.float32)
    return (image[None] if single else image), single


def check_targets(target_class, n, num_classes):
    """Returns int32 targets (n,) from None, one int, or n ints in [0, num_classes)."""
    expected = f"None, an int in [0, {num_classes}) or an array of {n} such ints"
    if target_class is None:
        return jnp.full((n,), PREDICTED, jnp.int32)
    if isinstance(target_class, (bool, np.bool_)):
        raise TypeError(f"target_class must be {expected}, got {target_class!r}")
    if isinstance(target_class, numbers.Integral):
        targets = np.full((n,), int(target_class))
    else:
        targets = np.asarray(target_class)
        if not np.issubdtype(targets.dtype, np.integer):
            raise TypeError(f"target_class must be {expected}, got dtype {targets.dtype}")
        if targets.ndim == 0:
            targets = np.full((n,), int(targets))
        elif targets.shape != (n,):
            raise ValueError(f"target_class must be {expected}, got shape {targets.shape}")
    bad = targets[(targets < 0) | (targets >= num_classes)]
    if bad.size:
        raise ValueError(f"target_class must be in [0, {num_classes}), got {bad[0]}")
    return jnp.asarray(targets, jnp.int32)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_fraction(name, value, upper=None):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or value < 0 or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else "finite and >= 0"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")
    return float(value)


def _variables(params, batch_stats):
    if not hasattr(params, "keys"):
        raise TypeError(f"params must be the dict of model parameters, got "
                        f"{type(params).__name__}")
    if batch_stats is None:
        return {"params": params}
    return {"params": params, "batch_stats": batch_stats}


def _outputs(maps, preds, scores, single):
    """Numpy results; a single image gives (map (H, W), int, float)."""
    maps, preds, scores = np.asarray(maps), np.asarray(preds), np.asarray(scores)
    if single:
        return maps[0], int(preds[0]), float(scores[0])
    return maps, preds, scores


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

    alpha = _check_fraction("alpha", alpha, upper=1)
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
# The seed's classes.


class GradCAM:
    """Grad-CAM for a chosen layer, e.g. `GradCAM(model, target_layer='conv3')`.

    Holds only the model and the layer; each call is independent and runs one jitted
    function, compiled once per input shape.
    """

    def __init__(self, model, target_layer="conv3"):
        names = tuple(getattr(model, "layer_names", ()))
        if target_layer not in names:
            raise ValueError(f"target_layer must be one of {names}, got {target_layer!r}")
        self.model, self.target_layer = model, target_layer
        self._explain = _jit(functools.partial(_gradcam_outputs, model, target_layer),
                             static_argnames="normalize")

    def compute_gradcam(self, params, batch_stats, image, target_class=None, normalize=True):
        """Grad-CAM heatmaps for one image or a batch.

        Args:
            params, batch_stats: the model's variables (`batch_stats` may be None for a
                model without BatchNorm).
            image: (32, 32, 3) or (N, 32, 32, 3), float in [0, 1] (uint8 0..255 is
                divided by 255).
            target_class: None (each image's predicted class), an int, or N ints.
            normalize: min-max scale each map to [0, 1]; False gives the raw
                ReLU(Σ α_k A_k), comparable across images and classes.

        Returns:
            (heatmap, pred_class, score): heatmap (32, 32) or (N, 32, 32); the argmax
            class; the softmax probability of the explained class.
        """
        images, single = check_images(image)
        targets = check_targets(target_class, len(images), self.model.num_classes)
        out = self._explain(_variables(params, batch_stats), images, targets,
                            normalize=bool(normalize))
        return _outputs(*out, single)

    def visualize(self, image, heatmap, alpha=0.4, colormap="jet"):
        """The heatmap coloured by `colormap` over the image: float (32, 32, 3) in [0, 1]."""
        return overlay(image, heatmap, alpha, colormap)


class SaliencyMap:
    """Vanilla gradient saliency (Simonyan et al. 2014) and SmoothGrad over it."""

    def __init__(self, model):
        self.model = model
        self._saliency = _jit(functools.partial(_saliency_outputs, model),
                              static_argnames="normalize")
        self._smooth = _jit(functools.partial(_smooth_saliency_outputs, model),
                            static_argnames=("normalize", "n_samples", "batch_size"))

    def compute_saliency(self, params, batch_stats, image, target_class=None, normalize=True):
        """|∂y_c/∂x| maxed over colour channels, for one image or a batch.

        Arguments and returns are those of `GradCAM.compute_gradcam`; the raw map
        (`normalize=False`) is the gradient magnitude itself.
        """
        images, single = check_images(image)
        targets = check_targets(target_class, len(images), self.model.num_classes)
        out = self._saliency(_variables(params, batch_stats), images, targets,
                             normalize=bool(normalize))
        return _outputs(*out, single)

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
        images, single = check_images(image)
        targets = check_targets(target_class, len(images), self.model.num_classes)
        n_samples = _check_int("n_samples", n_samples, 1)
        batch_size = _check_int("batch_size", batch_size, 1)
        noise_level = _check_fraction("noise_level", noise_level)
        seed = _check_int("seed", seed, 0)
        out = self._smooth(_variables(params, batch_stats), images, targets,
                           jax.random.key(seed), normalize=bool(normalize),
                           n_samples=n_samples, noise_level=noise_level,
                           batch_size=batch_size)
        return _outputs(*out, single)
