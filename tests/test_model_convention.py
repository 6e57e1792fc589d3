"""One model convention from explainers to metrics, cards and attacks: a linen model whose
`__call__` requires `train` (given as `apply_kwargs`), and a plain function f(x) -> logits
with None for its variables, go through every metric, the saliency card and the
robustness card. Each metric on the linen model equals the same metric on the plain
function that calls it: two routes to one number."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cifar10_data
import evaluate_xai
import robustness_xai as rx
import xai_metrics as xm
import xai_visualizations as xv

SHAPE = (8, 8, 3)
KWARGS = {"train": False}


class NeedsTrainFlag(nn.Module):
    """conv -> BatchNorm -> ReLU -> GAP -> Dropout -> Dense; `train` has no default."""

    @nn.compact
    def __call__(self, x, train):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(6, (3, 3))(x)))
        x = nn.Dropout(0.5, deterministic=not train)(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(5)(x)


@pytest.fixture(scope="module")
def setup():
    model = NeedsTrainFlag()
    variables = model.init(jax.random.key(0), jnp.zeros((1,) + SHAPE), train=False)
    images = jax.random.uniform(jax.random.key(1), (4,) + SHAPE)
    maps = jax.random.uniform(jax.random.key(2), (4,) + SHAPE[:2])
    targets = jnp.array([0, 1, 2, -1], jnp.int32)
    plain = jax.jit(lambda x: model.apply(variables, x, train=False))
    return model, variables, plain, images, maps, targets


def test_every_metric_takes_apply_kwargs_and_a_plain_function(setup):
    model, variables, plain, images, maps, targets = setup
    key = jax.random.key(3)
    metrics = {
        "deletion_insertion": lambda m, v, x, s, t, k, **kw: xm.deletion_insertion(
            m, v, x, s, t, step=16, **kw),
        "road": lambda m, v, x, s, t, k, **kw: xm.road(m, v, x, s, t, k, **kw),
        "faithfulness_correlation": lambda m, v, x, s, t, k, **kw:
            xm.faithfulness_correlation(m, v, x, s, t, k, subset_size=8, n_subsets=8, **kw),
        "infidelity": lambda m, v, x, s, t, k, **kw: xm.infidelity(
            m, v, x, s, t, k, n_perturbations=4, **kw),
        "evidence": lambda m, v, x, s, t, k, **kw: xm.evidence(
            m, v, x, s, t, k, step=16, **kw)._asdict(),
    }
    for name, metric in metrics.items():
        # one program per route, the model's variables and the data as arguments
        linen = jax.jit(lambda v, *args, metric=metric: metric(model, v, *args,
                                                                apply_kwargs=KWARGS))(
            variables, images, maps, targets, key)
        function = jax.jit(lambda *args, metric=metric: metric(plain, None, *args))(
            images, maps, targets, key)
        jax.tree.map(lambda a, b, name=name: np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-6, err_msg=name), linen, function)
    # The model needs its flag: without it, the metric fails, so the flag was used.
    with pytest.raises(TypeError, match="train"):
        xm.road(model, variables, images, maps, targets, key)
    explain = lambda x, t: xv.explain("saliency", plain, None, x, t).maps  # noqa: E731
    found = xm.sensitivity(explain, images, jnp.argmax(plain(images), -1), key, n_samples=2)
    assert np.all(np.isfinite(found.max)) and np.all(found.max >= found.avg)
    levels = xm.randomization_levels(model, variables, SHAPE, KWARGS)
    assert [label for label, _ in levels] == ["Dense_0", "Conv_0"]  # output first


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    test = rng.integers(0, 256, (8,) + SHAPE, dtype=np.uint8)
    return cifar10_data.Cifar10(test, np.arange(8) % 5, test, np.arange(8) % 5)


EVAL = dict(num_images=8, chunk=4, randomization_images=2, step=16, batch_size=64,
            faithfulness_subsets=4, infidelity_perturbations=2, focus_mosaics=0, quiet=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["train flag", "plain function"])
def test_the_saliency_card_runs_on_both(kind, setup, data, tmp_path):
    model, variables, plain, *_ = setup
    config = evaluate_xai.EvalConfig(output_dir=str(tmp_path), methods=("saliency",), **EVAL)
    if kind == "train flag":
        config = dataclasses.replace(config, apply_kwargs=(("train", False),))
        report = evaluate_xai.evaluate(config, model, variables, data)
        card = report["methods"]["saliency"]
        assert card["randomization_levels"] == ["Dense_0", "Conv_0"]
        assert card["verdicts"]["randomization"] in ("passes", "fails")
    else:
        report = evaluate_xai.evaluate(config, plain, None, data)
        card = report["methods"]["saliency"]
        assert card["randomization"] is None and card["verdicts"]["randomization"] == "not run"
        assert "not run (no parameters)" in (tmp_path / "evaluation.md").read_text()
    assert 0 <= card["deletion_auc"] <= 1 and 0 <= card["insertion_auc"] <= 1
    labels = np.argmax(plain(jnp.asarray(data.test_images, jnp.float32) / 255), -1)
    assert report["accuracy"] == pytest.approx(np.mean(labels == data.test_labels))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["train flag", "plain function"])
def test_the_robustness_card_runs_on_both(kind, setup, data, tmp_path):
    model, variables, plain, *_ = setup
    config = rx.RobustnessConfig(
        output_dir=str(tmp_path), methods=("saliency",), accuracy_images=4,
        accuracy_epsilons=(0, 8), pgd_steps=2, num_images=4, sensitivity_images=4,
        fragility_epsilons=(8,), attack_steps=1, top_k=8, manipulation_images=4,
        manipulation_steps=1, sensitivity_samples=2, chunk=4, quiet=True)
    if kind == "train flag":
        config = dataclasses.replace(config, apply_kwargs=(("train", False),))
        report = rx.run(config, model, variables, data)
    else:
        report = rx.run(config, plain, None, data)
    labels = np.argmax(plain(jnp.asarray(data.test_images[:4], jnp.float32) / 255), -1)
    assert report["accuracy"]["fgsm"][0] == pytest.approx(np.mean(labels == data.test_labels[:4]))
    fragility = report["methods"]["saliency"]["fragility"]["by_eps"]["8"]
    assert 0 <= fragility["attack"]["top_k"] <= 1
    assert report["manipulation"]["num_images"] == 4


@pytest.mark.parametrize("method", ["guided_backprop", "lrp"])
def test_program_rewriters_read_what_a_jitted_function_closes_over(method, setup):
    """Guided Backprop and LRP rewrite the traced program: a jitted plain function keeps
    its weights as constants of its inner program, and they must be read from there."""
    model, variables, plain, images, _, targets = setup
    linen = xv.explain(method, model, variables, images, targets, apply_kwargs=KWARGS).maps
    function = xv.explain(method, plain, None, images, targets).maps
    np.testing.assert_allclose(function, linen, rtol=1e-5, atol=1e-6 * np.abs(linen).max())
