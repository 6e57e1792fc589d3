"""Compression (xai_compression): Qwix quantisation against hand-computed bounds and
Qwix's own integer (PTQ) model, magnitude pruning against a hand-built fixture, and
compressed checkpoints that round-trip bit for bit and refuse tampering."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import checkpoints
import xai_compression as xc
import xai_visualizations as xv
from architectures import ResNet20
from cifar10_cnn_model import CIFAR10CNN

qwix = pytest.importorskip("qwix")

MODEL = CIFAR10CNN(width=4)
IMAGES = jax.random.uniform(jax.random.key(1), (8, 32, 32, 3))
CALIBRATION = jax.random.uniform(jax.random.key(2), (16, 32, 32, 3))


@pytest.fixture(scope="module")
def variables():
    return MODEL.init(jax.random.key(0), IMAGES[:1])


@pytest.fixture(scope="module")
def quantized(variables):
    return {scheme: xc.quantize(MODEL, variables, scheme, CALIBRATION, batch_size=8)
            for scheme in xc.SCHEMES}


@pytest.mark.parametrize("qtype, qmax", [("int8", 127), ("int4", 7)])
def test_per_channel_quantisation_error_is_within_half_a_step_of_each_channel(qtype, qmax):
    kernel = np.array(jax.random.normal(jax.random.key(3), (3, 3, 5, 6)))
    kernel[..., 2] *= 100.0  # one loud channel must not coarsen the others' steps
    stored = xc.stored_params(xc.quantized_model(MODEL, f"{qtype}_weights"),
                              {"params": {"Conv_0": {"kernel": kernel}}})["Conv_0"]["kernel"]
    step = np.abs(kernel).max(axis=(0, 1, 2)) / qmax  # by hand: absmax over qmax levels
    np.testing.assert_allclose(stored["scale"].ravel(), step, rtol=1e-6)
    assert np.abs(stored["qvalue"]).max(axis=(0, 1, 2)).tolist() == [qmax] * 6
    error = np.abs(xc.dequantize(stored) - kernel)
    assert np.all(error <= step / 2 * (1 + 1e-5) + 1e-12)


@pytest.mark.parametrize("scheme", list(xc.SCHEMES))
def test_the_fake_quantised_model_computes_what_qwix_integer_model_computes(variables,
                                                                           quantized, scheme):
    qmodel, qvariables = quantized[scheme]
    weights, activations = xc.SCHEMES[scheme]
    rule = qwix.QuantizationRule(module_path=".*", weight_qtype=weights,
                                 act_qtype=activations,
                                 act_static_scale=True if activations else None,
                                 weight_calibration_method=xc.WEIGHT_CALIBRATION[weights])
    if activations is None:  # Qwix's PTQ convolutions quantise both or neither: by hand
        expected = MODEL.apply({**variables, "params": xc.dequantize(
            xc.stored_params(qmodel, qvariables))}, IMAGES)
    else:
        ptq = qwix.quantize_model(MODEL, qwix.PtqProvider([rule]))
        abstract = jax.eval_shape(ptq.init, jax.random.key(0), IMAGES[:1])["params"]
        params = qwix.quantize_params(jax.tree.map(jnp.asarray, qvariables["params"]),
                                      abstract, qvariables["quant_stats"])
        expected = ptq.apply({**variables, "params": params}, IMAGES)
    np.testing.assert_allclose(qmodel.apply(qvariables, IMAGES), expected, atol=2e-5)
    assert not np.allclose(qmodel.apply(qvariables, IMAGES), MODEL.apply(variables, IMAGES),
                           atol=1e-6)  # it really is quantised


def test_gradients_pass_the_rounding_straight_through(variables, quantized):
    qmodel, qvariables = quantized["int8"]
    grad = lambda m, v: jax.grad(lambda x: m.apply(v, x)[:, 3].sum())(IMAGES[:2])  # noqa: E731
    ours, float_grad = grad(qmodel, qvariables), grad(MODEL, variables)
    assert float(jnp.abs(ours).sum()) > 0  # Qwix's integer model has a zero gradient here
    assert np.corrcoef(np.ravel(ours), np.ravel(float_grad))[0, 1] > 0.8
    maps = xv.explain("gradcam", qmodel, qvariables, IMAGES[:2], targets=jnp.array([3, 3]))
    assert np.all(np.isfinite(np.asarray(maps.maps))) and float(jnp.abs(maps.maps).sum()) > 0


def test_a_quantised_models_init_runs_under_jit_and_gives_uncalibrated_statistics(
        variables, quantized):
    qmodel, qvariables = quantized["int8"]
    fresh = jax.jit(qmodel.init)(jax.random.key(5), IMAGES[:1])  # as the cascade does
    assert jax.tree.structure(fresh["params"]) == jax.tree.structure(variables["params"])
    assert jax.tree.structure(fresh["quant_stats"]) == jax.tree.structure(
        qvariables["quant_stats"])
    assert all(int(c) == 0 for p, c in jax.tree_util.tree_flatten_with_path(
        fresh["quant_stats"])[0] if p[-1].key == "count")
    logits = jax.jit(qmodel.apply)(fresh, IMAGES)
    assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("scheme", list(xc.SCHEMES))
def test_a_quantised_checkpoint_round_trips_bit_for_bit(quantized, scheme, tmp_path):
    qmodel, qvariables = quantized[scheme]
    path = tmp_path / f"{scheme}.pkl"
    checkpoints.save_checkpoint(path, qmodel, qvariables, metrics={"note": scheme})
    raw = pickle.load(open(path, "rb"))
    kernel = raw["params"]["block1"]["Conv_0"]["kernel"]
    assert kernel["qvalue"].dtype == np.int8 and raw["config"]["compression"] == xc.record(qmodel)
    model, loaded = checkpoints.load_checkpoint(path)
    assert xc.record(model)["quantization"] == scheme
    np.testing.assert_array_equal(model.apply(loaded, IMAGES), qmodel.apply(qvariables, IMAGES))
    same = jax.tree.map(np.array_equal, loaded["params"], qvariables["params"])
    assert all(jax.tree.leaves(same))
    # and saved again, the same integers
    checkpoints.save_checkpoint(tmp_path / "again.pkl", model, loaded)
    again = pickle.load(open(tmp_path / "again.pkl", "rb"))["params"]
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, again, raw["params"])))


def test_int8_weights_are_about_four_times_smaller(variables, quantized):
    qmodel, qvariables = quantized["int8"]
    stored = xc.stored_params(qmodel, qvariables)
    float_bytes = xc.weight_bytes(checkpoints.plain(variables["params"]))
    kernels = [v for p, v in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
               if p[-1].key == "kernel"]
    assert float_bytes == 4 * sum(np.size(v) for v in jax.tree.leaves(variables["params"]))
    # one byte per kernel weight instead of four, plus one float scale per output channel
    assert float_bytes - xc.weight_bytes(stored, "int8") == (
        3 * sum(np.size(k) for k in kernels) - 4 * sum(np.shape(k)[-1] for k in kernels))
    int4 = xc.stored_params(*quantized["int4_weights"])
    assert xc.weight_bytes(int4, "int4_weights") < xc.weight_bytes(stored, "int8")


def test_a_tampered_quantised_checkpoint_is_refused(quantized, tmp_path):
    qmodel, qvariables = quantized["int8"]
    path = tmp_path / "q.pkl"
    checkpoints.save_checkpoint(path, qmodel, qvariables)
    raw = pickle.load(open(path, "rb"))
    raw["params"]["block1"]["Conv_0"]["kernel"]["scale"] = np.ones(3, np.float32)
    pickle.dump(raw, open(tmp_path / "bad_scale.pkl", "wb"))
    with pytest.raises(ValueError, match="one scale per output channel"):
        checkpoints.load_checkpoint(tmp_path / "bad_scale.pkl")
    raw = pickle.load(open(path, "rb"))
    raw["config"]["compression"]["quantization"] = "int3"
    pickle.dump(raw, open(tmp_path / "bad_scheme.pkl", "wb"))
    with pytest.raises(ValueError, match="scheme must be one of"):
        checkpoints.load_checkpoint(tmp_path / "bad_scheme.pkl")

    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))
    raw = pickle.load(open(path, "rb"))
    raw["quant_stats"] = Evil()
    pickle.dump(raw, open(tmp_path / "evil.pkl", "wb"))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        checkpoints.load_checkpoint(tmp_path / "evil.pkl")


def test_magnitude_masks_keep_exactly_the_largest_weights_over_the_whole_network():
    params = {"a": {"kernel": np.array([[0.1, -5.0], [2.0, 0.3]]), "bias": np.array([0.0, 0.0])},
              "b": {"kernel": np.array([[-0.2], [4.0], [1.0], [-3.0]])}}
    masks = xc.magnitude_masks(params, 0.5)  # 8 kernel weights: keep 4 of largest |w|
    np.testing.assert_array_equal(masks["a"]["kernel"], [[0, 1], [1, 0]])
    np.testing.assert_array_equal(masks["b"]["kernel"], [[0], [1], [0], [1]])
    np.testing.assert_array_equal(masks["a"]["bias"], [1, 1])  # biases are never pruned
    pruned = xc.prune({"params": params}, masks)["params"]
    assert xc.sparsity_of(pruned) == 0.5
    kept = np.concatenate([pruned["a"]["kernel"].ravel(), pruned["b"]["kernel"].ravel()])
    assert sorted(np.abs(kept).tolist()) == [0, 0, 0, 0, 2.0, 3.0, 4.0, 5.0]
    for sparsity, kept in ((0.0, 8), (0.75, 2), (0.9, 1)):
        masks = xc.magnitude_masks(params, sparsity)
        assert sum(int(m["kernel"].sum()) for m in masks.values()) == kept


def test_fine_tuning_keeps_pruned_weights_at_zero(variables):
    masks = xc.magnitude_masks(variables["params"], 0.7)
    params = xc.prune(variables, masks)["params"]
    tx = optax.chain(optax.sgd(0.1), xc.keep_pruned(masks))
    state = tx.init(params)
    loss = lambda p: jnp.sum(MODEL.apply({**variables, "params": p}, IMAGES) ** 2)  # noqa: E731
    for _ in range(3):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    zero = jax.tree.map(lambda m: m == 0, masks)
    still = jax.tree.map(lambda p, z: bool(np.all(np.asarray(p)[z] == 0)), params, zero)
    assert all(jax.tree.leaves(still))
    moved = jax.tree.map(lambda p, q, z: bool(np.any(np.asarray(p)[~z] != np.asarray(q)[~z])),
                         params, variables["params"], zero)
    assert moved["block1"]["Conv_0"]["kernel"]
    assert xc.sparsity_of(params) == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize("call, message", [
    (lambda v: xc.quantize(MODEL, v, "int3"), "scheme must be one of"),
    (lambda v: xc.quantize(MODEL, v, "int8"), "calibration_images must be given"),
    (lambda v: xc.quantize(MODEL, v, "int8", np.zeros((4, 32, 32, 3), np.uint8)),
     "calibration_images must be float images"),
    (lambda v: xc.magnitude_masks(v["params"], 1.0), r"sparsity must be a fraction in \[0, 1\)"),
    (lambda v: xc.magnitude_masks(v["params"], -0.1), "sparsity must be a fraction"),
    (lambda v: xc.magnitude_masks({"bias": np.ones(3)}, 0.5), "must hold kernels"),
])
def test_bad_settings_get_a_clear_error_naming_the_argument(variables, call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(variables)


def _silence(variables, filters):
    """`variables` with the given conv filters exactly zero in output: a zero kernel,
    and a BatchNorm that maps zero to zero (bias 0, running mean 0)."""
    params = jax.tree.map(np.array, variables["params"])
    stats = jax.tree.map(np.array, variables["batch_stats"])
    for (block, i), channels in filters.items():
        params[block][f"Conv_{i}"]["kernel"][..., channels] = 0.0
        params[block][f"BatchNorm_{i}"]["bias"][channels] = 0.0
        stats[block][f"BatchNorm_{i}"]["mean"][channels] = 0.0
    return {"params": params, "batch_stats": stats}


def test_removing_filters_that_are_exactly_zero_leaves_the_logits_identical(variables):
    # width 4: convs of 4, 4, 8, 8, 16, 16, 16 filters; silence a quarter of each
    filters = {("block1", 0): [1], ("block1", 1): [2], ("block2", 0): [0, 5],
               ("block2", 1): [3, 7], ("block3", 0): [0, 1, 2, 3], ("block3", 1): [4, 8, 9, 15],
               ("block3", 2): [1, 3, 5, 7]}
    silent = _silence(variables, filters)
    narrow, pruned = xc.prune_filters(MODEL, silent, 0.25, "l1")
    assert narrow.channels == (3, 3, 6, 6, 12, 12, 12)
    np.testing.assert_allclose(narrow.apply(pruned, IMAGES), MODEL.apply(silent, IMAGES),
                               atol=1e-5)
    assert xc.flops(narrow, pruned) < 0.6 * xc.flops(MODEL, silent)
    for (block, i), channels in filters.items():  # the criterion saw exactly those
        scores = xc.filter_scores(MODEL, silent)[(block, f"Conv_{i}")]
        assert set(np.flatnonzero(scores == 0)) == set(channels)


def test_bn_scale_criterion_removes_the_filters_of_smallest_batchnorm_scale(variables):
    params = jax.tree.map(np.array, variables["params"])
    params["block1"]["BatchNorm_0"]["scale"][:] = [0.5, -0.01, 2.0, 0.3]
    narrow, pruned = xc.prune_filters(MODEL, {**variables, "params": params}, 0.5, "bn_scale")
    np.testing.assert_array_equal(pruned["params"]["block1"]["BatchNorm_0"]["scale"], [0.5, 2.0])
    np.testing.assert_array_equal(pruned["params"]["block1"]["Conv_0"]["kernel"],
                                  params["block1"]["Conv_0"]["kernel"][..., [0, 2]])
    np.testing.assert_array_equal(pruned["params"]["block1"]["Conv_1"]["kernel"].shape[2], 2)


def test_a_structurally_pruned_checkpoint_round_trips(variables, tmp_path):
    narrow, pruned = xc.prune_filters(MODEL, variables, 0.5)
    path = tmp_path / "narrow.pkl"
    checkpoints.save_checkpoint(path, narrow, pruned,
                                compression={"pruning": "filters", "fraction": 0.5})
    model, loaded = checkpoints.load_checkpoint(path)
    assert model == narrow and model.channels == (2, 2, 4, 4, 8, 8, 8)
    assert pickle.load(open(path, "rb"))["config"]["compression"] == {"pruning": "filters",
                                                                       "fraction": 0.5}
    np.testing.assert_array_equal(model.apply(loaded, IMAGES), narrow.apply(pruned, IMAGES))


@pytest.mark.parametrize("call, message", [
    (lambda v: xc.prune_filters(MODEL, v, 1.0), "fraction must be the share"),
    (lambda v: xc.prune_filters(MODEL, v, 0.5, "l2"), "criterion must be one of"),
    (lambda v: CIFAR10CNN(width=4, channels=(1, 2)).init(jax.random.key(0), IMAGES[:1]),
     "channels must be None or a tuple of 7 ints"),
])
def test_bad_pruning_settings_get_a_clear_error(variables, call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(variables)


def test_resnet_pruning_narrows_only_inside_the_blocks_and_keeps_the_shortcuts(tmp_path):
    resnet = ResNet20(width=4, blocks_per_stage=1)
    variables = resnet.init(jax.random.key(6), IMAGES[:1])
    params = jax.tree.map(np.array, variables["params"])
    stats = jax.tree.map(np.array, variables["batch_stats"])
    silenced = {"stage1": [0, 3], "stage2": [1, 2, 5, 6], "stage3": [0, 4, 8, 9, 10, 15]}
    for stage, channels in silenced.items():  # conv1's output exactly zero there
        params[stage]["block1"]["conv1"]["kernel"][..., channels] = 0.0
        params[stage]["block1"]["bn1"]["bias"][channels] = 0.0
        stats[stage]["block1"]["bn1"]["mean"][channels] = 0.0
    silent = {"params": params, "batch_stats": stats}
    narrow, pruned = xc.prune_filters(resnet, silent, 0.4)
    assert narrow.inner == (2, 5, 10)
    for stage, width in (("stage1", 4), ("stage2", 8), ("stage3", 16)):  # shortcut widths
        assert pruned["params"][stage]["block1"]["conv2"]["kernel"].shape[-1] == width
    np.testing.assert_allclose(narrow.apply(pruned, IMAGES), resnet.apply(silent, IMAGES),
                               atol=1e-5)
    path = tmp_path / "narrow_resnet.pkl"
    checkpoints.save_checkpoint(path, narrow, pruned, compression={"pruning": "filters"})
    model, loaded = checkpoints.load_checkpoint(path)
    assert model == narrow
    np.testing.assert_array_equal(model.apply(loaded, IMAGES), narrow.apply(pruned, IMAGES))


def test_structured_pruning_refuses_what_it_cannot_narrow():
    from architectures import CCT
    with pytest.raises(TypeError, match="narrows the CIFAR10CNN and ResNet20; got CCT"):
        xc.prune_filters(CCT(), {"params": {}}, 0.5)


def test_bf16_rounds_every_weight_to_the_nearest_bfloat16_and_round_trips(variables, tmp_path):
    """bfloat16 keeps float32's 8 exponent bits and 7 of its 23 fraction bits: by hand,
    the nearest bfloat16 of w is within half a unit in the last place, 2^-8 of the power
    of two at or below |w|, so within 2^-8 |w|; and
    numpy's float32 bits with the low 16 rounded to nearest even give it."""
    qmodel, qvariables = xc.quantize(MODEL, variables, "bf16")
    assert xc.record(qmodel) == {"quantization": "bf16"} and isinstance(qmodel, CIFAR10CNN)
    for w, r in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(qvariables["params"])):
        w, r = np.asarray(w, np.float32), np.asarray(r)
        assert r.dtype == np.float32
        assert np.all(np.abs(r - w) <= np.abs(w) * 2.0 ** -8)
        bits = w.view(np.uint32).astype(np.uint64)
        nearest = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32)
        np.testing.assert_array_equal(r.view(np.uint32), nearest)
    stored = xc.stored_params(qmodel, qvariables)  # two bytes a weight
    assert xc.weight_bytes(stored, "bf16") * 2 == xc.weight_bytes(
        checkpoints.plain(variables["params"]))
    path = tmp_path / "bf16.pkl"
    checkpoints.save_checkpoint(path, qmodel, qvariables)
    model, loaded = checkpoints.load_checkpoint(path)
    assert xc.record(model) == {"quantization": "bf16"}
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, loaded["params"],
                                            qvariables["params"])))
    np.testing.assert_array_equal(model.apply(loaded, IMAGES), qmodel.apply(qvariables, IMAGES))
    saliency = xv.explain("saliency", model, loaded, IMAGES[:2]).maps  # explainers take it
    assert np.all(np.isfinite(np.asarray(saliency)))


def test_guided_backprop_is_refused_by_name_where_qwix_cannot_be_replayed(quantized):
    """Guided Backprop replays the model's program equation by equation outside Flax,
    where Qwix's int8 activations cannot read their calibrated statistics: refused with
    that reason (not a trace from inside Qwix), and the compression card leaves it out
    with the reason; weight-only quantisation replays and is explained."""
    import compress_xai

    int8, _ = quantized["int8"]
    why = xv.unsupported("guided_backprop", int8)
    assert why.startswith("Guided Backprop replays the model's program") and "Qwix" in why
    with pytest.raises(ValueError, match="cannot explain .*calibrated statistics"):
        xv.check_options("guided_gradcam", int8, {}, IMAGES.shape[1:])
    weights, weights_variables = quantized["int8_weights"]
    assert xv.unsupported("guided_backprop", weights) is None
    maps = xv.explain("guided_backprop", weights, weights_variables, IMAGES[:2]).maps
    assert np.all(np.isfinite(np.asarray(maps))) and float(np.max(maps)) > 0
    config = compress_xai.CompressConfig(methods=("saliency", "guided_backprop"))
    variants = {"int8": quantized["int8"] + ({},), "int8_weights": quantized["int8_weights"]
                + ({},)}
    methods, skipped = compress_xai.method_list(config, MODEL, variants)
    assert methods == ("saliency",) and skipped == {"guided_backprop": why}
