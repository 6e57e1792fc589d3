"""LIME and KernelSHAP: exact answers on a model that is linear in its segments, the
Shapley kernel and lime's weights by hand, and keyed sampling."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xai_surrogates as xs
import xai_visualizations as xv

SEGMENTS = 8  # asked of SLIC on 16 × 16 images: a capacity of 16


class PixelLinear(nn.Module):
    """logit_k = Σ_pixels,channels w_k ⊙ x: linear in every pixel, so linear in the
    segments too whatever fills them."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(1.0), x.shape[1:] + (2,))
        return jnp.einsum("nhwc,hwck->nk", x, w)


@pytest.fixture(scope="module")
def linear():
    images = jax.image.resize(jax.random.uniform(jax.random.key(0), (3, 4, 4, 3)),
                              (3, 16, 16, 3), "linear")  # smooth, so SLIC finds regions
    model = PixelLinear()
    variables = model.init(jax.random.key(1), images)
    return model, variables, images


class Squashed(nn.Module):
    """A model far from linear in its pixels: three logits, each a tanh of a product
    of two linear maps."""

    @nn.compact
    def __call__(self, x):
        a = PixelLinear()(x)
        b = PixelLinear()(x)
        return jnp.tanh(jnp.concatenate([a * b, a[:, :1] - b[:, 1:]], axis=-1))


@pytest.fixture(scope="module")
def squashed(linear):
    images = linear[2][:2]
    model = Squashed()
    return model, model.init(jax.random.key(4), images), images


def explain_squashed(method):
    """`method` on `Squashed`, jitted once per method for the tests that share it."""
    return jax.jit(lambda v, x, k: xv.explain(method, Squashed(), v, x, None, k,
                                              n_samples=32, n_segments=SEGMENTS))


EXPLAIN = {method: explain_squashed(method) for method in ("lime", "kernel_shap")}


def exact_shapley(variables, images, targets):
    """Σ over each segment's pixels of w ⊙ (x − the segment's mean colour): (N, H, W)
    with every pixel carrying its segment's value, from numpy."""
    segments = xs.segment_numpy(images, "slic", SEGMENTS, 10.0)
    w = np.asarray(variables["params"]["w"])
    x = np.asarray(images)
    out = np.zeros(segments.shape)
    for n, t in enumerate(targets):
        for s in np.unique(segments[n]):
            inside = segments[n] == s
            mean = x[n][inside].mean(0)
            out[n][inside] = np.sum(w[..., t][inside] * (x[n][inside] - mean))
    return out, segments


@pytest.mark.parametrize("method, options", [
    ("lime", {"ridge": 1e-6, "n_samples": 300}),
    ("kernel_shap", {"n_samples": 300}),
])
def test_a_model_linear_in_its_segments_gets_its_exact_coefficients(linear, method, options):
    """With the logit as the score, each segment's coefficient is what switching it off
    removes: LIME with λ → 0 and KernelSHAP both recover it (the Shapley values of a
    linear model are its terms)."""
    model, variables, images = linear
    targets = jnp.array([0, 1, 0])
    out = jax.jit(lambda v, x, k: xv.explain(method, model, v, x, targets, k, score="logit",
                                             n_segments=SEGMENTS, **options))(
        variables, images, jax.random.key(2))
    want, segments = exact_shapley(variables, images, np.asarray(targets))
    assert 4 <= segments.max() + 1 <= 2 * SEGMENTS
    np.testing.assert_array_equal(out.extras["segments"], segments.max(axis=(1, 2)) + 1)
    np.testing.assert_allclose(out.maps, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_kernel_shap_sums_to_the_score_change_for_any_model(squashed):
    """Efficiency, Σ φ = f(image) − f(every segment off), holds by construction even
    where the model is far from linear and the samples are few."""
    model, variables, x = squashed
    out = EXPLAIN["kernel_shap"](variables, x, jax.random.key(0))
    segments = xs.segment_numpy(x, "slic", SEGMENTS, 10.0)
    assert np.all(segments.max(axis=(1, 2)) >= 3)
    maps = np.asarray(out.maps)
    phi_sum = [sum(maps[n][segments[n] == s][0] for s in np.unique(segments[n]))
               for n in range(2)]
    means = np.zeros_like(np.asarray(x))  # every segment off: its mean colour
    for n in range(2):
        for s in np.unique(segments[n]):
            means[n][segments[n] == s] = np.asarray(x)[n][segments[n] == s].mean(0)
    probs = jax.nn.softmax(model.apply(variables, jnp.concatenate([x, jnp.asarray(means)])))
    t = np.asarray(out.targets)
    want = np.asarray(probs)[np.arange(2), t] - np.asarray(probs)[2 + np.arange(2), t]
    np.testing.assert_allclose(phi_sum, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["lime", "kernel_shap"])
def test_the_same_key_gives_the_same_map_and_another_key_another(method, squashed):
    _, variables, x = squashed
    first = EXPLAIN[method](variables, x, jax.random.key(0)).maps
    np.testing.assert_array_equal(first, EXPLAIN[method](variables, x, jax.random.key(0)).maps)
    other = EXPLAIN[method](variables, x, jax.random.key(1)).maps
    assert np.max(np.abs(first - other)) > 1e-3 * np.max(np.abs(first))


def test_shapley_kernel_draws_coalition_sizes_by_the_kernel():
    """Sizes k of 6 present segments (of 8 slots) occur ∝ (M − 1)/(k (M − k)), and only
    present segments join."""
    mask = jnp.array([1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)
    z = np.asarray(xs.shapley_coalitions(jax.random.key(0), 20000, mask))
    assert not z[:, 6:].any()
    sizes = z.sum(1).astype(int)
    k = np.arange(1, 6)
    want = 5 / (k * (6 - k))
    np.testing.assert_allclose(np.bincount(sizes, minlength=7)[1:6] / len(z),
                               want / want.sum(), atol=0.01)


def test_lime_weights_are_limes_kernel_on_cosine_distance():
    """z = (1, 1, 0, 0) of four segments: cosine similarity 2 / (√2 · 2), distance
    1 − 1/√2, weight √exp(−d² / 0.25²); the all-on pattern weighs 1."""
    z = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32)
    d = 1 - 1 / np.sqrt(2)
    np.testing.assert_allclose(xs.lime_weights(z, jnp.ones(4)),
                               [np.sqrt(np.exp(-d**2 / 0.0625)), 1.0], rtol=1e-5)
    # an absent segment counts for nothing
    np.testing.assert_allclose(xs.lime_weights(jnp.array([[1, 1, 0, 1]], jnp.float32),
                                               jnp.array([1, 1, 0, 0.])), [1.0], rtol=1e-5)


@pytest.mark.parametrize("method", ["lime", "kernel_shap"])
def test_an_image_alone_gets_the_map_it_gets_in_a_batch(method, squashed, threefry):
    """The coalitions and patterns depend on the key only, never on the image's place in
    the batch (KernelSHAP's once did, through fold_in(key, index)). Under threefry, as
    the tests' rbg generator can draw the same bits for every key of a vmap."""
    _, variables, x = squashed
    batch = EXPLAIN[method](variables, x[::-1], jax.random.key(0)).maps  # image 0 second
    alone = EXPLAIN[method](variables, x[:1], jax.random.key(0)).maps
    assert float(jnp.max(jnp.abs(alone))) > 1e-3
    np.testing.assert_allclose(alone[0], batch[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lime", "kernel_shap"])
def test_a_single_segment_is_named_in_one_warning(method, squashed):
    """Quickshift leaves a flat 16 × 16 image whole (SLIC cuts even a flat image into
    its grid): that image's map is constant, and the call says so once, naming the image
    and the options to change; an image with segments passes silently."""
    _, variables, x = squashed
    batch = jnp.concatenate([x[:1], jnp.full_like(x[:1], 0.5)])  # image 1 is flat
    explain = jax.jit(lambda v, images, k: xv.explain(
        method, Squashed(), v, images, None, k, n_samples=32, n_segments=SEGMENTS,
        segmentation="quickshift"))
    with pytest.warns(UserWarning) as caught:
        maps = jax.block_until_ready(explain(variables, batch, jax.random.key(0)).maps)
    messages = [str(w.message) for w in caught if "single segment" in str(w.message)]
    assert messages == ["LIME and KernelSHAP found a single segment in image(s) 1 of the "
                        "batch (quickshift), so their maps are constant there: try "
                        "segmentation='slic' with a larger n_segments"]
    assert float(jnp.ptp(maps[1])) == 0 and float(jnp.ptp(maps[0])) > 0
