"""Explainers: their mathematics on hand-built models and their batch and jit contracts
(rejected inputs are in test_bad_inputs.py)."""

from typing import ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xai_visualizations as xv
from cifar10_cnn_model import pool2x2
from xai_visualizations import GradCAM, SaliencyMap

ATOL = 1e-5  # batched and single-image convolutions differ in the last float bits


class LinearNet(nn.Module):
    """logits = flatten(x) @ W + b: its input gradient for class c is exactly W[:, c]."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class ConvReLU(nn.Module):
    """A 4x4 conv with stride 4, then ReLU: (N, 32, 32, 3) -> (N, 8, 8, 6)."""

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(6, (4, 4), strides=(4, 4))(x))


class CamNet(nn.Module):
    """conv -> ReLU -> GAP -> Dense, the architecture CAM (Zhou et al. 2016) was defined on;
    its explanation layer is the conv block's output."""

    num_classes: int = 10
    explanation_layer: ClassVar[str] = "features"

    def setup(self):
        self.features = ConvReLU()
        self.dense = nn.Dense(self.num_classes)

    def __call__(self, x):
        return self.dense(jnp.mean(self.features(x), axis=(1, 2)))


@pytest.fixture(scope="module")
def linear():
    model = LinearNet()
    return model, model.init(jax.random.key(2), jnp.zeros((1, 32, 32, 3)))


@pytest.fixture(scope="module")
def camnet():
    model = CamNet()
    return model, model.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))


@pytest.fixture(scope="module")
def explainers(tiny_model):
    return GradCAM(tiny_model, target_layer="conv3"), SaliencyMap(tiny_model)


def _pb(variables):
    return variables["params"], variables.get("batch_stats")


# ------------------------------------------------------------------ mathematics


def test_linear_model_saliency_is_its_weight_row(linear, images):
    model, variables = linear
    kernel = variables["params"]["Dense_0"]["kernel"]  # (3072, 10)
    targets = jnp.arange(8) % 10
    grads, _, _ = xv.input_gradients(model, variables, images, targets)
    np.testing.assert_allclose(grads, kernel[:, targets].T.reshape(8, 32, 32, 3), atol=1e-7)
    maps, _, _ = SaliencyMap(model).compute_saliency(*_pb(variables), images, targets,
                                                     normalize=False)
    expected = jnp.max(jnp.abs(kernel[:, targets].T.reshape(8, 32, 32, 3)), axis=-1)
    np.testing.assert_allclose(maps, expected, atol=1e-7)


def test_smoothgrad_of_linear_model_equals_saliency_for_any_noise(linear, images):
    model, variables = linear
    saliency = SaliencyMap(model)
    plain = saliency.compute_saliency(*_pb(variables), images, 3, normalize=False)[0]
    smooth = saliency.compute_smooth_saliency(*_pb(variables), images, n_samples=7,
                                              noise_level=0.5, target_class=3,
                                              normalize=False)[0]
    np.testing.assert_allclose(smooth, plain, rtol=1e-5, atol=1e-7)


def test_gradcam_equals_cam_on_gap_dense_head(camnet, images):
    model, variables = camnet
    kernel = variables["params"]["dense"]["kernel"]  # (6, 10)
    acts = model.apply(variables, images, method=lambda m, x: m.features(x))
    targets = np.arange(8) % 10
    cam = jnp.einsum("nhwk,kn->nhw", acts, kernel[:, targets])
    cam = jax.image.resize(jax.nn.relu(cam), (8, 32, 32), "bilinear")
    raw, _, _ = GradCAM(model).compute_gradcam(*_pb(variables), images, targets,
                                               normalize=False)
    # α_k = w_kc / (h·w) for a GAP -> Dense head, so Grad-CAM is CAM / 64.
    np.testing.assert_allclose(raw * 64, cam, rtol=1e-5, atol=1e-6)
    heatmaps, _, _ = GradCAM(model).compute_gradcam(*_pb(variables), images, targets)
    np.testing.assert_allclose(heatmaps, xv.normalize_maps(cam / 64), atol=1e-5)


def test_gradcam_with_no_positive_evidence_is_zero_not_nan(camnet, images):
    model, variables = camnet
    params = jax.tree.map(lambda x: x, variables["params"])
    params["dense"] = {"kernel": -jnp.abs(params["dense"]["kernel"]),
                       "bias": params["dense"]["bias"]}
    heatmaps, _, _ = GradCAM(model).compute_gradcam(params, None, images)
    assert np.all(heatmaps == 0)


def test_gradcam_matches_its_definition_on_the_real_model(tiny_model, tiny_variables,
                                                          images):
    """conv1 is 32x32, so no upsampling: ReLU(Σ_k mean(∂y_c/∂A_k) A_k) exactly, with the
    network after block 1 written out by hand."""
    _, acts = tiny_model.apply(tiny_variables, images, return_activations=True)
    acts = acts["conv1"]
    targets = jnp.asarray([1, 2, 3, 4, 5, 6, 7, 8])

    def rest(model, a):
        for block in model.blocks[1:]:
            a = block(pool2x2(a), train=False)
        return model.head(pool2x2(a), train=False)

    def target_logits(acts):  # examples are independent in eval mode
        logits = tiny_model.apply(tiny_variables, acts, method=rest)
        return jnp.take_along_axis(logits, targets[:, None], axis=1).sum()

    grads = jax.jit(jax.grad(target_logits))(acts)
    expected = jax.nn.relu(jnp.sum(jnp.mean(grads, axis=(1, 2))[:, None, None] * acts, -1))
    raw, _, _ = GradCAM(tiny_model, "conv1").compute_gradcam(
        *_pb(tiny_variables), images, targets, normalize=False)
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-6)


def test_smoothgrad_with_zero_noise_equals_saliency(explainers, tiny_variables, images):
    _, saliency = explainers
    plain = saliency.compute_saliency(*_pb(tiny_variables), images, normalize=False)[0]
    smooth = saliency.compute_smooth_saliency(*_pb(tiny_variables), images, n_samples=3,
                                              noise_level=0.0, normalize=False)[0]
    np.testing.assert_allclose(smooth, plain, rtol=1e-4, atol=1e-7)


def test_smoothgrad_same_seed_same_map_other_seed_other_map(explainers, tiny_variables,
                                                            images):
    _, saliency = explainers
    run = lambda seed: saliency.compute_smooth_saliency(*_pb(tiny_variables), images,
                                                        n_samples=4, seed=seed)[0]
    np.testing.assert_array_equal(run(0), run(0))
    assert np.abs(run(0) - run(1)).max() > 1e-3


@pytest.mark.usefixtures("threefry")
def test_smoothgrad_does_not_depend_on_batch_size(explainers, tiny_variables, images):
    _, saliency = explainers
    run = lambda b: saliency.compute_smooth_saliency(*_pb(tiny_variables), images,
                                                     n_samples=5, batch_size=b,
                                                     normalize=False)[0]
    np.testing.assert_allclose(run(3), run(40), rtol=1e-4, atol=1e-7)


@pytest.mark.usefixtures("threefry")
def test_smoothgrad_averages_the_noisy_gradients(tiny_model, tiny_variables, images):
    """Against a direct loop over the documented noise: x + σ·N(0, 1) from fold_in(key, s)."""
    key, n_samples, level = jax.random.key(5), 3, 0.2
    targets = jnp.asarray([0, 1, 2, 3, 4, 5, 6, 7])
    sigma = level * (images.max(axis=(1, 2, 3)) - images.min(axis=(1, 2, 3)))
    grad_fn = lambda x, t: xv.input_gradients(tiny_model, tiny_variables, x, t)[0]
    gradients = jax.jit(grad_fn)  # one compile for every noisy batch
    expected = 0
    for s in range(n_samples):
        noise = jax.random.normal(jax.random.fold_in(key, s), (32, 32, 3))
        noisy = images + sigma[:, None, None, None] * noise[None]
        expected += gradients(noisy, targets)
    got = jax.jit(lambda x: xv.smooth_grad(grad_fn, x, targets, key, n_samples=n_samples,
                                           noise_level=level, batch_size=5))(images)
    np.testing.assert_allclose(got, expected / n_samples, rtol=1e-4, atol=1e-7)


def test_class_specific_maps_differ(explainers, tiny_variables, images):
    gradcam, saliency = explainers
    for compute in (gradcam.compute_gradcam, saliency.compute_saliency):
        a, _, _ = compute(*_pb(tiny_variables), images[0], 0, normalize=False)
        b, _, _ = compute(*_pb(tiny_variables), images[0], 1, normalize=False)
        assert np.abs(a - b).max() > 1e-3 * max(np.abs(a).max(), np.abs(b).max())


def test_predictions_and_scores(explainers, tiny_model, tiny_variables, images):
    gradcam, saliency = explainers
    probs = jax.nn.softmax(tiny_model.apply(tiny_variables, images))
    targets = np.asarray([9, 8, 7, 6, 5, 4, 3, 2])
    for compute in (gradcam.compute_gradcam, saliency.compute_saliency,
                    saliency.compute_smooth_saliency):
        _, preds, scores = compute(*_pb(tiny_variables), images)
        np.testing.assert_array_equal(preds, np.argmax(probs, -1))
        np.testing.assert_allclose(scores, np.max(probs, -1), rtol=1e-5)
        _, preds, scores = compute(*_pb(tiny_variables), images, target_class=targets)
        np.testing.assert_array_equal(preds, np.argmax(probs, -1))
        np.testing.assert_allclose(scores, probs[np.arange(8), targets], rtol=1e-5)


# ------------------------------------------------------------------ contracts


@pytest.mark.usefixtures("threefry")
@pytest.mark.parametrize("method", ["gradcam", "saliency", "smooth"])
@pytest.mark.parametrize("target", [None, 4, "array"])
def test_one_image_alone_equals_it_inside_a_batch(method, target, explainers,
                                                  tiny_variables, images):
    gradcam, saliency = explainers
    compute = {"gradcam": gradcam.compute_gradcam, "saliency": saliency.compute_saliency,
               "smooth": lambda *a, **k: saliency.compute_smooth_saliency(
                   *a, n_samples=3, **k)}[method]
    targets = np.asarray([3, 1, 4, 1, 5, 9, 2, 6]) if target == "array" else target
    maps, preds, scores = compute(*_pb(tiny_variables), images, target_class=targets)
    for i in (0, 5):
        alone = targets[i] if target == "array" else target
        heatmap, pred, score = compute(*_pb(tiny_variables), images[i], target_class=alone)
        assert heatmap.shape == (32, 32)
        assert isinstance(pred, int) and isinstance(score, float)
        np.testing.assert_allclose(heatmap, maps[i], atol=ATOL)
        assert pred == preds[i]
        np.testing.assert_allclose(score, scores[i], rtol=1e-5)


def test_maps_are_normalised_or_raw(explainers, tiny_variables, images):
    gradcam, saliency = explainers
    for compute in (gradcam.compute_gradcam, saliency.compute_saliency,
                    saliency.compute_smooth_saliency):
        maps, _, _ = compute(*_pb(tiny_variables), images)
        raw, _, _ = compute(*_pb(tiny_variables), images, normalize=False)
        assert maps.shape == raw.shape == (8, 32, 32)
        assert maps.min() >= 0 and np.allclose(maps.max(axis=(1, 2)), 1, atol=1e-4)
        assert raw.min() >= 0
        np.testing.assert_allclose(maps, xv.normalize_maps(raw), atol=1e-6)
        # Raw maps keep their magnitudes: they are not all scaled to the same maximum.
        assert np.ptp(raw.max(axis=(1, 2))) > 0


def test_normalize_maps_keeps_zero_maps_zero():
    maps = jnp.stack([jnp.zeros((4, 4)), jnp.full((4, 4), 3.0),
                      jnp.arange(16.0).reshape(4, 4)])
    out = xv.normalize_maps(maps)
    assert np.all(out[0] == 0) and np.all(out[1] == 0)
    np.testing.assert_allclose(out[2], np.arange(16).reshape(4, 4) / 15, atol=1e-6)


def test_uint8_images_are_divided_by_255(explainers, tiny_variables, images):
    gradcam, _ = explainers
    u8 = np.asarray(images * 255, np.uint8)
    from_u8 = gradcam.compute_gradcam(*_pb(tiny_variables), u8)[0]
    from_float = gradcam.compute_gradcam(*_pb(tiny_variables), u8 / np.float32(255))[0]
    np.testing.assert_array_equal(from_u8, from_float)


def test_explainers_trace_once_per_shape(request, tiny_model, tiny_variables, images):
    for name in ("gradcam", "saliency", "smoothgrad"):
        spec = xv.METHODS[name]
        xv.register(name, spec._replace(fn=chex.assert_max_traces(spec.fn, n=1)),
                    replace=True)
        request.addfinalizer(lambda name=name, spec=spec: xv.register(name, spec,
                                                                      replace=True))
    gradcam, saliency = GradCAM(tiny_model), SaliencyMap(tiny_model)
    params, batch_stats = _pb(tiny_variables)
    for k, target in enumerate([None, 3, np.arange(8) % 10, np.int64(2)]):
        batch = images[::-1] if k % 2 else images
        gradcam.compute_gradcam(params, batch_stats, batch, target)
        saliency.compute_saliency(params, batch_stats, batch, target)
        saliency.compute_smooth_saliency(params, batch_stats, batch, n_samples=2,
                                         noise_level=0.1 * k, target_class=target, seed=k)


def test_explainers_mutate_nothing(explainers, tiny_variables, images):
    gradcam, saliency = explainers
    before = jax.tree.map(np.array, tiny_variables)
    state = (dict(vars(gradcam)), dict(vars(saliency)))
    image = np.array(images[0])
    gradcam.compute_gradcam(*_pb(tiny_variables), image)
    saliency.compute_smooth_saliency(*_pb(tiny_variables), image, n_samples=2)
    chex.assert_trees_all_equal(jax.tree.map(np.array, tiny_variables), before)
    assert state == (dict(vars(gradcam)), dict(vars(saliency)))
    np.testing.assert_array_equal(image, images[0])


def test_overlay_blends_the_colormap(images):
    import matplotlib

    image, heatmap = np.asarray(images[0]), np.linspace(0, 1, 1024).reshape(32, 32)
    colour = matplotlib.colormaps["jet"](heatmap)[..., :3]
    np.testing.assert_allclose(xv.overlay(image, heatmap, alpha=0), image, atol=1e-6)
    np.testing.assert_allclose(xv.overlay(image, heatmap, alpha=1), colour, atol=1e-6)
    out = xv.overlay(image, heatmap)
    np.testing.assert_allclose(out, 0.6 * image + 0.4 * colour, atol=1e-6)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    viridis = xv.overlay(image, heatmap, colormap="viridis")
    assert np.abs(viridis - out).max() > 0.1


@pytest.fixture
def backend_compiles():
    """The programs XLA compiles (or loads from the persistent cache) while a test runs."""
    events = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield events
    jax.monitoring.unregister_event_duration_listener(listen)


def test_a_second_explainer_object_compiles_nothing(tiny_variables, images,
                                                    backend_compiles):
    """Objects of the same model, method, options and shapes share one compiled program:
    a second GradCAM of an equal model (another instance) compiles nothing."""
    from cifar10_cnn_model import CIFAR10CNN

    params, batch_stats = _pb(tiny_variables)
    first = GradCAM(CIFAR10CNN(width=4), target_layer="conv3").compute_gradcam(
        params, batch_stats, images[5])
    backend_compiles.clear()
    second = GradCAM(CIFAR10CNN(width=4), target_layer="conv3").compute_gradcam(
        params, batch_stats, images[5])
    assert backend_compiles == []
    np.testing.assert_array_equal(second[0], first[0])


CACHED_RUN = """
import sys, jax, numpy as np
programs, hits = [], []
jax.monitoring.register_event_duration_secs_listener(  # compiled or loaded
    lambda event, duration, **kw: programs.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event)
    if event == "/jax/compilation_cache/cache_hits" else None)
import xai_visualizations as xv
from cifar10_cnn_model import CIFAR10CNN
assert jax.config.jax_compilation_cache_dir is None, "importing turned the cache on"
print(xv.enable_compilation_cache(sys.argv[1]))
model = CIFAR10CNN(width=4)
variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
image = np.full((32, 32, 3), 0.5, np.float32)
xv.GradCAM(model).compute_gradcam(variables["params"], variables["batch_stats"], image)
print(len(programs), len(hits))
"""


@pytest.mark.slow
def test_a_second_process_loads_its_programs_from_the_cache(tmp_path):
    """One documented call turns the persistent cache on (nothing on import): the first
    process compiles and fills the folder, the second loads every program from it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION")}
    runs = [subprocess.run([sys.executable, "-c", CACHED_RUN, str(tmp_path / "cache")],
                           capture_output=True, text=True, env=env, check=True).stdout.split()
            for _ in range(2)]
    assert runs[0][0] == runs[1][0] == str(tmp_path / "cache")
    (programs, hits), (again, loaded) = [map(int, run[1:]) for run in runs]
    assert programs > 0 and hits == 0  # the first process compiled them all
    assert again == loaded == programs  # the second loaded them all
    assert any((tmp_path / "cache").iterdir())
