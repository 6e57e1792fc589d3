"""Attacks on predictions, batch-first and jitted: `fgsm` (Goodfellow et al. 2015) and
`pgd` (Madry et al. 2018) under L∞ or L2, with a random start from an explicit key;
`robust_accuracy` sweeps ε. Nothing of the explanation stack is imported, so training
(adversarial training, `train_cifar10 --adv-eps`) imports only this.

Each PGD step is one jitted call in a Python loop: XLA:CPU runs backward convolutions
about 3x slower inside `lax.scan` or `fori_loop`. Under an outer `jax.jit` the loop
unrolls.

Shapes: images float (N, H, W, C) in [0, 1]; labels int (N,).
"""

import functools
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xai_core import check_images, check_int, check_number
from xai_models import forward

NORMS = ("linf", "l2")
TINY = 1e-12


def _check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def check_budget(eps, steps=None, step_size=None):
    """eps and step_size numbers >= 0, steps an int >= 1, or a ValueError naming them."""
    check_number("eps", eps)
    if steps is not None:
        check_int("steps", steps, 1)
    if step_size is not None:
        check_number("step_size", step_size)


def _check_batch(images, labels):
    """Static checks only (shapes and dtypes), so the attacks still trace under jit."""
    if getattr(images, "ndim", None) != 4:
        given = (f"shape {tuple(images.shape)}" if hasattr(images, "shape")
                 else type(images).__name__)
        raise ValueError(f"images must be a batch (N, H, W, C), got {given}")
    return _check_labels(labels, images.shape[0])


def _check_labels(labels, n, name="labels"):
    labels = jnp.asarray(labels)
    if labels.shape != (n,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name} must be {n} integer classes, one per image, got "
                         f"{labels.dtype} of shape {labels.shape}")
    return labels.astype(jnp.int32)


# ----------------------------------------------------------------------------------------
# Attacks on predictions.


def _norm(x):
    """Per-example L2 norm, (N, 1, 1, 1)."""
    return jnp.sqrt(jnp.sum(x * x, axis=tuple(range(1, x.ndim)), keepdims=True))


def project(delta, eps, norm="linf"):
    """`delta` projected onto the ε-ball of `norm`, per example."""
    if norm == "linf":
        return jnp.clip(delta, -eps, eps)
    return delta * jnp.minimum(1.0, eps / jnp.maximum(_norm(delta), TINY))


def random_start(key, shape, eps, norm="linf"):
    """A uniform draw from the ε-ball of one image's `shape`; the attacks add the same
    draw to every image, so an image's attack never depends on its batch-mates."""
    if norm == "linf":
        return jax.random.uniform(key, shape, minval=-eps, maxval=eps)
    direction, radius = jax.random.split(key)
    direction = jax.random.normal(direction, shape)
    radius = eps * jax.random.uniform(radius) ** (1.0 / np.prod(shape))
    return direction * radius / jnp.maximum(jnp.linalg.norm(direction), TINY)


def _loss_gradients(f, images, labels):
    """∂/∂x of each example's cross-entropy (the examples' losses are summed, and no
    example's gradient depends on another's)."""
    def loss(x):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(f(x), labels))

    return jax.grad(loss)(images)


def _ascend(x, grads, step_size, norm):
    if norm == "linf":
        return x + step_size * jnp.sign(grads)
    return x + step_size * grads / jnp.maximum(_norm(grads), TINY)


def fgsm(model, variables, images, labels, *, eps, apply_kwargs=None):
    """FGSM (Goodfellow et al. 2015): x + ε · sign(∇ₓ CE(f(x), y)), clipped to [0, 1]."""
    labels = _check_batch(images, labels)
    f = forward(model, variables, apply_kwargs)
    return jnp.clip(images + eps * jnp.sign(_loss_gradients(f, images, labels)), 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("model", "apply_kwargs", "norm"))
def _pgd_step(variables, x, images, labels, eps, step_size, *, model, apply_kwargs, norm):
    f = forward(model, variables, dict(apply_kwargs))
    x = _ascend(x, _loss_gradients(f, x, labels), step_size, norm)
    return jnp.clip(images + project(x - images, eps, norm), 0.0, 1.0)


def pgd(model, variables, images, labels, key, *, eps, step_size, steps, norm="linf",
        random_init=True, center=None, apply_kwargs=None):
    """PGD (Madry et al. 2018): `steps` ascents of the cross-entropy of `labels`, each
    projected back onto the ε-ball around the images (L∞: signed steps; L2: normalised
    steps) and onto [0, 1].

    Args:
        key: the random start, a uniform draw from the ball (`random_start`).
        random_init: False starts from the images themselves (then `key` is unused).
        center: the ball's centre when the images are already a start inside it (as
            adversarial training draws one per image); None: the images.
        apply_kwargs: as a dict, or as a tuple of items.

    Returns:
        The adversarial images, (N, H, W, C) in [0, 1].
    """
    _check_norm(norm)
    check_int("steps", steps, 0)
    labels = _check_batch(images, labels)
    if random_init and key is None:
        raise ValueError("key must be a jax.random.key for PGD's random start, got None "
                         "(or pass random_init=False)")
    kwargs = tuple(sorted(dict(apply_kwargs or {}).items()))
    center = images if center is None else center
    x = images
    if random_init:
        x = jnp.clip(center + random_start(key, center.shape[1:], eps, norm)[None], 0.0, 1.0)
    for _ in range(steps):
        x = _pgd_step(variables, x, center, labels, eps, step_size, model=model,
                      apply_kwargs=kwargs, norm=norm)
    return x


def robust_accuracy(model, variables, images, labels, key, *, epsilons, steps=20,
                    step_size=None, norm="linf", batch_size=256, apply_kwargs=None,
                    bar=None) -> Dict[str, list]:
    """Accuracy under FGSM and under PGD-`steps` at each ε, over batches of `batch_size`.

    Args:
        epsilons: the radii; 0 gives the clean accuracy.
        step_size: PGD's step; None is 2.5 ε / steps (Madry et al.'s ratio).
        bar: a tqdm bar advanced by each batch's images, or None.

    Returns:
        {'epsilons', 'fgsm', 'pgd'}: lists of accuracies in [0, 1], one per ε.
    """
    images = check_images(images, "images")[0]
    n = images.shape[0]
    labels = _check_labels(labels, n)
    _check_norm(norm)
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    for eps in epsilons:
        check_budget(eps, step_size=step_size)
    f = jax.jit(lambda v, x: forward(model, v, apply_kwargs)(x))
    fgsm_jit = jax.jit(lambda v, x, y, eps: fgsm(model, v, x, y, eps=eps,
                                                  apply_kwargs=apply_kwargs))
    correct = {"fgsm": np.zeros(len(epsilons)), "pgd": np.zeros(len(epsilons))}
    for start in range(0, n, batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        for j, eps in enumerate(epsilons):
            if eps == 0:
                hits = jnp.sum(jnp.argmax(f(variables, x), -1) == y)
                correct["fgsm"][j] += hits
                correct["pgd"][j] += hits
                continue
            size = 2.5 * eps / steps if step_size is None else step_size
            adv = pgd(model, variables, x, y, jax.random.fold_in(key, j), eps=eps,
                      step_size=size, steps=steps, norm=norm, apply_kwargs=apply_kwargs)
            correct["pgd"][j] += jnp.sum(jnp.argmax(f(variables, adv), -1) == y)
            if norm == "linf":
                adv = fgsm_jit(variables, x, y, eps)
                correct["fgsm"][j] += jnp.sum(jnp.argmax(f(variables, adv), -1) == y)
            else:
                correct["fgsm"][j] = np.nan  # FGSM is an L∞ attack
        if bar is not None:
            bar.update(len(x))
    return {"epsilons": [float(e) for e in epsilons],
            "fgsm": (correct["fgsm"] / n).tolist(), "pgd": (correct["pgd"] / n).tolist()}


__all__ = ["NORMS", "check_budget", "fgsm", "pgd", "project", "random_start",
           "robust_accuracy"]
