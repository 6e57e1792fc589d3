"""The explainers beyond the seed's: each one's defining property on a hand-built model,
and the batch contract for all of them (rejected options are in test_bad_inputs.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xai_visualizations as xv
from test_xai import ATOL, CamNet, linear  # noqa: F401 (a fixture)

SMALL_OPTIONS = {"smoothgrad": {"n_samples": 4}, "integrated_gradients": {"steps": 8},
                 "rise": {"n_masks": 32}, "occlusion": {"patch": 8, "stride": 8},
                 "lime": {"n_samples": 32, "n_segments": 16},
                 "kernel_shap": {"n_samples": 32, "n_segments": 16}}
ALL = jnp.full((8,), xv.PREDICTED, jnp.int32)


class SmallNet(nn.Module):
    """conv -> ReLU -> strided conv -> ReLU -> GAP -> Dense: small but nonlinear. Negative
    biases make units switch on along the path from the black image, so IG's integrand
    is not constant there."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        bias = nn.initializers.constant(-0.3)
        x = nn.relu(nn.Conv(8, (3, 3), bias_init=bias)(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2), bias_init=bias)(x))
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class PatchNet(nn.Module):
    """Logit c = (c + 1) · Σ of the pixels in rows 8..11, columns 20..23: only that patch
    matters."""

    num_classes: int = 10

    def __call__(self, x):
        patch = jnp.sum(x[:, 8:12, 20:24, :], axis=(1, 2, 3))
        return patch[:, None] * jnp.arange(1.0, self.num_classes + 1)[None]


class TwoLayer(nn.Module):
    """y = ReLU(flatten(x) W1) W2, with no activation field for anyone to swap."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(5, use_bias=False)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, use_bias=False)(h)


def ig(model, variables, images, targets, **options):
    """Integrated Gradients jitted whole (run eagerly, each of its ops compiles alone)."""
    return jax.jit(lambda v, x: xv.integrated_gradients(model, v, x, targets, **options))(
        variables, images)


@pytest.fixture(scope="module")
def small():
    model = SmallNet()
    return model, model.init(jax.random.key(5), jnp.zeros((1, 32, 32, 3)))


# ------------------------------------------------------------------ mathematics


def test_gradient_x_input_of_a_linear_model_is_weights_times_input(linear, images):
    model, variables = linear
    targets = jnp.arange(8) % 10
    attributions = xv.gradient_x_input(model, variables, images, targets).maps
    kernel = variables["params"]["Dense_0"]["kernel"]
    expected = kernel[:, targets].T.reshape(images.shape) * images
    np.testing.assert_allclose(attributions, expected, atol=1e-7)


def test_integrated_gradients_is_exact_on_a_linear_model(linear, images):
    model, variables = linear
    baseline = jnp.full((32, 32, 3), 0.5)
    attributions, _, targets, extras = xv.integrated_gradients(
        model, variables, images, ALL, baseline=baseline, steps=4)
    gaps = extras["completeness_gap"]
    kernel = variables["params"]["Dense_0"]["kernel"]
    expected = kernel[:, targets].T.reshape(images.shape) * (images - baseline[None])
    np.testing.assert_allclose(attributions, expected, atol=1e-6)
    assert float(jnp.max(gaps)) < 1e-4


def test_integrated_gradients_completeness_gap_is_under_1_percent_at_64_steps(small, images):
    model, variables = small
    attributions, logits, targets, extras = ig(model, variables, images, ALL, steps=64,
                                               batch_size=128)
    gaps = extras["completeness_gap"]
    change = (jnp.take_along_axis(logits, targets[:, None], 1)[:, 0]
              - model.apply(variables, jnp.zeros_like(images))[jnp.arange(8), targets])
    assert float(jnp.min(jnp.abs(change))) > 0.02  # a real change of the output to explain
    assert float(jnp.max(gaps)) <= 0.01, gaps
    np.testing.assert_allclose(jnp.sum(attributions, axis=(1, 2, 3)), change, rtol=0.01)
    # more steps, smaller gap; and the gap is what it says
    gaps_8 = ig(model, variables, images, ALL, steps=8).extras["completeness_gap"]
    assert float(jnp.mean(gaps)) < float(jnp.mean(gaps_8))


def test_integrated_gradients_does_not_depend_on_batch_size(small, images):
    model, variables = small
    whole = ig(model, variables, images, ALL, steps=16, batch_size=1024)
    chunked = ig(model, variables, images, ALL, steps=16, batch_size=24)
    np.testing.assert_allclose(whole[0], chunked[0], atol=1e-6)


def test_smoothgrad_wraps_integrated_gradients(small, images):
    model, variables = small
    targets = jnp.argmax(model.apply(variables, images), -1)
    ig = lambda x, t: xv.integrated_gradients(model, variables, x, t, steps=8)[0]
    smoothed = xv.smooth_grad(ig, images, targets, jax.random.key(0), n_samples=3,
                              noise_level=0.0, batch_size=8)
    np.testing.assert_allclose(smoothed, ig(images, targets), atol=1e-6)
    noisy = xv.smooth_grad(ig, images, targets, jax.random.key(0), n_samples=3,
                           noise_level=0.1, batch_size=8)
    assert not np.allclose(noisy, smoothed, atol=1e-4)


def test_grad_cam_plus_plus_follows_its_closed_form(images):
    model = CamNet()
    variables = model.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
    maps, logits, targets, _ = xv.grad_cam_plus_plus(model, variables, images, ALL)
    acts = np.asarray(model.apply(variables, images, method=lambda m, x: m.features(x)))
    w = np.asarray(variables["params"]["dense"]["kernel"])  # (6, 10)
    for n in range(len(images)):
        g = np.broadcast_to(w[:, int(targets[n])] / 64, acts[n].shape)  # ∂y/∂A through GAP
        denominator = 2 * g**2 + acts[n].sum(axis=(0, 1)) * g**3
        alpha = np.where(denominator != 0, g**2 / np.where(denominator != 0, denominator, 1), 0)
        weights = (alpha * np.maximum(g, 0)).sum(axis=(0, 1))
        cam = np.maximum(np.einsum("hwk,k->hw", acts[n], weights), 0)
        expected = jax.image.resize(cam, (32, 32), "bilinear")
        np.testing.assert_allclose(maps[n], expected, rtol=1e-4, atol=1e-7)
    assert float(jnp.min(maps)) >= 0


def test_occlusion_peaks_on_the_only_patch_the_model_looks_at(images):
    model = PatchNet()
    maps, _, targets, _ = xv.occlusion(model, {}, images, ALL, patch=4, stride=2)
    assert np.all(np.asarray(targets) == 9)
    inside = np.zeros((32, 32), bool)
    inside[8:12, 20:24] = True
    for m in np.asarray(maps):
        row, col = np.unravel_index(np.argmax(m), m.shape)
        assert inside[row, col]
        near = np.zeros((32, 32), bool)
        near[5:15, 17:27] = True  # squares that overlap the patch reach 3 px out
        assert np.abs(m[~near]).max() < 1e-4 * m.max()  # float rounding only
    # a square exactly on the patch removes all of the logit
    exact = xv.occlusion(model, {}, images, ALL, patch=4, stride=4).maps
    expected = 10 * jnp.sum(images[:, 8:12, 20:24], axis=(1, 2, 3))
    np.testing.assert_allclose(exact[:, 9, 21], expected, rtol=1e-5)


def test_rise_is_deterministic_for_a_key_and_finds_the_patch(images):
    model = PatchNet()
    run = lambda key: xv.rise(model, {}, images, ALL, key, n_masks=500, cell_size=4,
                              batch_size=1000)[0]
    first, again, other = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    masks = xv.rise_masks(jax.random.key(0), 200, cell_size=4, keep_prob=0.3)
    assert masks.shape == (200, 32, 32) and 0 <= float(masks.min()) <= float(masks.max()) <= 1
    assert abs(float(masks.mean()) - 0.3) < 0.05
    patch = np.asarray(first[:, 8:12, 20:24]).mean(axis=(1, 2))
    far = np.asarray(first[:, 24:, :8]).mean(axis=(1, 2))
    assert np.all(patch > far)


def test_guided_backprop_matches_a_hand_computed_two_layer_network():
    model = TwoLayer()
    x = jax.random.uniform(jax.random.key(4), (2, 32, 32, 3))
    variables = model.init(jax.random.key(6), x)
    w1 = np.asarray(variables["params"]["Dense_0"]["kernel"])  # (3072, 5)
    w2 = np.asarray(variables["params"]["Dense_1"]["kernel"])  # (5, 3)
    targets = jnp.array([0, 2])
    guided, logits, _, _ = xv.guided_backprop(model, variables, x, targets)
    plain, _, _ = xv.input_gradients(model, variables, x, targets)
    flat = np.asarray(x).reshape(2, -1)
    for n, c in enumerate([0, 2]):
        pre, upstream = flat[n] @ w1, w2[:, c]
        expected_guided = w1 @ (upstream * ((pre > 0) & (upstream > 0)))
        expected_plain = w1 @ (upstream * (pre > 0))
        np.testing.assert_allclose(guided[n].ravel(), expected_guided, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(plain[n].ravel(), expected_plain, rtol=1e-4, atol=1e-6)
    assert not np.allclose(guided, plain)  # the rule really changed something
    # the forward pass is unchanged
    np.testing.assert_allclose(logits, model.apply(variables, x), rtol=1e-6)


def test_guided_grad_cam_is_guided_backprop_times_grad_cam(tiny_model, tiny_variables, images):
    run = lambda fn, targets: jax.jit(  # noqa: E731 - eagerly, each op would compile alone
        lambda v, x: fn(tiny_model, v, x, targets))(tiny_variables, images)
    guided, _, targets, _ = run(xv.guided_backprop, ALL)
    cams = run(xv.grad_cam, targets).maps
    product = run(xv.guided_grad_cam, ALL).maps
    np.testing.assert_allclose(product, guided * cams[..., None], rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------ contracts


@pytest.mark.parametrize("method", [m for m in xv.METHODS if m != "attention_rollout"])
def test_one_image_alone_equals_it_inside_a_batch(method, tiny_model, tiny_variables, images,
                                                  request):
    if method == "smoothgrad":  # vmapped draws equal per-key draws only under threefry
        request.getfixturevalue("threefry")
    """Image 3 explained without batch-mates, as a batch of its copies (the same shape,
    so one compiled program serves both calls). Explainer.explain adds the batch axis
    to a single 3-D image the same way for every method; test_xai.py tests that path."""
    explainer = xv.Explainer(tiny_model, method, batch_size=512, **SMALL_OPTIONS.get(method, {}))
    params, stats = tiny_variables["params"], tiny_variables["batch_stats"]
    maps, preds, scores = explainer.explain(params, stats, images, normalize=False)
    copies, pred, score = explainer.explain(params, stats, np.repeat(images[3:4], 8, axis=0),
                                            normalize=False)
    assert maps.shape == (8, 32, 32) and np.isfinite(maps).all()
    np.testing.assert_allclose(copies, np.broadcast_to(maps[3], copies.shape), atol=ATOL)
    assert np.all(pred == preds[3])
    np.testing.assert_allclose(score, scores[3], atol=1e-5)
    if not xv.METHODS[method].signed:
        assert maps.min() >= 0


def test_integrated_gradients_class_reports_attributions_and_gaps(small, images):
    model, variables = small
    explainer = xv.IntegratedGradients(model, steps=64, batch_size=128)
    attributions, gaps = explainer.attributions(variables["params"], None, images)
    expected, _, _, extras = xv.integrated_gradients(model, variables, images, ALL, steps=64)
    expected_gaps = extras["completeness_gap"]
    np.testing.assert_allclose(attributions, expected, atol=1e-6)
    np.testing.assert_allclose(gaps, expected_gaps, atol=1e-6)
    one, gap = explainer.attributions(variables["params"], None, images[0])
    assert one.shape == (32, 32, 3) and gap == pytest.approx(float(gaps[0]), abs=1e-5)
