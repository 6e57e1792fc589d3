"""Faithfulness and sanity metrics: what they must say on models whose answer is known."""

import flax.linen as nn
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import checkpoints
import train_cifar10 as tc
import xai_core
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
    np.testing.assert_allclose(out["insertion"][:, 0], probs(xai_core.gaussian_blur(images)),
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
    np.testing.assert_allclose(xai_core.gaussian_blur(flat), flat, rtol=1e-6)
    blurred = xai_core.gaussian_blur(images)
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


def test_top_k_intersection_counts_the_shared_top_pixels_by_hand():
    a = jnp.array([[[9.0, 0.1, 0.2], [-8.0, 0.3, 7.0]]])  # top 3 of |a|: pixels 0, 3, 5
    b = jnp.array([[[0.5, 6.0, 0.0], [5.0, 0.1, -4.0]]])  # top 3 of |b|: pixels 1, 3, 5
    np.testing.assert_allclose(xm.top_k_intersection(a, b, 3), [2 / 3])
    np.testing.assert_allclose(xm.top_k_intersection(a, b, 1), [0.0])
    np.testing.assert_allclose(xm.top_k_intersection(a, b, 6), [1.0])
    with pytest.raises(ValueError, match="k must be at most the 6 pixels"):
        xm.top_k_intersection(a, b, 7)


def test_an_identical_model_survives_with_rho_one_and_top_k_one():
    maps = jax.random.normal(jax.random.key(4), (3, 8, 8))
    same = xm.map_survival(maps, maps, k=10)
    np.testing.assert_allclose(same["spearman"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(same["top_k"], 1.0)
    other = xm.map_survival(jax.random.normal(jax.random.key(5), (3, 8, 8)), maps, k=10)
    assert np.all(np.abs(other["spearman"]) < 0.5) and np.all(other["top_k"] < 0.6)


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


@pytest.mark.parametrize("given", ["variables", "params"])
def test_cascading_randomization_replaces_one_more_layer_per_level(cnn, given):
    """Given the fresh variables, a re-initialised layer takes the fresh BatchNorm
    statistics too, and the last level is the fresh model exactly; given only fresh
    params, the trained statistics stay everywhere."""
    model, variables = cnn
    fresh = jax.jit(model.init)(jax.random.key(9), jnp.zeros((1, 32, 32, 3)))
    labels, stacked = xm.cascading_randomization(
        model, variables, fresh if given == "variables" else fresh["params"])
    levels = xm.randomization_levels(model, variables)
    stacked, fresh, trained = jax.device_get((stacked, fresh, variables))
    assert set(stacked) == {"params", "batch_stats"}
    for level in range(len(labels)):
        at_level = jax.tree.map(lambda a: a[level], stacked)
        for index, (_, paths) in enumerate(levels):
            for path in paths:
                for collection in ("params", "batch_stats"):
                    got = flax.core.unfreeze(at_level[collection])
                    new = index <= level and (collection == "params" or given == "variables")
                    want = flax.core.unfreeze((fresh if new else trained)[collection])
                    if path[0] not in want or (len(path) > 1 and path[1] not in want[path[0]]):
                        continue  # a module without statistics
                    for k in path:  # the module's subtree, looked up by hand
                        got, want = got[k], want[k]
                    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, got, want))), (
                        level, path, collection)
    if given == "variables":
        last = jax.tree.map(lambda a: a[-1], stacked)
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, last, fresh)))


def test_maps_of_a_randomised_model_decorrelate_from_the_trained_models():
    """Adebayo et al.'s check on the shipped trained network: gradient maps keep some
    rank correlation when only the output layer is random, and lose it once every layer
    is. (Guided Backprop's failure of this check is in the README's evaluation.)"""
    model, variables = tc.load_checkpoint(checkpoints.PRETRAINED)
    images = jax.random.uniform(jax.random.key(5), (4, 32, 32, 3))
    fresh = jax.jit(model.init)(jax.random.key(6), images[:1])
    _, stacked = xm.cascading_randomization(model, variables, fresh)
    stacked = jax.device_get(stacked)
    targets = jnp.argmax(model.apply(variables, images), -1)
    explain = jax.jit(lambda v, x, t: xv.explain("saliency", model, v, x, t)[0])
    trained = explain(variables, images, targets)
    np.testing.assert_allclose(xm.spearman(trained, trained), 1.0, rtol=1e-6)
    traces = []

    def counted(*args):
        traces.append(1)
        return explain(*args)

    every_level = xm.randomization_maps(counted, stacked, images, targets)
    assert every_level.shape == (len(jax.tree.leaves(stacked)[0]), 4, 32, 32)
    assert len(traces) == 1  # one program for every level: the level is an argument
    rho = []
    for level in (0, -1):
        maps = explain(jax.tree.map(lambda a: a[level], stacked), images, targets)
        np.testing.assert_allclose(every_level[level], maps, rtol=1e-5, atol=1e-7)
        rho.append(float(jnp.mean(xm.similarity(maps, trained)["spearman_abs"])))
    assert rho[1] < 0.5 and rho[1] < rho[0], rho


def test_random_other_classes_never_pick_the_target():
    targets = jnp.arange(1000) % 10
    other = xm.random_other_classes(jax.random.key(0), targets, 10)
    assert not np.any(np.asarray(other) == np.asarray(targets))
    assert set(np.asarray(other).tolist()) == set(range(10))


# ---------------------------------------------------------------------------------------
# Faithfulness correlation, infidelity, sparseness, complexity and Focus.


def test_faithfulness_correlation_is_one_for_the_exact_decomposition_of_an_additive_model(
        evidence, images):
    """EvidenceNet's logit 0 is additive in pixels: setting S to black removes exactly
    Σ_{i∈S} (its contribution / 50), so that map correlates perfectly."""
    model, variables, contribution = evidence
    targets = jnp.zeros((8,), jnp.int32)
    exact = xm.faithfulness_correlation(model, variables, images, contribution / 50.0,
                                        targets, jax.random.key(0), n_subsets=40)
    np.testing.assert_allclose(exact, 1.0, atol=1e-4)
    noise = xm.faithfulness_correlation(model, variables, images,
                                        xm.random_maps(jax.random.key(1), (8, 32, 32)),
                                        targets, jax.random.key(0), n_subsets=40)
    assert float(jnp.abs(noise).mean()) < 0.4
    one = xm.faithfulness_correlation(model, variables, images[3:4], contribution[3:4] / 50.0,
                                      targets[:1], jax.random.key(0), n_subsets=40,
                                      batch_size=7)
    np.testing.assert_allclose(one, exact[3:4], atol=1e-5)


def test_infidelity_is_zero_for_gradient_x_input_of_a_linear_model(evidence, images):
    """For f = wᵀx / 50, Gradient × Input is (w / 50) ⊙ x: paired with I / x it gives
    Iᵀw / 50 = f(x) − f(x − I) exactly. Per pixel, the channel-summed gradient paired
    with a perturbation shared by the channels is exact too. A random map is not."""
    model, variables, _ = evidence
    targets = jnp.zeros((8,), jnp.int32)
    w = variables["params"]["w"][None] / 50.0
    key = jax.random.key(2)
    gxi = xm.infidelity(model, variables, images, w * images, targets, key,
                        multiply_by_inputs=True, n_perturbations=16)
    per_pixel = xm.infidelity(model, variables, images, jnp.broadcast_to(w.sum(-1), (8, 32, 32)),
                              targets, key, n_perturbations=16)
    wrong = xm.infidelity(model, variables, images, xm.random_maps(key, (8, 32, 32)), targets,
                          key, n_perturbations=16)
    assert float(jnp.max(gxi)) < 1e-8 and float(jnp.max(per_pixel)) < 1e-8
    assert float(jnp.min(wrong)) > 1e-3
    # Normalised, the scale of a map no longer matters: the exact map times 7 scores 0,
    # and for any map the value is at most the unnormalised one (β = 1 is a candidate).
    scaled = xm.infidelity(model, variables, images, 7 * w * images, targets, key,
                           multiply_by_inputs=True, n_perturbations=16, normalize=True)
    assert float(jnp.max(scaled)) < 1e-8
    normalised = xm.infidelity(model, variables, images, xm.random_maps(key, (8, 32, 32)),
                               targets, key, n_perturbations=16, normalize=True)
    assert np.all(np.asarray(normalised) <= np.asarray(wrong) * (1 + 1e-5))
    assert float(jnp.min(normalised)) > 1e-4
    with pytest.raises(ValueError, match="multiply_by_inputs needs attributions per channel"):
        xm.infidelity(model, variables, images, w.sum(-1) * jnp.ones((8, 1, 1)), targets, key,
                      multiply_by_inputs=True)


def test_sparseness_and_complexity_on_hand_computed_maps():
    one_hot = jnp.zeros((1, 8, 8)).at[0, 2, 5].set(3.0)
    constant = jnp.full((1, 8, 8), 0.7)
    np.testing.assert_allclose(xm.sparseness(one_hot), [1.0], rtol=1e-6)
    np.testing.assert_allclose(xm.sparseness(constant), [0.0], atol=1e-6)
    # |[0, 0, -1, 3]| sorted: Σ (2k − n − 1) a_k = 1 + 9 = 10, / (n Σa = 16), × 4/3.
    np.testing.assert_allclose(xm.sparseness(jnp.array([[[0.0, 0.0], [-1.0, 3.0]]])),
                               [10 / 16 * 4 / 3], rtol=1e-6)
    np.testing.assert_allclose(xm.complexity(one_hot), [0.0], atol=1e-6)
    np.testing.assert_allclose(xm.complexity(constant), [np.log(64)], rtol=1e-6)
    # shares 1/4, 1/4, 1/2 (the zero pixel adds nothing)
    np.testing.assert_allclose(xm.complexity(jnp.array([[[1.0, -1.0], [2.0, 0.0]]])),
                               [scipy.stats.entropy([1, 1, 2])], rtol=1e-6)
    np.testing.assert_array_equal(xm.sparseness(jnp.zeros((2, 4, 4))), [0.0, 0.0])


def test_focus_is_one_on_the_targets_quadrant_and_a_quarter_when_spread():
    quadrants = jnp.array([0, 1, 2, 3])
    maps = jnp.zeros((4, 8, 8))
    for k, (i, j) in enumerate(((0, 0), (0, 4), (4, 0), (4, 4))):
        maps = maps.at[k, i:i + 4, j:j + 4].set(jnp.arange(16.0).reshape(4, 4))
    np.testing.assert_allclose(xm.focus(maps, quadrants), 1.0)
    np.testing.assert_allclose(xm.focus(maps, (quadrants + 1) % 4), 0.0)
    np.testing.assert_allclose(xm.focus(jnp.ones((4, 8, 8)), quadrants), 0.25)
    # Negative relevance is not counted.
    np.testing.assert_allclose(xm.focus(maps - 100.0 * (maps == 0), quadrants), 1.0)


def test_focus_mosaics_put_four_classes_together_with_the_target_in_its_quadrant():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((40, 8, 8, 3)), jnp.float32)
    labels = np.arange(40) % 10
    mosaics, targets, quadrants = xm.focus_mosaics(images, labels, jax.random.key(0), 12)
    assert mosaics.shape == (12, 16, 16, 3)
    for m, t, q in zip(np.asarray(mosaics), np.asarray(targets), np.asarray(quadrants)):
        tiles = [m[i:i + 8, j:j + 8] for i in (0, 8) for j in (0, 8)]
        found = [int(np.flatnonzero((np.asarray(images) == tile).all(axis=(1, 2, 3)))[0])
                 for tile in tiles]
        assert len({labels[f] for f in found}) == 4 and labels[found[q]] == t
    again = xm.focus_mosaics(images, labels, jax.random.key(0), 12)
    np.testing.assert_array_equal(again[0], mosaics)
    half = xm.focus_mosaics(images, labels, jax.random.key(0), 12, half_size=True)[0]
    assert half.shape == (12, 8, 8, 3)
    with pytest.raises(ValueError, match="at least 4 classes"):
        xm.focus_mosaics(images, labels % 3, jax.random.key(0), 2)


def test_a_difference_of_noise_only_is_a_tie_and_a_real_one_is_not():
    rng = np.random.default_rng(0)
    base = rng.random(200)
    a, b = base + 0.01 * rng.standard_normal(200), base + 0.01 * rng.standard_normal(200)
    tie = xm.paired_verdict(a, b, lower_is_better=True)
    assert tie["verdict"] == "tie" and tie["p_value"] > 0.05
    better = xm.paired_verdict(a - 0.02, b, lower_is_better=True)
    assert better["verdict"] == "better" and better["p_value"] < 1e-6
    assert xm.paired_verdict(a - 0.02, b, lower_is_better=False)["verdict"] == "worse"
    assert xm.paired_verdict(a, a, lower_is_better=True) == {
        "verdict": "tie", "p_value": 1.0, "median_difference": 0.0}
    # The p-value is scipy's paired signed-rank test, not a re-derivation.
    assert better["p_value"] == scipy.stats.wilcoxon(a - 0.02, b).pvalue


def test_the_bootstrap_interval_holds_the_mean_and_narrows_with_more_images():
    rng = np.random.default_rng(1)
    few, many = rng.random(20), rng.random(2000)
    small, large = xm.mean_interval(few, 0), xm.mean_interval(many, 0)
    for v, ci in ((few, small), (many, large)):
        assert ci["low"] < ci["mean"] < ci["high"] and ci["mean"] == pytest.approx(v.mean())
    assert large["high"] - large["low"] < 0.3 * (small["high"] - small["low"])
    # Uniform on [0, 1]: σ = 0.289, so the 95 % interval of 2000 means is ~ ±0.0127.
    assert large["high"] - large["low"] == pytest.approx(2 * 1.96 * 0.2887 / np.sqrt(2000),
                                                         rel=0.15)
    assert xm.mean_interval(few, 0) == small  # seeded
    assert xm.mean_interval([0.3, 0.3], 0) == {"mean": 0.3, "low": 0.3, "high": 0.3}
