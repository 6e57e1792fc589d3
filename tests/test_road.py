"""ROAD (Rong et al. 2022): the noisy linear imputation on hand-computed fixtures and
against a direct sparse solve, and the curves on a model whose important pixels are known."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg

import xai_metrics as xm

H = W = 12


def impute(images, removed, noise=0.0, key=0):
    return np.asarray(xm.road_impute(jnp.asarray(images, jnp.float32), jnp.asarray(removed),
                                     jax.random.key(key), noise=noise))


def test_the_neighbour_weights_are_one_sixth_and_one_twelfth_renormalised_at_the_edges():
    """One removed pixel among known ones: direct neighbours 1, diagonal ones 0. Inside,
    4 · 1/6 = 2/3; in a corner, 2 direct and 1 diagonal neighbour are left, so
    (2/6) / (2/6 + 1/12) = 4/5; on an edge, (3/6) / (3/6 + 2/12) = 3/4."""
    for (i, j), expected in (((5, 5), 2 / 3), ((0, 0), 4 / 5), ((0, 5), 3 / 4)):
        image = np.zeros((1, H, W, 1))
        for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            if 0 <= i + di < H and 0 <= j + dj < W:
                image[0, i + di, j + dj] = 1.0
        image[0, i, j] = 7.0  # removed: its own value must not leak
        removed = np.zeros((1, H, W), bool)
        removed[0, i, j] = True
        out = impute(image, removed)
        np.testing.assert_allclose(out[0, i, j, 0], expected, rtol=1e-5)
        np.testing.assert_array_equal(np.delete(out.ravel(), i * W + j),
                                      np.delete(image.ravel(), i * W + j))


def ramp(channels=3):
    i, j = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    return np.stack([0.02 * i + 0.03 * j + 0.1 * c for c in range(channels)], -1)[None]


def test_a_ramp_is_reproduced_when_only_interior_pixels_are_removed():
    removed = np.random.default_rng(0).random((1, H, W)) < 0.6
    interior = removed.copy()
    interior[:, [0, -1], :] = interior[:, :, [0, -1]] = False
    np.testing.assert_allclose(impute(ramp(), interior), ramp(), atol=1e-5)
    # With border pixels removed, the renormalised edge weights are not linear-exact.
    border = interior.copy()
    border[0, 0, :] = True
    assert np.abs(impute(ramp(), border) - ramp()).max() > 1e-3


def direct_solve(image, removed):
    """The paper's system built pixel by pixel and solved by scipy's sparse LU."""
    index = -np.ones(removed.shape, int)
    index[removed] = np.arange(removed.sum())
    a = scipy.sparse.lil_matrix((removed.sum(),) * 2)
    b = np.zeros((removed.sum(), image.shape[-1]))
    for row, (i, j) in enumerate(np.argwhere(removed)):
        for di, dj, weight in xm.ROAD_NEIGHBOURS:
            if 0 <= i + di < H and 0 <= j + dj < W:
                a[row, row] += weight
                if removed[i + di, j + dj]:
                    a[row, index[i + di, j + dj]] -= weight
                else:
                    b[row] += weight * image[i + di, j + dj]
    out = image.copy()
    out[removed] = scipy.sparse.linalg.spsolve(a.tocsc(), b)
    return out


def test_the_imputation_solves_the_papers_system_and_is_the_same_alone_and_in_a_batch():
    rng = np.random.default_rng(1)
    images = rng.random((3, H, W, 3))
    removed = rng.random((3, H, W)) < np.array([0.1, 0.5, 0.9])[:, None, None]
    removed[2, 2:10, 2:10] = True  # a large hole, filled from afar
    out = impute(images, removed)
    for k in range(3):
        np.testing.assert_allclose(out[k], direct_solve(images[k], removed[k]), atol=2e-5)
        np.testing.assert_array_equal(impute(images[k:k + 1], removed[k:k + 1])[0], out[k])


def test_the_noise_is_keyed_and_lies_only_on_removed_pixels():
    rng = np.random.default_rng(2)
    images, removed = rng.random((2, H, W, 3)), rng.random((2, H, W)) < 0.5
    plain = impute(images, removed)
    noisy = impute(images, removed, noise=0.01, key=3)
    np.testing.assert_array_equal(noisy, impute(images, removed, noise=0.01, key=3))
    assert not np.array_equal(noisy, impute(images, removed, noise=0.01, key=4))
    diff = noisy - plain
    assert np.all(diff[~removed] == 0)
    assert 0.007 < diff[removed].std() < 0.013  # N(0, 0.01²)


def test_bad_arguments_are_refused_in_words():
    images = jnp.zeros((2, H, W, 3))
    with pytest.raises(ValueError, match=r"removed must be a \(N, H, W\)"):
        xm.road_impute(images, jnp.zeros((2, H, W, 3), bool), jax.random.key(0))
    with pytest.raises(TypeError, match="removed must be a boolean mask, got dtype float32"):
        xm.road_impute(images, jnp.zeros((2, H, W)), jax.random.key(0))
    with pytest.raises(ValueError, match="noise must be a number finite and >= 0, got -1"):
        xm.road_impute(images, jnp.zeros((2, H, W), bool), jax.random.key(0), noise=-1)


class TemplateNet(nn.Module):
    """Class 0 while the pixels of `region` keep the values of a fixed noise template,
    class 1 otherwise: logit 0 = 4 − 40 · mean over the region of (x − template)². The
    template is noise, so no imputation from neighbours recovers it; pixels outside the
    region do not matter at all."""

    @nn.compact
    def __call__(self, x):
        template = jax.random.uniform(jax.random.key(9), (H, W, 3))
        region = jnp.zeros((H, W, 1)).at[3:7, 4:9].set(1.0)
        error = jnp.sum(region[None] * (x - template[None]) ** 2, axis=(1, 2, 3)) / jnp.sum(region)
        return jnp.stack([4.0 - 40.0 * error, jnp.zeros_like(error)], -1)


def test_road_ranks_the_perfect_map_over_random_and_random_over_the_worst_in_both_orders():
    model = TemplateNet()
    rng = np.random.default_rng(3)
    n = 6
    # The region shows the template; the rest is other noise.
    images = jnp.asarray(rng.random((n, H, W, 3)), jnp.float32)
    template = jax.random.uniform(jax.random.key(9), (H, W, 3))
    images = images.at[:, 3:7, 4:9].set(template[3:7, 4:9])
    perfect = jnp.zeros((n, H, W)).at[:, 3:7, 4:9].set(1.0) + 0.01 * jnp.asarray(
        rng.random((n, H, W)))  # ties broken at random, inside and outside
    random = xm.random_maps(jax.random.key(5), (n, H, W))
    targets = jnp.zeros((n,), jnp.int32)
    run = jax.jit(lambda maps: xm.road(model, {}, images, maps, targets, jax.random.key(0),
                                       batch_size=16))
    scores = {name: run(maps) for name, maps in
              (("perfect", perfect), ("random", random), ("worst", -perfect))}
    morf = {k: float(v["morf_auc"].mean()) for k, v in scores.items()}
    lerf = {k: float(v["lerf_auc"].mean()) for k, v in scores.items()}
    assert morf["perfect"] < morf["random"] < morf["worst"], morf
    assert lerf["perfect"] > lerf["random"] > lerf["worst"], lerf
    # Removing exactly the region's 20 pixels (14 %) flips the prediction: the perfect
    # map's MoRF accuracy is 0 from 20 % on, and its LeRF accuracy 1 up to 80 %.
    assert not np.asarray(scores["perfect"]["morf_correct"][:, 1:]).any()
    assert np.asarray(scores["perfect"]["lerf_correct"][:, :8]).all()
    np.testing.assert_allclose(scores["perfect"]["fractions"], xm.ROAD_FRACTIONS, rtol=1e-6)
    # The curves do not depend on how the pairs are batched.
    one_batch = xm.road(model, {}, images, perfect, targets, jax.random.key(0),
                        batch_size=1024)
    np.testing.assert_allclose(one_batch["morf"], scores["perfect"]["morf"], atol=1e-6)
