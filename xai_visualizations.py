"""Explainers for the CIFAR-10 CNN, batch-first and jitted: Grad-CAM, Grad-CAM++, saliency,
SmoothGrad, Gradient x Input, Integrated Gradients, occlusion, RISE, Guided Backprop and
Guided Grad-CAM.

Shapes: images are float NHWC in [0, 1], (N, 32, 32, 3); maps are (N, 32, 32).
Targets are int32 (N,), one class per example; `PREDICTED` (-1) means that example's own
argmax. Every explainer runs the model in eval mode (BatchNorm running statistics), so an
image's map never depends on its batch-mates.

The mathematics lives in pure, jittable functions of `(model, variables, images, targets)`
that return raw attributions. Channel reduction, normalisation and colouring are separate
small functions. `METHODS` names every method and `explain` runs any of them by name. The
seed's classes `GradCAM` and `SaliencyMap`, and `Explainer` with its subclasses, only
check their inputs, bind the model and call one function jitted once in `__init__`.

A model is explainable when it has `features(x)` (a dict of named activations),
`head_from(act, layer=...)` (that activation to logits), `layer_names` and `num_classes`,
as `CIFAR10CNN` does.
"""

import functools
import numbers
from typing import Any, Callable, Dict, NamedTuple

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


def map_pairs(fn, n, count, batch_size, *, total):
    """Evaluates `fn(samples, images)` on every (sample, image) pair of `count` × `n`.

    `fn` takes two int32 index arrays of one length B and returns (B, ...). Pairs run
    sample-major as one vectorised call when `count · n <= batch_size`, else in chunks
    of `batch_size` inside a `lax.scan`, so `batch_size` bounds the memory of every
    sampling method. XLA:CPU runs backward convolutions about 3x slower inside a loop
    (it folds the kernel transpose into the convolution there), so the loop is used
    only when memory needs it.

    Returns:
        total=True: Σ_s fn(s, i) for each image i, (n, ...);
        total=False: every output, (count, n, ...).
    """
    pairs = n * count
    chunk = min(batch_size, pairs)
    steps = -(-pairs // chunk)
    if steps == 1:
        flat = jnp.arange(pairs, dtype=jnp.int32)
        out = fn(flat // n, flat % n)
        out = out.reshape((count, n) + out.shape[1:])
        return jnp.sum(out, axis=0) if total else out
    flat = jnp.arange(steps * chunk, dtype=jnp.int32).reshape(steps, chunk)
    index = jnp.zeros((chunk,), jnp.int32)
    out_shape = jax.eval_shape(fn, index, index)
    if total:
        def step(acc, f):
            valid = f < pairs
            f = jnp.minimum(f, pairs - 1)
            out = fn(f // n, f % n)
            out = jnp.where(valid.reshape((-1,) + (1,) * (out.ndim - 1)), out, 0)
            return acc.at[f % n].add(out), None

        acc = jnp.zeros((n,) + out_shape.shape[1:], out_shape.dtype)
        return jax.lax.scan(step, acc, flat)[0]

    def step(_, f):
        f = jnp.minimum(f, pairs - 1)
        return None, fn(f // n, f % n)

    outs = jax.lax.scan(step, None, flat)[1]
    outs = outs.reshape((steps * chunk,) + out_shape.shape[1:])[:pairs]
    return outs.reshape((count, n) + out_shape.shape[1:])


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


def gradient_x_input(model, variables, images, targets):
    """Gradient ⊙ Input (Shrikumar et al. 2016): x ⊙ ∂y_c/∂x.

    Returns:
        (attributions (N, H, W, C), logits (N, K), resolved targets (N,)).
    """
    grads, logits, targets = input_gradients(model, variables, images, targets)
    return images * grads, logits, targets


def _target_logit(logits, targets):
    return jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


def integrated_gradients(model, variables, images, targets, *, baseline=None, steps=64,
                         batch_size=256):
    """Integrated Gradients (Sundararajan et al. 2017) of each target logit.

    (x − x′) ⊙ (1/m) Σ_k ∇y_c(x′ + α_k (x − x′)) with the midpoint rule α_k = (k + ½)/m,
    k = 0..m−1. The N · m path points run in batches of at most `batch_size`.

    Args:
        baseline: x′, broadcastable to the images; None is the black image (zeros).
        steps: m, the number of path points.

    Returns:
        (attributions (N, H, W, C), completeness gaps (N,), logits (N, K), resolved
        targets (N,)). The gap is |Σ attributions − (y_c(x) − y_c(x′))| / |y_c(x) −
        y_c(x′)|: the relative error of the Riemann sum, 0 for an exact integral.
    """
    baseline = jnp.broadcast_to(0.0 if baseline is None else baseline, images.shape)
    logits = model.apply(variables, images)
    targets = resolve_targets(logits, targets)
    delta = images - baseline

    def path_grads(k, i):
        alpha = ((k + 0.5) / steps)[:, None, None, None]
        return input_gradients(model, variables, baseline[i] + alpha * delta[i],
                               targets[i])[0]

    grads = map_pairs(path_grads, images.shape[0], steps, batch_size, total=True) / steps
    attributions = delta * grads
    change = _target_logit(logits, targets) - _target_logit(
        model.apply(variables, baseline), targets)
    gaps = jnp.abs(jnp.sum(attributions, axis=(1, 2, 3)) - change) / jnp.maximum(
        jnp.abs(change), EPS)
    return attributions, gaps, logits, targets


def grad_cam_plus_plus(model, variables, images, targets, *, layer="conv3"):
    """Grad-CAM++ (Chattopadhay et al. 2018), raw.

    With g = ∂y_c/∂A_k at each position, the pixel weights are
    α = g² / (2g² + Σ_ab A_k,ab · g³) (0 where g = 0), the paper's closed form for an
    exponential output, and the map is ReLU(Σ_k w_k A_k) with w_k = Σ_ij α_ij ReLU(g_ij),
    upsampled bilinearly to the image size.

    Returns:
        (maps (N, H, W) >= 0, logits (N, K), resolved targets (N,)).
    """
    acts = model.apply(variables, images, method=model.features)[layer]
    head = lambda a: model.apply(variables, a, layer=layer, method=model.head_from)
    grads, logits, targets = _target_vjp(head, acts, targets)
    g2 = grads**2
    denominator = 2 * g2 + jnp.sum(acts, axis=(1, 2), keepdims=True) * g2 * grads
    alphas = jnp.where(denominator != 0, g2 / jnp.where(denominator != 0, denominator, 1), 0)
    weights = jnp.sum(alphas * jax.nn.relu(grads), axis=(1, 2))
    cams = jax.nn.relu(jnp.einsum("nhwk,nk->nhw", acts, weights))
    cams = jax.image.resize(cams, images.shape[:3], method="bilinear")
    return cams, logits, targets


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


def occlusion(model, variables, images, targets, *, patch=4, stride=2, baseline=0.0,
              batch_size=256):
    """Occlusion (Zeiler & Fergus 2014): how much the target logit drops when a square is
    hidden.

    Every patch × patch square at `stride` (all channels) is set to `baseline` in turn;
    a pixel's attribution is the mean drop y_c(x) − y_c(x with the square hidden) over the
    squares that cover it. The N · P occluded images run in batches of `batch_size`.

    Returns:
        (maps (N, H, W), signed; logits (N, K), resolved targets (N,)).
    """
    masks = occlusion_masks(images.shape[1], images.shape[2], patch, stride)
    logits = model.apply(variables, images)
    targets = resolve_targets(logits, targets)
    clean = _target_logit(logits, targets)

    def drops(p, i):
        hidden = jnp.where(masks[p][..., None], baseline, images[i])
        return clean[i] - _target_logit(model.apply(variables, hidden), targets[i])

    drop = map_pairs(drops, images.shape[0], masks.shape[0], batch_size, total=False)
    coverage = jnp.sum(masks, axis=0)
    maps = jnp.einsum("pn,phw->nhw", drop, masks.astype(drop.dtype)) / jnp.maximum(
        coverage, 1)[None]
    return maps, logits, targets


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
         keep_prob=0.5, batch_size=256):
    """RISE (Petsiuk et al. 2018): Σ_i P_c(x ⊙ M_i) M_i / (N_masks · keep_prob).

    The same `rise_masks(key, ...)` serve every image, so a map depends only on the key.
    The N · n_masks masked images run in batches of `batch_size`.

    Returns:
        (maps (N, H, W) >= 0, logits (N, K), resolved targets (N,)).
    """
    masks = rise_masks(key, n_masks, cell_size=cell_size, keep_prob=keep_prob,
                       size=images.shape[1:3])
    logits = model.apply(variables, images)
    targets = resolve_targets(logits, targets)

    def scores(m, i):
        probs = jax.nn.softmax(model.apply(variables, images[i] * masks[m][..., None]))
        return _target_logit(probs, targets[i])

    p = map_pairs(scores, images.shape[0], n_masks, batch_size, total=False)
    return jnp.einsum("mn,mhw->nhw", p, masks) / (n_masks * keep_prob), logits, targets


@jax.custom_vjp
def guided_relu(x):
    """ReLU whose backward pass is Guided Backprop's rule (Springenberg et al. 2015): the
    gradient passes only where the input was positive and the incoming gradient is."""
    return jax.nn.relu(x)


def _guided_relu_fwd(x):
    return jax.nn.relu(x), x


def _guided_relu_bwd(x, g):
    return (jnp.where((x > 0) & (g > 0), g, 0.0).astype(g.dtype),)


guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)


def _guided(model):
    if "activation" not in getattr(model, "__dataclass_fields__", {}):
        raise TypeError(f"Guided Backprop needs a model with an `activation` attribute to "
                        f"swap, as CIFAR10CNN has, got {type(model).__name__}")
    return model.clone(activation=guided_relu)


def guided_backprop(model, variables, images, targets):
    """Guided Backprop (Springenberg et al. 2015): the input gradient with every ReLU's
    backward pass replaced by `guided_relu`'s rule (`model.clone(activation=...)`, no hooks).

    Returns:
        (gradients (N, H, W, C), logits (N, K), resolved targets (N,)).
    """
    return input_gradients(_guided(model), variables, images, targets)


def guided_grad_cam(model, variables, images, targets, *, layer="conv3"):
    """Guided Grad-CAM (Selvaraju et al. 2017): Guided Backprop ⊙ the upsampled Grad-CAM.

    Returns:
        (attributions (N, H, W, C), logits (N, K), resolved targets (N,)).
    """
    grads, logits, targets = guided_backprop(model, variables, images, targets)
    cams = grad_cam(model, variables, images, targets, layer=layer)[0]
    return grads * cams[..., None], logits, targets


def reduce_channels(grads):
    """|grads| maxed over the colour channels: (N, H, W, C) -> (N, H, W) (Simonyan et al.)."""
    return jnp.max(jnp.abs(grads), axis=-1)


def sum_channels(attributions):
    """Signed attributions summed over the colour channels: (N, H, W, C) -> (N, H, W).

    For attributions that add up to a change of the output (Gradient ⊙ Input, Integrated
    Gradients), so that a pixel's value is its share of that change.
    """
    return jnp.sum(attributions, axis=-1)


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


# ----------------------------------------------------------------------------------------
# Every method by name, as raw (N, H, W) maps: what the evaluation and the classes use.


class Method(NamedTuple):
    """How to run one explainer by name.

    fn: `(model, variables, images, targets, key, *, batch_size, **options) -> (maps
        (N, H, W), logits, resolved targets)`.
    signed: whether the maps carry a sign (positive = evidence for the class).
    defaults: the options and their default values.
    passes: `options -> (forward, backward)` model passes per image.
    paper: where the method comes from.
    """

    fn: Callable
    signed: bool
    defaults: Dict[str, Any]
    passes: Callable
    paper: str


def _gradcam_method(model, variables, images, targets, key, *, batch_size, layer):
    return grad_cam(model, variables, images, targets, layer=layer)


def _gradcam_pp_method(model, variables, images, targets, key, *, batch_size, layer):
    return grad_cam_plus_plus(model, variables, images, targets, layer=layer)


def _saliency_method(model, variables, images, targets, key, *, batch_size):
    grads, logits, targets = input_gradients(model, variables, images, targets)
    return reduce_channels(grads), logits, targets


def _smoothgrad_method(model, variables, images, targets, key, *, batch_size, n_samples,
                       noise_level):
    logits = model.apply(variables, images)
    targets = resolve_targets(logits, targets)
    grad_fn = lambda x, t: input_gradients(model, variables, x, t)[0]
    grads = smooth_grad(grad_fn, images, targets, key, n_samples=n_samples,
                        noise_level=noise_level, batch_size=batch_size)
    return reduce_channels(grads), logits, targets


def _grad_x_input_method(model, variables, images, targets, key, *, batch_size):
    attributions, logits, targets = gradient_x_input(model, variables, images, targets)
    return sum_channels(attributions), logits, targets


def _ig_method(model, variables, images, targets, key, *, batch_size, steps, baseline):
    attributions, _, logits, targets = integrated_gradients(
        model, variables, images, targets, baseline=baseline, steps=steps,
        batch_size=batch_size)
    return sum_channels(attributions), logits, targets


def _occlusion_method(model, variables, images, targets, key, *, batch_size, patch, stride,
                      baseline):
    return occlusion(model, variables, images, targets, patch=patch, stride=stride,
                     baseline=baseline, batch_size=batch_size)


def _rise_method(model, variables, images, targets, key, *, batch_size, n_masks, cell_size,
                 keep_prob):
    return rise(model, variables, images, targets, key, n_masks=n_masks, cell_size=cell_size,
                keep_prob=keep_prob, batch_size=batch_size)


def _guided_method(model, variables, images, targets, key, *, batch_size):
    grads, logits, targets = guided_backprop(model, variables, images, targets)
    return reduce_channels(grads), logits, targets


def _guided_gradcam_method(model, variables, images, targets, key, *, batch_size, layer):
    attributions, logits, targets = guided_grad_cam(model, variables, images, targets,
                                                    layer=layer)
    return reduce_channels(attributions), logits, targets


def _occlusion_positions(options):
    return len(occlusion_masks(IMAGE_SHAPE[0], IMAGE_SHAPE[1], options["patch"],
                               options["stride"]))


METHODS = {
    "gradcam": Method(_gradcam_method, False, {"layer": "conv3"}, lambda o: (1, 1),
                      "Selvaraju et al. 2017"),
    "gradcam++": Method(_gradcam_pp_method, False, {"layer": "conv3"}, lambda o: (1, 1),
                        "Chattopadhay et al. 2018"),
    "saliency": Method(_saliency_method, False, {}, lambda o: (1, 1),
                       "Simonyan et al. 2014"),
    "smoothgrad": Method(_smoothgrad_method, False, {"n_samples": 50, "noise_level": 0.15},
                         lambda o: (o["n_samples"] + 1, o["n_samples"]),
                         "Smilkov et al. 2017"),
    "grad_x_input": Method(_grad_x_input_method, True, {}, lambda o: (1, 1),
                           "Shrikumar et al. 2016"),
    "integrated_gradients": Method(_ig_method, True, {"steps": 64, "baseline": None},
                                   lambda o: (o["steps"] + 2, o["steps"]),
                                   "Sundararajan et al. 2017"),
    "occlusion": Method(_occlusion_method, True,
                        {"patch": 4, "stride": 2, "baseline": 0.0},
                        lambda o: (_occlusion_positions(o) + 1, 0), "Zeiler & Fergus 2014"),
    "rise": Method(_rise_method, False, {"n_masks": 4000, "cell_size": 4, "keep_prob": 0.5},
                   lambda o: (o["n_masks"] + 1, 0), "Petsiuk et al. 2018"),
    "guided_backprop": Method(_guided_method, False, {}, lambda o: (1, 1),
                              "Springenberg et al. 2015"),
    "guided_gradcam": Method(_guided_gradcam_method, False, {"layer": "conv3"},
                             lambda o: (2, 2), "Selvaraju et al. 2017"),
}


def explain(method, model, variables, images, targets, key=None, *, batch_size=256,
            **options):
    """Raw maps of any method in `METHODS` by name; jittable (close over the options).

    Args:
        method: a key of `METHODS`.
        images: float (N, H, W, C) in [0, 1]; targets: int (N,), `PREDICTED` allowed.
        key: a `jax.random.key` for the sampling methods (SmoothGrad, RISE).
        batch_size: bounds how many model inputs a sampling method runs at once.
        options: the method's own, over `METHODS[method].defaults`.

    Returns:
        (maps (N, H, W), logits (N, K), resolved targets (N,)).
    """
    spec = METHODS[method]
    return spec.fn(model, variables, images, targets, key, batch_size=batch_size,
                   **{**spec.defaults, **options})


def check_options(method, model, options):
    """The method's options over its defaults, each checked; errors name the option."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    defaults = METHODS[method].defaults
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"{method} takes the options {tuple(defaults) or 'none'}, got "
                        f"{sorted(unknown)}")
    checked = {**defaults, **options}
    for name, value in checked.items():
        if name == "layer":
            names = tuple(getattr(model, "layer_names", ()))
            if value not in names:
                raise ValueError(f"layer must be one of {names}, got {value!r}")
        elif name in ("n_samples", "steps", "n_masks", "patch", "stride", "cell_size"):
            checked[name] = _check_int(name, value, 1)
        elif name in ("noise_level",):
            checked[name] = _check_fraction(name, value)
        elif name == "keep_prob":
            checked[name] = _check_fraction(name, value, upper=1)
            if checked[name] == 0:
                raise ValueError(f"keep_prob must be a number in (0, 1], got {value!r}")
        elif name == "baseline" and method == "occlusion":
            checked[name] = _check_fraction(name, value, upper=1)
        elif name == "baseline" and value is not None:
            checked[name], _ = check_images(value, "baseline")
    for name in ("patch", "cell_size"):
        if name in checked and checked[name] > IMAGE_SHAPE[0]:
            raise ValueError(f"{name} must be at most {IMAGE_SHAPE[0]} pixels, got "
                             f"{checked[name]}")
    if method in ("guided_backprop", "guided_gradcam"):
        _guided(model)
    return checked


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


def _method_outputs(model, method, batch_size, options, variables, images, targets, key,
                    normalize):
    maps, logits, targets = explain(method, model, variables, images, targets, key,
                                    batch_size=batch_size, **options)
    return _finish(maps, logits, targets, normalize)


class Explainer:
    """Any method of `METHODS` behind the seed's calling convention.

    `Explainer(model, "occlusion", patch=8)` checks the options once and jits once;
    `.explain(params, batch_stats, image)` returns `(heatmap, pred_class, score)` like
    `GradCAM.compute_gradcam`. The subclasses below name one method each.
    """

    method = None

    def __init__(self, model, method=None, *, batch_size=256, **options):
        method = method or self.method
        self.model, self.method = model, method
        self.options = check_options(method, model, options)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self._explain = _jit(functools.partial(_method_outputs, model, method,
                                               self.batch_size, self.options),
                             static_argnames="normalize")

    @property
    def signed(self):
        """Whether raw maps carry a sign (positive = evidence for the class)."""
        return METHODS[self.method].signed

    def explain(self, params, batch_stats, image, target_class=None, seed=0, normalize=True):
        """Heatmaps for one image or a batch.

        Args:
            params, batch_stats: the model's variables (`batch_stats` may be None).
            image: (32, 32, 3) or (N, 32, 32, 3), float in [0, 1] or uint8.
            target_class: None (each image's predicted class), an int, or N ints.
            seed: the sampling methods' seed (SmoothGrad, RISE); the same seed gives the
                same map.
            normalize: min-max scale each map to [0, 1]; False gives the raw values
                (signed for `signed` methods).

        Returns:
            (heatmap, pred_class, score): heatmap (32, 32) or (N, 32, 32); the argmax
            class; the softmax probability of the explained class.
        """
        images, single = check_images(image)
        targets = check_targets(target_class, len(images), self.model.num_classes)
        seed = _check_int("seed", seed, 0)
        out = self._explain(_variables(params, batch_stats), images, targets,
                            jax.random.key(seed), normalize=bool(normalize))
        return _outputs(*out, single)

    def visualize(self, image, heatmap, alpha=0.4, colormap="jet"):
        """The heatmap coloured by `colormap` over the image: float (32, 32, 3) in [0, 1]."""
        return overlay(image, heatmap, alpha, colormap)


class GradCAMPlusPlus(Explainer):
    """Grad-CAM++ (Chattopadhay et al. 2018); option `layer` (default 'conv3')."""
    method = "gradcam++"


class GradientXInput(Explainer):
    """Gradient ⊙ Input (Shrikumar et al. 2016), summed over colour channels (signed)."""
    method = "grad_x_input"


class IntegratedGradients(Explainer):
    """Integrated Gradients (Sundararajan et al. 2017), summed over colour channels
    (signed); options `steps` (64) and `baseline` (None: black, or an image)."""
    method = "integrated_gradients"

    def attributions(self, params, batch_stats, image, target_class=None):
        """(attributions (…, 32, 32, 3), completeness gap (…)) for one image or a batch;
        the gap is |Σ attributions − (y_c(x) − y_c(x′))| / |y_c(x) − y_c(x′)|."""
        images, single = check_images(image)
        targets = check_targets(target_class, len(images), self.model.num_classes)
        attributions, gaps, _, _ = _jit_ig(self.model, self.batch_size, self.options)(
            _variables(params, batch_stats), images, targets)
        attributions, gaps = np.asarray(attributions), np.asarray(gaps)
        return (attributions[0], float(gaps[0])) if single else (attributions, gaps)


@functools.lru_cache(maxsize=32)
def _jit_ig_cached(model, batch_size, steps):
    return jax.jit(lambda variables, images, targets, baseline: integrated_gradients(
        model, variables, images, targets, baseline=baseline, steps=steps,
        batch_size=batch_size))


def _jit_ig(model, batch_size, options):
    fn = _jit_ig_cached(model, batch_size, options["steps"])
    baseline = 0.0 if options["baseline"] is None else options["baseline"]
    return lambda variables, images, targets: fn(variables, images, targets, baseline)


class Occlusion(Explainer):
    """Occlusion (Zeiler & Fergus 2014), signed; options `patch` (4), `stride` (2) and
    `baseline` (0.0, the value a hidden square takes)."""
    method = "occlusion"


class RISE(Explainer):
    """RISE (Petsiuk et al. 2018); options `n_masks` (4000), `cell_size` (4) and
    `keep_prob` (0.5); `explain(..., seed=)` picks the masks."""
    method = "rise"


class GuidedBackprop(Explainer):
    """Guided Backprop (Springenberg et al. 2015), |·| maxed over colour channels."""
    method = "guided_backprop"


class GuidedGradCAM(Explainer):
    """Guided Grad-CAM (Selvaraju et al. 2017); option `layer` (default 'conv3')."""
    method = "guided_gradcam"
