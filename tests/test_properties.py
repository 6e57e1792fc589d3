"""Property-based tests (hypothesis): the explainers' shape, range and batch contracts
and the metrics' invariants hold for any images, classes and maps, not only hand-picked
ones.

Shapes stay fixed, so every function compiles once; the examples are derandomized (see
conftest.py), so a run is repeatable.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import xai_metrics as xm
import xai_visualizations as xv

N = 3  # images per batch
METHODS = ("gradcam", "saliency", "grad_x_input")  # a CAM, an unsigned and a signed gradient
KINDS = ("noise", "constant", "stripes", "black", "white")


@st.composite
def image_batches(draw):
    """N images, each noise, a flat colour, stripes, black or white; float or uint8."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    images = []
    for kind in draw(st.lists(st.sampled_from(KINDS), min_size=N, max_size=N)):
        if kind == "noise":
            images.append(rng.uniform(size=(32, 32, 3)))
        elif kind == "constant":
            images.append(np.full((32, 32, 3), draw(st.floats(0, 1))))
        elif kind == "stripes":
            images.append(np.broadcast_to((np.arange(32) % 2)[:, None, None], (32, 32, 3)))
        else:
            images.append(np.full((32, 32, 3), float(kind == "white")))
    images = np.stack(images).astype(np.float32)
    return np.round(images * 255).astype(np.uint8) if draw(st.booleans()) else images


targets = st.one_of(st.none(), st.integers(0, 9), st.lists(st.integers(0, 9), min_size=N,
                                                           max_size=N))


@pytest.fixture(scope="module")
def explainers(tiny_model):
    return {name: xv.Explainer(tiny_model, name) for name in METHODS}


@given(method=st.sampled_from(METHODS), images=image_batches(), target=targets,
       index=st.integers(0, N - 1))
def test_explainer_contracts(method, images, target, index, explainers, tiny_model,
                             tiny_variables):
    explainer = explainers[method]
    params, stats = tiny_variables["params"], tiny_variables["batch_stats"]
    raw, preds, scores = explainer.explain(params, stats, images, target, normalize=False)

    # Shape and range: finite raw maps; unsigned methods never give a negative value.
    assert raw.shape == (N, 32, 32) and raw.dtype == np.float32 and np.isfinite(raw).all()
    if not explainer.signed:
        assert (raw >= 0).all()

    # Predictions and scores: the argmax, and the softmax of the explained class.
    floats = images / 255 if images.dtype == np.uint8 else images
    probs = np.asarray(jax.nn.softmax(tiny_model.apply(tiny_variables, jnp.asarray(floats))))
    np.testing.assert_array_equal(preds, probs.argmax(-1))
    explained = preds if target is None else np.broadcast_to(target, (N,))
    np.testing.assert_allclose(scores, probs[np.arange(N), explained], atol=1e-6)

    # Batch contract: one image alone gives, normalised, its batch map min-max scaled into
    # [0, 1] (a constant map is all zeros), and the same prediction and score.
    one_target = target if target is None or np.isscalar(target) else target[index]
    one, pred, score = explainer.explain(params, stats, images[index], one_target)
    assert one.shape == (32, 32) and (one >= 0).all() and (one <= 1).all()
    np.testing.assert_allclose(one, xv.normalize_maps(raw[index]), atol=2e-4)
    assert pred == preds[index] and score == pytest.approx(scores[index], abs=1e-6)


# Maps with ties (a few distinct values) and without.
small_maps = st.one_of(
    arrays(np.float32, (2, 8, 8), elements=st.floats(-1, 1, width=32)),
    arrays(np.float32, (2, 8, 8), elements=st.sampled_from([0.0, 0.5, 1.0])))


@given(a=small_maps, b=small_maps)
def test_spearman_is_scipys_symmetric_bounded_and_rank_invariant(a, b):
    rho = np.asarray(xm.spearman(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_allclose(rho, np.asarray(xm.spearman(jnp.asarray(b), jnp.asarray(a))),
                               atol=1e-6)
    assert (np.abs(rho) <= 1 + 1e-6).all()
    warped = np.asarray(xm.spearman(jnp.asarray(a**3 + 2 * a), jnp.asarray(b)))
    np.testing.assert_allclose(warped, rho, atol=1e-5)  # a strictly increasing transform
    for i in range(2):
        if np.ptp(a[i]) > 0 and np.ptp(b[i]) > 0:
            expected = scipy.stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic
            assert rho[i] == pytest.approx(expected, abs=1e-5)
        else:
            assert rho[i] == 0  # a constant map ranks nothing


unit_maps = arrays(np.float32, (2, 8, 8), elements=st.floats(0, 1, width=32))


@given(a=unit_maps, b=unit_maps)
def test_ssim_is_symmetric_at_most_one_and_one_for_equal_maps(a, b):
    s = np.asarray(xm.ssim(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_allclose(s, np.asarray(xm.ssim(jnp.asarray(b), jnp.asarray(a))),
                               atol=1e-6)
    assert (s <= 1 + 1e-5).all()
    np.testing.assert_allclose(np.asarray(xm.ssim(jnp.asarray(a), jnp.asarray(a))), 1,
                               atol=1e-5)


@pytest.fixture(scope="module")
def curves(tiny_model, tiny_variables):
    return jax.jit(lambda images, maps: xm.deletion_insertion(
        tiny_model, tiny_variables, images, maps, jnp.full((2,), xv.PREDICTED), step=256))


@given(images=arrays(np.float32, (2, 32, 32, 3), elements=st.floats(0, 1, width=32)),
       maps=arrays(np.float32, (2, 32, 32), elements=st.floats(-1, 1, width=32)))
def test_deletion_and_insertion_are_probabilities_between_the_image_and_the_baseline(
        images, maps, curves, tiny_model, tiny_variables):
    out = jax.tree.map(np.asarray, curves(jnp.asarray(images), jnp.asarray(maps)))
    probs = np.asarray(jax.nn.softmax(tiny_model.apply(tiny_variables, jnp.asarray(images))))
    p = probs.max(-1)  # the predicted class's probability on the untouched image
    np.testing.assert_allclose(out["deletion"][:, 0], p, atol=1e-5)
    np.testing.assert_allclose(out["insertion"][:, -1], p, atol=1e-5)
    for name in ("deletion", "insertion", "deletion_auc", "insertion_auc"):
        assert ((out[name] >= 0) & (out[name] <= 1)).all(), name
