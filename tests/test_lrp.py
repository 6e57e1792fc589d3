"""LRP: the identities the rules must satisfy, and every rule against the paper's formula
written out per contribution in numpy on a two-layer network."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints
import xai_lrp as lrp
import xai_visualizations as xv

MEAN, STD = np.array([0.3, 0.5, 0.4, 0.6]), np.array([0.2, 0.25, 0.3, 0.5])


class TwoLayer(nn.Module):
    """[0, 1]^4 → standardise → Dense(3) → ReLU → Dense(2)."""

    @nn.compact
    def __call__(self, x):
        x = (x - jnp.asarray(MEAN, jnp.float32)[None]) / jnp.asarray(STD, jnp.float32)[None]
        x = nn.relu(nn.Dense(3)(x))
        return nn.Dense(2)(x)


def stab(z, eps=1e-6):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


# Each rule as its paper writes it, on the contributions z_jk = x_j w_jk of one example:
# R_j = Σ_k (what j contributes to k under the rule) / (the sum over j, with the bias
# the rule counts) · R_k.
def by_epsilon(x, w, b, r, eps=1e-6):
    z = x[:, None] * w
    return (z / stab(z.sum(0) + b, eps) * r).sum(1)


def by_gamma(x, w, b, r, g=0.25):
    z = x[:, None] * w
    zk = z.sum(0) + b
    up, down = z + g * np.maximum(z, 0), z + g * np.minimum(z, 0)
    up_k = stab(up.sum(0) + b + g * np.maximum(b, 0))
    down_k = stab(down.sum(0) + b + g * np.minimum(b, 0))
    return (np.where(zk > 0, up / up_k * r, 0) + np.where(zk < 0, down / down_k * r, 0)).sum(1)


def by_alpha_beta(x, w, b, r, alpha, beta):
    z = x[:, None] * w
    p, n = np.maximum(z, 0), np.minimum(z, 0)
    return (alpha * p / stab(p.sum(0) + np.maximum(b, 0)) * r
            - beta * n / stab(n.sum(0) + np.minimum(b, 0)) * r).sum(1)


def by_zbox(x, w, b, r, low, high):
    z = x[:, None] * w - low[:, None] * np.maximum(w, 0) - high[:, None] * np.minimum(w, 0)
    return (z / stab(z.sum(0)) * r).sum(1)


def by_flat(x, w, b, r):
    return np.full(len(x), (r / stab(np.full(w.shape[1], float(len(x))))).sum())


def by_w_square(x, w, b, r):
    return (w**2 / stab((w**2).sum(0) + b**2) * r).sum(1)


@pytest.fixture(scope="module")
def two_layer():
    model = TwoLayer()
    x = jax.random.uniform(jax.random.key(0), (3, 4))
    variables = model.init(jax.random.key(1), x)
    # biases of both signs, so that every rule's bias terms count
    params = jax.tree.map(lambda a: a, variables["params"])
    params["Dense_0"]["bias"] = jnp.array([0.3, -0.2, 0.1])
    params["Dense_1"]["bias"] = jnp.array([-0.1, 0.2])
    return model, {"params": params}, x


def by_hand(variables, x, first, second):
    """The relevance at the input by the two formulas, per example, in float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    out = []
    for xi in np.asarray(x, np.float64):
        xs = (xi - MEAN) / STD
        a = np.maximum(xs @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
        logits = a @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
        r = np.eye(2)[np.argmax(logits)] * logits
        r = second(a, p["Dense_1"]["kernel"], p["Dense_1"]["bias"], r)
        out.append(first(xs, p["Dense_0"]["kernel"], p["Dense_0"]["bias"], r))
    return np.array(out)


LOW, HIGH = (0 - MEAN) / STD, (1 - MEAN) / STD
RULES = {  # name: (our rule, its formula)
    "epsilon": (lrp.Epsilon(0.1), lambda *a: by_epsilon(*a, eps=0.1)),
    "gamma": (lrp.Gamma(0.5), lambda *a: by_gamma(*a, g=0.5)),
    "alpha2_beta1": (lrp.AlphaBeta(2.0, 1.0), lambda *a: by_alpha_beta(*a, 2.0, 1.0)),
    "z_plus": (lrp.ZPlus(), lambda *a: by_alpha_beta(*a, 1.0, 0.0)),
    "flat": (lrp.Flat(), by_flat),
    "w_square": (lrp.WSquare(), by_w_square),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jitted"])
@pytest.mark.parametrize("rule", list(RULES) + ["z_box"])
def test_each_rule_matches_its_formula_on_a_two_layer_network(two_layer, rule, jit):
    """The rule on the first layer (inputs of both signs after the standardisation) and
    on the second (ReLU outputs), the other layer ε; z^B (first layer only) with the
    bounds of [0, 1] inputs after the model's standardisation."""
    model, variables, x = two_layer
    if rule == "z_box":
        ours, formula = lrp.ZBox(), lambda *a: by_zbox(*a, LOW, HIGH)
        cases = [(ours, formula, lrp.Epsilon(), by_epsilon)]
    else:
        ours, formula = RULES[rule]
        cases = [(ours, formula, lrp.Epsilon(), by_epsilon),
                 (lrp.Epsilon(), by_epsilon, ours, formula)]
    for first, first_formula, second, second_formula in cases:
        composite = lrp.composite({"Dense_0": first, "Dense_1": second})

        def relevance(v, images):
            return lrp.relevance(lambda z: model.apply(v, z), images,
                                 lambda lg: jax.nn.one_hot(jnp.argmax(lg, -1), 2) * lg,
                                 composite)[0]

        got = (jax.jit(relevance) if jit else relevance)(variables, x)
        want = by_hand(variables, x, first_formula, second_formula)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


class BiasFree(nn.Module):
    """Conv → ReLU → max pool (a reshape) → conv → ReLU (+ a residual sum) → average
    pool → GAP → Dense → ReLU → Dense, no biases anywhere."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), use_bias=False)(x))
        x = jnp.max(x.reshape(x.shape[0], 4, 2, 4, 2, 4), axis=(2, 4))
        x = x + nn.relu(nn.Conv(4, (3, 3), use_bias=False)(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.relu(nn.Dense(5, use_bias=False)(x))
        return nn.Dense(3, use_bias=False)(x)


@pytest.fixture(scope="module")
def bias_free():
    model = BiasFree()
    x = jax.random.uniform(jax.random.key(2), (3, 8, 8, 3))
    return model, model.init(jax.random.key(3), x), x


def test_lrp0_is_gradient_times_input_on_a_bias_free_relu_network(bias_free):
    model, variables, x = bias_free
    targets = jnp.array([0, 2, 1])
    got, want = jax.jit(lambda v, z: (
        xv.explain("lrp", model, v, z, targets, composite="epsilon", epsilon=0.0),
        xv.explain("grad_x_input", model, v, z, targets)))(variables, x)
    # equal up to the sums' stabiliser (Zennit's Norm rule divides by y + 1e-6)
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-4,
                               atol=1e-4 * float(jnp.max(jnp.abs(want.maps))))
    # what reaches the image is the logit it started from
    np.testing.assert_allclose(got.maps.sum((1, 2)), got.logits[jnp.arange(3), targets],
                               rtol=1e-4)


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus", "epsilon_alpha2_beta1"])
def test_relevance_is_conserved_layer_by_layer_without_biases(bias_free, composite):
    """Σ R_in = Σ R_out at every linear layer (with ε = 0, and z⁺ or α2β1 for the convs),
    and the whole logit passes every layer outside the residual branch, through the
    pooling, the residual sum and the ReLUs."""
    model, variables, x = bias_free
    start = lambda lg: jax.nn.one_hot(jnp.argmax(lg, -1), 3) * lg  # noqa: E731
    names = []

    def relevances(v, z):  # jitted: the layers' names are recorded while it traces
        found = lrp.layer_relevances(lambda y: model.apply(v, y), z, start,
                                     lrp.named_composite(composite, epsilon=0.0))
        names[:] = [(path, kind) for path, kind, *_ in found]
        return [(r_in, r_out) for *_, r_in, r_out in found]

    arrays = jax.jit(relevances)(variables, x)
    layers = [(path, kind, None, r_in, r_out) for (path, kind), (r_in, r_out)
              in zip(names, arrays)]
    assert names == [
        ("Conv_0", "conv"), ("Conv_1", "conv"), ("Dense_0", "dense"), ("Dense_1", "dense")]
    logits = model.apply(variables, x)
    total = np.asarray(jnp.max(logits, -1))
    for path, _, _, r_in, r_out in layers:
        sums = [np.asarray(r.reshape(len(x), -1).sum(1)) for r in (r_in, r_out)]
        np.testing.assert_allclose(sums[0], sums[1], rtol=1e-4, err_msg=path)
        if path != "Conv_1":  # the residual branch carries only its share
            np.testing.assert_allclose(sums[1], total, rtol=1e-4, err_msg=path)
    branch = np.asarray(layers[1][4].reshape(len(x), -1).sum(1))
    assert np.all(np.abs(branch) > 1e-3 * np.abs(total)) and not np.allclose(branch, total)


def test_max_pooling_gives_each_window_to_its_first_winner():
    """Winner-take-all: a tie inside a 2 × 2 window goes to the first pixel in row-major
    order, as PyTorch routes it, not shared as JAX's gradient of a max is."""
    x = jnp.array([[1., 1., 0., 2.], [0., 1., 3., 3.], [5., 0., 0., 0.], [0., 0., 0., 0.]])
    x = x.reshape(1, 4, 4, 1)

    class Pool(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(1, (1, 1), use_bias=False, kernel_init=nn.initializers.ones)(x)
            return jnp.sum(jnp.max(x.reshape(1, 2, 2, 2, 2, 1), axis=(2, 4)), axis=(1, 2))

    model = Pool()
    variables = model.init(jax.random.key(0), x)
    r, _ = lrp.relevance(lambda z: model.apply(variables, z), x, lambda lg: lg,
                         lrp.named_composite("epsilon", epsilon=0.0))
    want = np.zeros((4, 4))
    want[0, 0], want[1, 2], want[2, 0] = 1, 3, 5  # the first 1, the first 3, the 5
    np.testing.assert_allclose(np.asarray(r)[0, ..., 0], want, atol=1e-6)


@pytest.mark.parametrize("name", ["cifar10_cnn", "resnet20"])
def test_merging_batchnorm_keeps_the_logits(name):
    """The network LRP's rules see, every BatchNorm folded into the conv before it (and
    every bias into its layer), gives the shipped checkpoint's logits within 1e-5."""
    model, variables = checkpoints.load_checkpoint(checkpoints.PRETRAINED.parent / f"{name}.pkl")
    x = jax.random.uniform(jax.random.key(4), (2, 32, 32, 3))
    merged = jax.jit(lambda v, z: lrp.canonical(lambda y: model.apply(v, y), z))(variables, x)
    np.testing.assert_allclose(merged, model.apply(variables, x), atol=1e-5, rtol=1e-5)


def test_composites_pick_rules_by_path_then_kind_and_refuse_the_unmatched():
    c = lrp.composite({"head/Dense_1": lrp.Epsilon(0.0), "dense": lrp.Epsilon(),
                       "conv": lrp.Gamma()}, first={"conv": lrp.ZBox()})
    assert c.rule("block1/Conv_0", "conv", True) == lrp.ZBox()
    assert c.rule("block1/Conv_1", "conv", False) == lrp.Gamma()
    assert c.rule("head/Dense_1", "dense", False) == lrp.Epsilon(0.0)
    assert c.rule("head/Dense_0", "dense", False) == lrp.Epsilon()
    with pytest.raises(ValueError, match="no rule for the dense layer head/Dense_0"):
        lrp.composite({"conv": lrp.Gamma()}).rule("head/Dense_0", "dense", False)
    with pytest.raises(TypeError, match="must map a module path or kind"):
        lrp.composite({"conv": "gamma"})
    with pytest.raises(ValueError, match="composite must be one of"):
        lrp.named_composite("gamma_everywhere")
    assert lrp.named_composite("epsilon_plus_flat").first == (
        ("conv", lrp.Flat()), ("dense", lrp.Flat()))


def _conv(x_shape, w_shape, **params):
    rng = np.random.default_rng(sum(x_shape) + sum(w_shape))
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    return lambda a, k: jax.lax.conv_general_dilated(a, k, **params), x, w


NHWC = ("NHWC", "HWIO", "NHWC")
LINEAR_MAPS = {
    "same": _conv((2, 9, 9, 3), (3, 3, 3, 8), window_strides=(1, 1), padding="SAME",
                  dimension_numbers=NHWC),
    "strided valid": _conv((2, 9, 9, 3), (3, 3, 3, 8), window_strides=(2, 2),
                           padding="VALID", dimension_numbers=NHWC),
    "groups, dilation, uneven padding": _conv(
        (2, 10, 9, 4), (5, 3, 2, 6), window_strides=(2, 1), padding=((2, 1), (0, 3)),
        dimension_numbers=NHWC, feature_group_count=2, rhs_dilation=(2, 1)),
    "NCHW, input dilation": _conv((2, 4, 9, 9), (8, 4, 3, 3), window_strides=(1, 1),
                                  padding=((1, 2), (2, 0)), lhs_dilation=(2, 2),
                                  dimension_numbers=("NCHW", "OIHW", "NCHW")),
    "depthwise": _conv((2, 9, 9, 6), (3, 3, 1, 6), window_strides=(1, 1), padding="SAME",
                       dimension_numbers=NHWC, feature_group_count=6),
    "1-d": _conv((2, 9, 5), (3, 5, 7), window_strides=(1,), padding="SAME",
                 dimension_numbers=("NWC", "WIO", "NWC")),
    "dense": (lambda a, k: a @ k, jnp.arange(30.0).reshape(2, 3, 5) / 30,
              jnp.ones((5, 4))),
}


@pytest.mark.parametrize("name", list(LINEAR_MAPS))
def test_the_uniform_map_is_the_layer_with_every_weight_one(name):
    """LRP-flat's map, computed as windowed sums, against the layer's own operation on an
    all-ones kernel (run eagerly: each operation alone, as XLA computes it correctly)."""
    fn, x, w = LINEAR_MAPS[name]
    eqn = next(e for e in jax.make_jaxpr(fn)(x, w).jaxpr.eqns
               if e.primitive.name in ("conv_general_dilated", "dot_general"))
    op = lrp.LinearOp(eqn, w.shape)
    np.testing.assert_allclose(op.uniform(x), op(x, jnp.ones_like(w)), rtol=1e-5,
                               atol=1e-5)


class WideFirst(nn.Module):
    """Conv(64) → ReLU → GAP → Dense on 32 × 32 images: a first layer wide enough that
    XLA:CPU (jaxlib 0.10) miscomputed LRP-flat's constant all-ones kernel when a sum
    followed it (2 images of 16 × 16 did not show it)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.mean(nn.relu(nn.Conv(64, (3, 3))(x)), axis=(1, 2)))


def test_flat_maps_under_jit_with_traced_weights_equal_the_eager_ones():
    model = WideFirst()
    x = jax.random.uniform(jax.random.key(6), (2, 32, 32, 3))
    variables = model.init(jax.random.key(7), x)

    def maps(v, z):
        return xv.explain("lrp", model, v, z, composite="epsilon_plus_flat").maps

    eager = maps(variables, x)
    # biases start at zero, so the whole logit reaches the image
    np.testing.assert_allclose(eager.sum((1, 2)), jnp.max(model.apply(variables, x), -1),
                               rtol=1e-4)
    np.testing.assert_allclose(jax.jit(maps)(variables, x), eager, rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(eager).max()))


class SmallNet(nn.Module):
    """conv -> BatchNorm -> ReLU -> max pool -> conv -> ReLU -> GAP -> Dense, with biases."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(nn.Conv(8, (3, 3))(x)))
        x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(4)(jnp.mean(nn.relu(nn.Conv(8, (3, 3))(x)), axis=(1, 2)))


def test_the_explainer_and_an_eager_explain_run_one_program_for_every_composite():
    """An eager `xv.explain` runs the program an `Explainer` of the same settings runs,
    so their maps are equal bit for bit: LRP-ε's divisions would otherwise carry two
    programs' different orders of float32 sums to 2e-4 of a map's scale (the shipped
    CNN, docs/benchmarks.md)."""
    model = SmallNet()
    images = jax.random.uniform(jax.random.key(8), (3, 8, 8, 3))
    variables = jax.jit(model.init)(jax.random.key(9), images)
    variables = {"params": variables["params"],  # running statistics of a trained net
                 "batch_stats": {"bn": {"mean": jnp.linspace(-0.3, 0.2, 8),
                                        "var": jnp.linspace(0.5, 1.5, 8)}}}
    for composite in lrp.COMPOSITES:
        objects = xv.LRP(model, composite=composite).explain(
            variables["params"], variables["batch_stats"], images, normalize=False)[0]
        plain = xv.explain("lrp", model, variables, images, composite=composite).maps
        np.testing.assert_array_equal(objects, plain, err_msg=composite)
        assert np.abs(plain).max() > 0
