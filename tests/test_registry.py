"""Adding a method is one `register(...)` call: the evaluation, its command-line flags, the
demo's detailed figure, the explorer's list and the attacks pick it up with no other
edit. The registry itself is read-only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adversarial as adv
import app
import checkpoints
import cifar10_data
import demo_xai
import evaluate_xai
import robustness_xai as rx
import xai_core
import xai_visualizations as xv


def scaled_saliency(model, variables, images, targets, key=None, *, scale=2.0,
                    batch_size=None, apply_kwargs=None):
    """A toy method: the input gradient times `scale`."""
    out = xv.saliency(model, variables, images, targets, apply_kwargs=apply_kwargs)
    return out._replace(maps=scale * out.maps)


TOY = xv.Method(scaled_saliency, "Scaled saliency", False,
                {"scale": xv.Option(2.0, xai_core.check_number, help="the factor")},
                xv.reduce_channels, lambda options, shape: (1, 1), "this test",
                differentiable=True)


@pytest.fixture
def toy(request):
    xv.register("toy", TOY)
    request.addfinalizer(lambda: xv.unregister("toy"))
    return "toy"


def test_the_registry_is_read_only_and_register_refuses_a_clash():
    with pytest.raises(TypeError):
        xv.METHODS["toy"] = TOY
    with pytest.raises(ValueError, match="registered already"):
        xv.register("saliency", TOY)
    with pytest.raises(TypeError, match="method must be a xai_visualizations.Method"):
        xv.register("toy", scaled_saliency)


class Small(nn.Module):
    """conv -> ReLU -> GAP -> Dense on 8 x 8 images: cheap to compile."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(5)(jnp.mean(nn.relu(nn.Conv(4, (3, 3))(x)), axis=(1, 2)))


@pytest.mark.slow
def test_one_register_call_adds_a_method_everywhere(toy, tiny_model, tiny_variables,
                                                    tmp_path):
    small = Small()
    variables = small.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    test = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    images = test / np.float32(255)
    # by name, with its option
    maps = xv.explain(toy, small, variables, images, scale=3.0).maps
    plain = xv.explain("saliency", small, variables, images).maps
    np.testing.assert_allclose(maps, 3 * plain, rtol=1e-6)
    # the evaluation, with a flag generated from its option
    config = evaluate_xai.parse_args(
        ["--methods", toy, "--toy-scale", "3", "--num-images", "4", "--chunk", "4",
         "--randomization-images", "2", "--step", "32", "--faithfulness-subsets", "4",
         "--infidelity-perturbations", "2", "--focus-mosaics", "0", "--batch-size", "64",
         "--output-dir", str(tmp_path), "--quiet"])
    report = evaluate_xai.evaluate(config, small, variables,
                                   cifar10_data.Cifar10(test, np.arange(4), test, np.arange(4)))
    assert report["methods"][toy]["parameters"] == {"scale": 3.0}
    assert report["methods"][toy]["label"] == "Scaled saliency"
    # the demo's detailed figure
    assert toy in demo_xai.figure_methods("detailed", small)
    # the explorer's list of methods for a checkpoint
    path = tmp_path / "tiny.pkl"
    checkpoints.save_checkpoint(path, tiny_model, tiny_variables)
    assert toy in app.supported_methods(str(path), path.stat().st_mtime)
    # the attacks: its maps are differentiated on the softplus network
    assert toy in rx.default_methods() and toy in adv.differentiable_methods()
    h, surrogate, predict, _ = adv.surrogates(toy, small, variables, beta=10.0)
    targets = predict(images)
    attacked = adv.fragility_attack(h, surrogate, predict, images, targets, eps=8 / 255,
                                    steps=1, k=16)
    assert attacked.maps.shape == images.shape[:3]
    grads = jax.grad(lambda x: surrogate(x, targets).sum())(images)
    assert np.all(np.isfinite(grads)) and np.any(grads != 0)
