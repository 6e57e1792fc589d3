"""Attacks on explanations and their measures, batch-first and jitted.

- Attacks on predictions (FGSM, PGD) are `xai_attacks`'; these use its projection.
- Attacks on explanations, for a method of `xai_visualizations.METHODS`:
  - `fragility_attack` (Ghorbani et al., AAAI 2019): within ε, keeping the predicted
    class, lower the share of the map on its original top-k pixels (or move its centre
    of mass); `random_sign` is the same budget spent on random ±ε noise;
  - `manipulate` (Dombrowski et al., NeurIPS 2019): move the map toward a chosen target
    map while keeping the output, ‖h(x′) − h_t‖² + γ‖g(x′) − g(x)‖².
  A ReLU network's gradient is piecewise constant, so its second derivatives are zero:
  the attacks differentiate the method on the softplus_β network
  (`xai_models.softplus_relus`, `explanation(..., beta=β)`) and judge each step with the
  real one. Explaining the softplus network is also Dombrowski et al.'s defence.
- `adversarial_sensitivity`: the max-sensitivity of `xai_metrics.sensitivity`, searched
  by PGD on the explanation from the worst Monte Carlo draw, so never below it.

Each loop over attack steps runs in Python around one jitted step: XLA:CPU runs
backward convolutions about 3x slower inside `lax.scan` or `fori_loop`. Under an outer
`jax.jit` the same loop unrolls.

Shapes: images float (N, H, W, C) in [0, 1]; labels and targets int (N,); maps (N, H, W).
"""

import functools
from typing import Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp
import optax

import xai_metrics
from xai_attacks import check_budget, project
from xai_core import check_int, check_number
from xai_models import forward, softplus_relus
from xai_visualizations import METHODS, explain

TINY = 1e-12


# ----------------------------------------------------------------------------------------
# Explanations as differentiable functions of the images.


def differentiable_methods() -> tuple:
    """The registry's methods whose maps are input gradients of a plain f(x) -> logits,
    so that an attack can differentiate them on the softplus network."""
    return tuple(m for m, spec in METHODS.items() if spec.differentiable)


def explanation(method, model, variables, *, key=None, beta=None, batch_size=256,
                apply_kwargs=None, **options) -> Callable:
    """`h(images, targets) -> (N, H, W)` maps of `method` for given targets: what the
    attacks move and the sensitivities measure.

    Args:
        key: the method's own key, for the sampling methods (the same for every call).
        beta: explain the softplus_β network instead (`xai_models.softplus_relus`), whose
            maps have non-zero second derivatives; only the `differentiable` methods of
            the registry, which explain a plain f(x) -> logits.
        options: the method's own (checked by `xai_visualizations.check_options`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    if beta is not None:
        if not METHODS[method].differentiable:
            raise ValueError(f"beta (a softplus network) needs one of the gradient methods "
                             f"{differentiable_methods()}, got method {method!r}")
        check_number("beta", beta)
        model, variables = softplus_relus(forward(model, variables, apply_kwargs), beta), None
        apply_kwargs = None
    if METHODS[method].sampling and key is None:
        raise ValueError(f"key must be a jax.random.key for {method}, which samples, got None")

    def h(images, targets):
        return explain(method, model, variables, images, targets, key, batch_size=batch_size,
                       apply_kwargs=apply_kwargs, **options).maps

    return h


def shares(maps):
    """|maps| as shares of each map's total: (N, H, W), each summing to 1."""
    mass = jnp.abs(maps)
    return mass / jnp.maximum(jnp.sum(mass, axis=(1, 2), keepdims=True), TINY)


def top_k_mask(maps, k):
    """The k pixels of largest |map| of each map, (N, H, W) bool (ties: the first)."""
    flat = jnp.abs(maps).reshape(maps.shape[0], -1)
    order = jnp.argsort(-flat, axis=-1, stable=True)[:, :k]
    mask = jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], order].set(True)
    return mask.reshape(maps.shape)


def center_of_mass(maps):
    """The centre of mass of |map|, (N, 2) as (row, column) in pixels."""
    p = shares(maps)
    rows = jnp.arange(maps.shape[1], dtype=p.dtype)
    cols = jnp.arange(maps.shape[2], dtype=p.dtype)
    return jnp.stack([jnp.einsum("nhw,h->n", p, rows), jnp.einsum("nhw,w->n", p, cols)], -1)


def map_changes(original, perturbed, k) -> Dict[str, jax.Array]:
    """How far a map moved (Ghorbani et al.): each (N,).

    top_k: the share of the original top-k pixels (of |map|) still in the top k;
    spearman: rank correlation of |map| (`xai_metrics.spearman`);
    center_shift: distance between the centres of mass of |map|, in pixels.
    """
    both = top_k_mask(original, k) & top_k_mask(perturbed, k)
    return {"top_k": jnp.sum(both, axis=(1, 2)) / k,
            "spearman": xai_metrics.spearman(jnp.abs(original), jnp.abs(perturbed)),
            "center_shift": jnp.linalg.norm(center_of_mass(original)
                                            - center_of_mass(perturbed), axis=-1)}


class Perturbed(NamedTuple):
    """Images moved within ε, their maps, and how far the maps moved from the clean ones."""

    images: jax.Array  # (N, H, W, C); an image whose every try changed the class stays clean
    maps: jax.Array  # (N, H, W) the real explanation of `images`
    kept: jax.Array  # (N,) bool: the perturbed image keeps the predicted class
    changes: Dict[str, jax.Array]  # map_changes(clean maps, maps)


def _predict(model, variables, apply_kwargs):
    f = forward(model, variables, apply_kwargs)
    return lambda x: jnp.argmax(f(x), axis=-1)


def random_sign(h, predict, images, targets, key, *, eps, k=100, clean=None) -> Perturbed:
    """Ghorbani et al.'s random baseline: x + ε · s, s uniform in {−1, +1} per pixel and
    channel (one draw for every image), clipped to [0, 1]. An image whose class changes is
    kept clean, as the attack does.

    Args:
        h: `explanation(...)` of the real network; predict: images -> classes (N,).
        clean: h(images, targets) when the caller has it already.
    """
    check_budget(eps)
    clean = h(images, targets) if clean is None else clean
    sign = jnp.where(jax.random.bernoulli(key, 0.5, images.shape[1:]), 1.0, -1.0)
    moved = jnp.clip(images + eps * sign[None], 0.0, 1.0)
    kept = predict(moved) == targets
    moved = jnp.where(kept[:, None, None, None], moved, images)
    maps = h(moved, targets)
    return Perturbed(moved, maps, kept, map_changes(clean, maps, k))


def fragility_attack(h, surrogate, predict, images, targets, *, eps, steps=10,
                     step_size=None, k=100, objective="top_k", clean=None) -> Perturbed:
    """The fragility attack of Ghorbani et al. (AAAI 2019) on one explanation method.

    Signed steps descend the share of the surrogate's map on the clean map's top-k pixels
    (objective 'top_k'), or ascend its centre of mass's distance from the clean one
    ('center'), projected onto the ε-ball and [0, 1]. After each step the real network
    judges it: of the steps that keep the predicted class, the one whose real map moved
    most (least top-k intersection, or largest centre shift) is returned; an image with
    none stays clean.

    Args:
        h: `explanation(...)` of the real network; surrogate: the same method with a
            `beta`, differentiable; predict: images -> classes (N,).
        targets: the predicted classes of the clean images.
        step_size: None is 2.5 ε / steps.
        clean: h(images, targets) when the caller has it already.

    Returns:
        Perturbed.
    """
    check_budget(eps, steps, step_size)
    check_int("k", k, 1)
    if objective not in ("top_k", "center"):
        raise ValueError(f"objective must be 'top_k' or 'center', got {objective!r}")
    step_size = 2.5 * eps / steps if step_size is None else step_size
    clean = h(images, targets) if clean is None else clean
    mask, centre = top_k_mask(clean, k), center_of_mass(clean)
    x, best = images, images
    best_score = jnp.full(images.shape[:1], jnp.inf, jnp.float32)  # not weak: one trace
    for _ in range(steps):
        x, best, best_score = _fragility_step(x, best, best_score, images, targets, clean,
                                              mask, centre, eps, step_size, h=h,
                                              surrogate=surrogate, predict=predict, k=k,
                                              objective=objective)
    maps = h(best, targets)
    return Perturbed(best, maps, predict(best) == targets, map_changes(clean, maps, k))


@functools.partial(jax.jit, static_argnames=("h", "surrogate", "predict", "k", "objective"))
def _fragility_step(x, best, best_score, images, targets, clean, mask, centre, eps,
                    step_size, *, h, surrogate, predict, k, objective):
    """One step of `fragility_attack`. Every array is an argument, none a constant: XLA
    would fold a constant's top-k sort into the program, for seconds, and recompile for
    each batch."""
    def loss(x):
        p = shares(surrogate(x, targets))
        if objective == "top_k":
            return jnp.sum(jnp.where(mask, p, 0.0))
        return -jnp.sum(jnp.linalg.norm(center_of_mass(p) - centre, axis=-1))

    x = x - step_size * jnp.sign(jax.grad(loss)(x))
    x = jnp.clip(images + project(x - images, eps), 0.0, 1.0)
    changes = map_changes(clean, h(x, targets), k)
    score = changes["top_k"] if objective == "top_k" else -changes["center_shift"]
    better = (predict(x) == targets) & (score < best_score)
    return (x, jnp.where(better[:, None, None, None], x, best),
            jnp.where(better, score, best_score))


class Manipulation(NamedTuple):
    """`manipulate`'s result; the MSEs are of maps as shares × H·W (mean 1), (N,)."""

    images: jax.Array  # (N, H, W, C) the manipulated images
    maps: jax.Array  # (N, H, W) their real maps
    kept: jax.Array  # (N,) bool: the predicted class is kept
    mse_before: jax.Array  # clean map against the target map
    mse_after: jax.Array  # manipulated map against the target map


def map_mse(maps, target_maps):
    """Mean squared difference of two maps as shares × H·W (each map's mean is 1)."""
    pixels = maps.shape[1] * maps.shape[2]
    return jnp.mean((pixels * (shares(maps) - shares(target_maps))) ** 2, axis=(1, 2))


def manipulate(h, surrogate, logits_fn, images, targets, target_maps, *, eps=8 / 255,
               steps=200, learning_rate=1e-3, gamma=1.0) -> Manipulation:
    """Dombrowski et al. (NeurIPS 2019): an image x′ within ε (L∞) whose map is the target
    map, with the same output.

    Adam minimises map_mse(surrogate(x′), h_t) + γ ‖softmax g(x′) − softmax g(x)‖², each
    step projected onto the ε-ball and [0, 1]; the last step is returned, judged by the
    real network and its real map.

    Args:
        h: `explanation(...)` of the real network; surrogate: the same with a `beta`.
        logits_fn: images -> logits of the real network.
        targets: the classes explained (the clean predictions).
        target_maps: (N, H, W) the maps to reach.
    """
    check_budget(eps, steps, learning_rate)
    check_number("gamma", gamma)
    clean_probs = jax.nn.softmax(logits_fn(images))
    optimiser = _adam(learning_rate)
    x, state = images, optimiser.init(images)
    for _ in range(steps):
        x, state = _manipulation_step(x, state, images, targets, target_maps, clean_probs,
                                      eps, gamma, surrogate=surrogate, logits_fn=logits_fn,
                                      optimiser=optimiser)
    maps = h(x, targets)
    kept = jnp.argmax(logits_fn(x), axis=-1) == targets
    return Manipulation(x, maps, kept, map_mse(h(images, targets), target_maps),
                        map_mse(maps, target_maps))


@functools.lru_cache(maxsize=None)
def _adam(learning_rate):
    """One optimiser object per rate, so that `_manipulation_step` compiles once for it."""
    return optax.adam(learning_rate)


@functools.partial(jax.jit, static_argnames=("surrogate", "logits_fn", "optimiser"))
def _manipulation_step(x, state, images, targets, target_maps, clean_probs, eps, gamma, *,
                       surrogate, logits_fn, optimiser):
    """One Adam step of `manipulate`, projected; the arrays are arguments, not constants."""
    def loss(x):
        probs = jax.nn.softmax(logits_fn(x))
        return jnp.sum(map_mse(surrogate(x, targets), target_maps)
                       + gamma * jnp.sum((probs - clean_probs) ** 2, axis=-1))

    updates, state = optimiser.update(jax.grad(loss)(x), state)
    x = optax.apply_updates(x, updates)
    return jnp.clip(images + project(x - images, eps), 0.0, 1.0), state


class AdversarialSensitivity(NamedTuple):
    """What `adversarial_sensitivity` found."""

    found: jax.Array                       # (N,) the largest ratio the search saw
    monte_carlo: xai_metrics.Sensitivity   # the draws it started from


def adversarial_sensitivity(explain_fn, surrogate, images, targets, key, *, radius=0.02,
                            n_samples=10, steps=10, step_size=None, batch_size=256):
    """Max-sensitivity found by PGD on the explanation: from the worst of the Monte Carlo
    draws of `xai_metrics.sensitivity` (same key), signed ascent steps on
    ‖e_s(x + δ) − e(x)‖ within the L∞ ball of `radius` (e_s the differentiable
    `surrogate`), each judged by the real `explain_fn`; the largest ratio seen.

    Returns:
        AdversarialSensitivity(found (N,), the Monte Carlo `Sensitivity`); found >= its
        `max`.
    """
    check_budget(radius, steps, step_size)
    step_size = 2.5 * radius / steps if step_size is None else step_size
    mc = xai_metrics.sensitivity(explain_fn, images, targets, key, radius=radius,
                                 n_samples=n_samples, batch_size=batch_size)
    base = explain_fn(images, targets)
    base_norm = jnp.linalg.norm(base.reshape(len(base), -1), axis=-1)
    base_norm = jnp.where(base_norm > 0, base_norm, 1.0)
    delta, best = mc.worst, mc.max
    for _ in range(steps):
        delta, best = _sensitivity_step(delta, best, images, targets, base, base_norm,
                                        radius, step_size, explain_fn=explain_fn,
                                        surrogate=surrogate)
    return AdversarialSensitivity(best, mc)


@functools.partial(jax.jit, static_argnames=("explain_fn", "surrogate"))
def _sensitivity_step(delta, best, images, targets, base, base_norm, radius, step_size, *,
                      explain_fn, surrogate):
    """One step of `adversarial_sensitivity`; the arrays are arguments, not constants."""
    def ratio(fn, delta):
        moved = fn(images + delta, targets) - base
        return jnp.linalg.norm(moved.reshape(len(moved), -1), axis=-1) / base_norm

    grads = jax.grad(lambda d: jnp.sum(ratio(surrogate, d)))(delta)
    delta = project(delta + step_size * jnp.sign(grads), radius)
    return delta, jnp.maximum(best, ratio(explain_fn, delta))


class Surrogates(NamedTuple):
    """An attack's view of a method (`surrogates`)."""

    h: Callable                # (images, targets) -> the real maps
    surrogate: Callable        # the same, differentiable: what the attack steps on
    predict: Callable          # images -> the real network's classes
    logits: Callable           # images -> the real network's logits


def surrogates(method, model, variables, *, beta, key=None, batch_size=256,
               apply_kwargs=None, **options):
    """`Surrogates` for attacking `method`'s maps: the real explanation, the
    differentiable one the attack steps on (the softplus_β network for the registry's
    `differentiable` methods, else the method itself), and the real network's classes
    and logits."""
    kwargs = dict(key=key, batch_size=batch_size, apply_kwargs=apply_kwargs, **options)
    h = explanation(method, model, variables, **kwargs)
    smooth = (explanation(method, model, variables, beta=beta, **kwargs)
              if METHODS[method].differentiable else h)
    return Surrogates(h, smooth, _predict(model, variables, apply_kwargs),
                      forward(model, variables, apply_kwargs))


__all__ = ["AdversarialSensitivity", "Manipulation", "Perturbed", "Surrogates",
           "adversarial_sensitivity", "differentiable_methods",
           "center_of_mass", "explanation", "fragility_attack", "manipulate",
           "map_changes", "map_mse", "random_sign", "shares", "surrogates", "top_k_mask"]
