"""Faithfulness and sanity metrics: what they must say on models whose answer is known."""

import flax.linen as nn
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import train_cifar10 as tc
import xai_metrics as xm
import xai_visualizations as xv
from cifar10_cnn_model import CIFAR10CNN


class EvidenceNet(nn.Module):
    """Two classes; logit 0 = Σ w ⊙ x − b with w >= 0 fixed, logit 1 = 0. Pixel (i, j)'s
    exact contribution to logit 0 is Σ_c w_ijc x_ijc."""

    num_classes: int = 2

    @nn.compact
    def __call__(self, x):
        w = self.param("w", lambda key: jax.random.uniform(key, (32, 32, 3)))
        z = jnp.sum(x * w[None], axis=(1, 2, 3)) - 300.0
        return jnp.stack([z / 50.0, jnp.zeros_like(z)], axis=-1)


@pytest.fixture(scope="module")
def evidence(images):
    model = EvidenceNet()
    variables = model.init(jax.random.key(7), images[:1])
    contribution = jnp.sum(images * variables["params"]["w"][None], axis=-1)
    return model, variables, contribution


def test_deletion_and_insertion_rank_perfect_random_and_worst_maps(evidence, images):
    model, variables, perfect = evidence
    targets = jnp.zeros((8,), jnp.int32)
    maps = {"perfect": perfect, "random": xm.random_maps(jax.random.key(0), perfect.shape),
            "worst": -perfect}
    auc = {name: xm.deletion_insertion(model, variables, images, m, targets, step=16,
                                       insertion_baseline="zero")
           for name, m in maps.items()}
    deletion = {k: float(jnp.mean(v["deletion_auc"])) for k, v in auc.items()}
    insertion = {k: float(jnp.mean(v["insertion_auc"])) for k, v in auc.items()}
    assert deletion["perfect"] < deletion["random"] < deletion["worst"], deletion
    assert insertion["perfect"] > insertion["random"] > insertion["worst"], insertion
    # per image too, for the perfect and the worst map
    assert np.all(auc["perfect"]["deletion_auc"] < auc["worst"]["deletion_auc"])


def test_curves_start_at_the_image_end_at_the_baseline_and_integrate_by_trapezoid(
        evidence, images):
    model, variables, perfect = evidence
    targets = jnp.zeros((8,), jnp.int32)
    out = xm.deletion_insertion(model, variables, images, perfect, targets, step=1024,
                                deletion_baseline="mean", insertion_baseline="blur")
    probs = lambda x: jax.nn.softmax(model.apply(variables, x))[:, 0]
    clean = probs(images)
    np.testing.assert_array_equal(out["fractions"], [0.0, 1.0])
    np.testing.assert_allclose(out["deletion"][:, 0], clean, rtol=1e-5)
    np.testing.assert_allclose(out["deletion"][:, 1],
                               probs(xm.baseline_images(images, "mean")), rtol=1e-5)
    np.testing.assert_allclose(out["insertion"][:, 0], probs(xm.gaussian_blur(images)),
                               rtol=1e-5)
    np.testing.assert_allclose(out["insertion"][:, 1], clean, rtol=1e-5)
    np.testing.assert_allclose(out["deletion_auc"], (out["deletion"][:, 0]
                                                     + out["deletion"][:, 1]) / 2, rtol=1e-6)


def test_curves_do_not_depend_on_batch_size_and_step_sizes_the_x_axis(evidence, images):
    model, variables, perfect = evidence
    targets = jnp.zeros((8,), jnp.int32)
    run = lambda batch: xm.deletion_insertion(model, variables, images, perfect, targets,
                                              step=100, batch_size=batch)
    whole, chunked = run(1024), run(7)
    for key in ("deletion", "insertion", "deletion_auc", "insertion_auc"):
        np.testing.assert_allclose(whole[key], chunked[key], rtol=1e-6)
    np.testing.assert_allclose(whole["fractions"], np.minimum(np.arange(12) * 100, 1024) / 1024)
    assert whole["deletion"].shape == (8, 12)


def test_pixel_ranks_put_the_largest_value_first_and_break_ties_in_raster_order():
    maps = jnp.array([[[0.1, 0.9], [0.5, 0.5]]])
    np.testing.assert_array_equal(xm.pixel_ranks(maps), [[[3, 0], [1, 2]]])


def test_baselines_and_blur():
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    flat = jnp.full((1, 32, 32, 3), 0.3)
    np.testing.assert_allclose(xm.gaussian_blur(flat), flat, rtol=1e-6)
    blurred = xm.gaussian_blur(images)
    assert float(jnp.std(blurred)) < 0.5 * float(jnp.std(images))
    np.testing.assert_allclose(xm.baseline_images(images, "mean")[:, 5, 7],
                               jnp.mean(images, axis=(1, 2)), rtol=1e-6)
    assert float(jnp.abs(xm.baseline_images(images, "zero")).max()) == 0
    with pytest.raises(ValueError, match="baseline must be one of"):
        xm.baseline_images(images, "noise")


def test_spearman_matches_scipy_with_ties_and_a_constant_map_scores_zero():
    a = jax.random.normal(jax.random.key(1), (5, 6, 6))
    b = jnp.round(a + jax.random.normal(jax.random.key(2), (5, 6, 6)))  # many ties
    expected = [scipy.stats.spearmanr(np.ravel(a[i]), np.ravel(b[i]))[0] for i in range(5)]
    np.testing.assert_allclose(xm.spearman(a, b), expected, rtol=1e-5)
    np.testing.assert_allclose(xm.spearman(a, -a), -1.0, rtol=1e-6)
    assert float(xm.spearman(a[:1], jnp.zeros((1, 6, 6)))[0]) == 0.0


def test_ssim_is_one_for_equal_maps_symmetric_and_exact_for_constants():
    a = jax.random.uniform(jax.random.key(3), (4, 32, 32))
    b = jax.random.uniform(jax.random.key(4), (4, 32, 32))
    np.testing.assert_allclose(xm.ssim(a, a), 1.0, rtol=1e-5)
    np.testing.assert_allclose(xm.ssim(a, b), xm.ssim(b, a), rtol=1e-6)
    assert float(jnp.max(xm.ssim(a, b))) < 0.2
    assert float(jnp.min(xm.ssim(a, 0.9 * a + 0.1 * b))) > float(jnp.max(xm.ssim(a, b)))
    c1 = 0.01**2
    constant = xm.ssim(jnp.full((1, 16, 16), 0.2), jnp.full((1, 16, 16), 0.6))
    np.testing.assert_allclose(constant, (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1),
                               rtol=1e-4)


@pytest.fixture(scope="module")
def cnn():
    model = CIFAR10CNN(width=4)
    return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_randomization_levels_run_from_the_output_down_to_conv1(cnn):
    model, variables = cnn
    levels = xm.randomization_levels(model, variables)
    assert [label for label, _ in levels] == [
        "head/Dense_1", "head/Dense_0", "block3/Conv_2", "block3/Conv_1", "block3/Conv_0",
        "block2/Conv_1", "block2/Conv_0", "block1/Conv_1", "block1/Conv_0"]
    assert levels[-1][1] == (("block1", "Conv_0"), ("block1", "BatchNorm_0"))
    # a checkpoint's key order (sorted, as a pickle may give it) does not change the order
    sorted_params = jax.tree_util.tree_map(lambda a: a, {
        k: dict(sorted(v.items())) for k, v in sorted(variables["params"].items())})
    assert xm.randomization_levels(model, {**variables, "params": sorted_params}) == levels


def test_cascading_randomization_replaces_one_more_layer_per_level(cnn):
    model, variables = cnn
    fresh = jax.jit(model.init)(jax.random.key(9), jnp.zeros((1, 32, 32, 3)))["params"]
    labels, stacked = xm.cascading_randomization(model, variables, fresh)
    levels = xm.randomization_levels(model, variables)
    stacked, fresh, trained = jax.device_get((stacked, fresh, variables["params"]))
    for level in range(len(labels)):
        params = jax.tree.map(lambda a: a[level], stacked)
        for index, (_, paths) in enumerate(levels):
            for path in paths:
                got = flax.core.unfreeze(params)
                want = flax.core.unfreeze(fresh if index <= level else trained)
                for k in path:  # the module's subtree, looked up by hand
                    got, want = got[k], want[k]
                assert all(jax.tree.leaves(jax.tree.map(np.array_equal, got, want))), (
                    level, path)


def test_maps_of_a_randomised_model_decorrelate_from_the_trained_models():
    """Adebayo et al.'s check on the shipped trained network: gradient maps keep some
    rank correlation when only the output layer is random, and lose it once every layer
    is. (Guided Backprop's failure of this check is in the README's evaluation.)"""
    model, variables = tc.load_checkpoint(tc.PRETRAINED)
    images = jax.random.uniform(jax.random.key(5), (4, 32, 32, 3))
    fresh = jax.jit(model.init)(jax.random.key(6), images[:1])["params"]
    _, stacked = xm.cascading_randomization(model, variables, fresh)
    stacked = jax.device_get(stacked)
    targets = jnp.argmax(model.apply(variables, images), -1)
    explain = jax.jit(lambda v, x, t: xv.explain("saliency", model, v, x, t)[0])
    trained = explain(variables, images, targets)
    np.testing.assert_allclose(xm.spearman(trained, trained), 1.0, rtol=1e-6)
    rho = []
    for level in (0, -1):
        params = jax.tree.map(lambda a: a[level], stacked)
        maps = explain({**variables, "params": params}, images, targets)
        rho.append(float(jnp.mean(xm.similarity(maps, trained)["spearman_abs"])))
    assert rho[1] < 0.5 and rho[1] < rho[0], rho


def test_random_other_classes_never_pick_the_target():
    targets = jnp.arange(1000) % 10
    other = xm.random_other_classes(jax.random.key(0), targets, 10)
    assert not np.any(np.asarray(other) == np.asarray(targets))
    assert set(np.asarray(other).tolist()) == set(range(10))
