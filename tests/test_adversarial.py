"""Attacks on predictions and explanations: analytic optima on linear models, budgets,
keys, closed-form sensitivities, and the attacks doing what they claim on a small ReLU
network."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adversarial as adv
import xai_attacks
import xai_metrics as xm
import xai_visualizations as xv
from xai_models import softplus_relus

SHAPE = (6, 6, 3)


@pytest.fixture(scope="module")
def linear():
    """A two-class linear model f(x) = W·x + b as a plain function, and images inside
    [0.3, 0.7], so that no attack of ε <= 0.1 reaches the clip at 0 or 1."""
    w = jax.random.normal(jax.random.key(0), SHAPE + (2,))
    b = jnp.array([0.3, -0.2])
    f = lambda x: jnp.einsum("nhwc,hwck->nk", x, w) + b[None]  # noqa: E731
    images = 0.3 + 0.4 * jax.random.uniform(jax.random.key(1), (4,) + SHAPE)
    labels = jnp.array([0, 1, 1, 0], jnp.int32)
    return f, w, images, labels


def optimum(w, labels, eps, norm):
    """The loss-maximising point of a binary linear model: against d = w_y − w_other."""
    d = jnp.where((labels == 0)[:, None, None, None], w[..., 0] - w[..., 1],
                  w[..., 1] - w[..., 0])
    if norm == "linf":
        return -eps * jnp.sign(d)
    return -eps * d / jnp.linalg.norm(d.reshape(len(d), -1), axis=-1)[:, None, None, None]


def test_fgsm_reaches_the_linf_optimum_of_a_linear_model(linear):
    f, w, images, labels = linear
    adversarial = xai_attacks.fgsm(f, None, images, labels, eps=0.05)
    np.testing.assert_allclose(adversarial - images, optimum(w, labels, 0.05, "linf"),
                               atol=1e-6)


@pytest.mark.parametrize("norm, random_init, steps, atol",
                         [("linf", True, 4, 1e-6), ("l2", False, 3, 1e-6),
                          ("l2", True, 40, 1e-4)])
def test_pgd_reaches_the_optimum_of_a_linear_model(linear, norm, random_init, steps, atol):
    f, w, images, labels = linear
    eps = 0.08 if norm == "linf" else 0.5
    adversarial = xai_attacks.pgd(f, None, images, labels, jax.random.key(2), eps=eps,
                          step_size=eps, steps=steps, norm=norm, random_init=random_init)
    np.testing.assert_allclose(adversarial - images, optimum(w, labels, eps, norm), atol=atol)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attacks_stay_within_eps_and_in_the_unit_range(tiny_model, tiny_variables, images,
                                                       norm):
    x = images[:4].at[0].set(0.0).at[1].set(1.0)  # at both ends of the range
    labels = jnp.arange(4, dtype=jnp.int32)
    eps = 8 / 255 if norm == "linf" else 0.5
    found = [xai_attacks.pgd(tiny_model, tiny_variables, x, labels, jax.random.key(3), eps=eps,
                     step_size=eps / 4, steps=5, norm=norm)]
    if norm == "linf":
        found.append(xai_attacks.fgsm(tiny_model, tiny_variables, x, labels, eps=eps))
    for adversarial in found:
        delta = (adversarial - x).reshape(4, -1)
        size = (jnp.max(jnp.abs(delta), -1) if norm == "linf"
                else jnp.linalg.norm(delta, axis=-1))
        assert float(jnp.max(size)) <= eps * (1 + 1e-5)
        assert float(adversarial.min()) >= 0 and float(adversarial.max()) <= 1
        assert float(jnp.max(size)) > 0.5 * eps  # it moved


def test_pgd_same_key_same_attack_and_batch_independent(tiny_model, tiny_variables, images):
    labels = jnp.arange(4, dtype=jnp.int32)
    run = lambda x, y, key: xai_attacks.pgd(tiny_model, tiny_variables, x, y, key,  # noqa: E731
                                    eps=4 / 255, step_size=1 / 255, steps=3)
    a = run(images[:4], labels, jax.random.key(5))
    np.testing.assert_array_equal(a, run(images[:4], labels, jax.random.key(5)))
    assert not np.array_equal(a, run(images[:4], labels, jax.random.key(6)))
    np.testing.assert_allclose(run(images[2:3], labels[2:3], jax.random.key(5))[0], a[2],
                               atol=1e-6)


def test_robust_accuracy_is_the_clean_accuracy_at_zero_and_falls(linear):
    f, w, images, labels = linear
    clean = float(jnp.mean(jnp.argmax(f(images), -1) == labels))
    acc = xai_attacks.robust_accuracy(f, None, images, labels, jax.random.key(0),
                              epsilons=[0.0, 0.05, 0.3], steps=5, batch_size=3)
    assert acc["pgd"][0] == acc["fgsm"][0] == clean
    assert acc["pgd"][2] == 0.0  # ε = 0.3 flips every margin of this model
    # On a linear model both reach the same optimum, so FGSM is exactly as strong.
    assert acc["fgsm"] == acc["pgd"]


def test_bad_attack_arguments_are_named(linear):
    f, _, images, labels = linear
    with pytest.raises(ValueError, match="norm must be one of"):
        xai_attacks.pgd(f, None, images, labels, jax.random.key(0), eps=0.1, step_size=0.1,
                steps=1, norm="l1")
    with pytest.raises(ValueError, match="labels must be 4 integer classes"):
        xai_attacks.robust_accuracy(f, None, images, labels[:2], jax.random.key(0), epsilons=[0.1])
    with pytest.raises(ValueError, match="eps"):
        xai_attacks.robust_accuracy(f, None, images, labels, jax.random.key(0), epsilons=[-0.1])
    with pytest.raises(ValueError, match=r"images must be a batch \(N, H, W, C\), got shape"):
        xai_attacks.fgsm(f, None, images[0], labels, eps=0.1)
    with pytest.raises(ValueError, match="key must be a jax.random.key"):
        xai_attacks.pgd(f, None, images, labels, None, eps=0.1, step_size=0.1, steps=1)
    with pytest.raises(ValueError, match="beta .* gradient methods"):
        adv.explanation("occlusion", f, None, beta=10.0)


# ----------------------------------------------------------------------------------------
# Sensitivities.


def test_sensitivity_of_a_constant_explainer_is_zero(images):
    const = lambda x, t: jnp.ones((x.shape[0], 32, 32))  # noqa: E731
    s = xm.sensitivity(const, images[:3], jnp.zeros(3, jnp.int32), jax.random.key(0),
                       n_samples=5)
    for value in (s.max, s.avg, s.lipschitz):
        np.testing.assert_array_equal(value, 0.0)


def test_sensitivity_closed_forms_of_gradient_x_input_on_one_pixel():
    """One pixel x, e(x) = w·x: |e(x + δ) − e(x)| / |e(x)| = |δ| / x and the Lipschitz
    ratio is |w| for every δ; with δ ~ U[−r, r], max |δ| -> r and E|δ| = r / 2."""
    w, x, r = -1.7, 0.4, 0.02
    f = lambda z: w * z.reshape(-1, 1) * jnp.array([[1.0, 0.0]])  # noqa: E731 (logit 0)
    gxi = lambda z, t: xv.explain("grad_x_input", f, None, z, t).maps  # noqa: E731
    s = xm.sensitivity(gxi, jnp.full((1, 1, 1, 1), x), jnp.zeros(1, jnp.int32),
                       jax.random.key(1), radius=r, n_samples=4000, batch_size=4000)
    np.testing.assert_allclose(s.max, r / x, rtol=2e-3)
    assert float(s.max[0]) <= r / x
    np.testing.assert_allclose(s.avg, r / (2 * x), rtol=0.05)
    # float32 cancellation in e(x + δ) − e(x) for the smallest draws: 1e-5 of x over δ.
    np.testing.assert_allclose(s.lipschitz, abs(w), rtol=2e-2)


def test_adversarial_sensitivity_reaches_the_closed_form_and_beats_monte_carlo(linear):
    """Gradient × Input of a linear model, summed over channels: e(x)_p = Σ_c w_pc x_pc;
    the sup over the L∞ ball of ‖e(x + δ) − e(x)‖ is r ‖Σ_c |w_pc|‖₂, at δ = r sign(w).
    """
    f, w, images, _ = linear
    targets = jnp.zeros(4, jnp.int32)
    gxi = adv.explanation("grad_x_input", f, None)
    r = 0.02
    found, mc = adv.adversarial_sensitivity(gxi, gxi, images, targets, jax.random.key(2),
                                            radius=r, n_samples=8, steps=3, step_size=r)
    expected = r * jnp.linalg.norm(jnp.sum(jnp.abs(w[..., 0]), -1)) / jnp.linalg.norm(
        gxi(images, targets).reshape(4, -1), axis=-1)
    np.testing.assert_allclose(found, expected, rtol=1e-5)
    assert bool(jnp.all(mc.max <= found)) and bool(jnp.all(mc.max < 0.9 * expected))


def test_sensitivity_is_batch_independent(linear, threefry):
    f, _, images, _ = linear
    gxi = adv.explanation("grad_x_input", f, None)
    targets = jnp.zeros(4, jnp.int32)
    batch = xm.sensitivity(gxi, images, targets, jax.random.key(3), n_samples=6,
                           batch_size=5)
    alone = xm.sensitivity(gxi, images[1:2], targets[1:2], jax.random.key(3), n_samples=6)
    np.testing.assert_allclose(alone.max[0], batch.max[1], rtol=1e-5)
    np.testing.assert_allclose(alone.avg[0], batch.avg[1], rtol=1e-5)


# ----------------------------------------------------------------------------------------
# Attacks on explanations, on a small ReLU network.


class SmallReLU(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope="module")
def relu_net():
    model = SmallReLU()
    images = jax.random.uniform(jax.random.key(4), (8,) + SHAPE)
    variables = model.init(jax.random.key(5), images)
    targets = jnp.argmax(model.apply(variables, images), -1)
    return model, variables, images, targets


def test_softplus_surrogate_tends_to_the_relu_network(relu_net):
    model, variables, images, _ = relu_net
    f = lambda x: model.apply(variables, x)  # noqa: E731
    close = softplus_relus(f, 1e4)(images)
    np.testing.assert_allclose(close, f(images), atol=1e-3)
    assert float(jnp.max(jnp.abs(softplus_relus(f, 1.0)(images) - f(images)))) > 1e-2
    # Its saliency has second derivatives; the ReLU network's are zero.
    for fn, nonzero in ((f, False), (softplus_relus(f, 10.0), True)):
        second = jax.grad(lambda x: jnp.sum(jnp.abs(xv.input_gradients(
            fn, None, x, jnp.zeros(8, jnp.int32))[0])))(images)
        assert bool(jnp.any(second != 0)) == nonzero
    linear = lambda x: 2.0 * x.reshape(x.shape[0], -1)[:, :3]  # noqa: E731 (no ReLU)
    np.testing.assert_array_equal(softplus_relus(linear, 3.0)(images), linear(images))


def test_fragility_attack_beats_random_noise_and_keeps_the_class(relu_net):
    model, variables, images, targets = relu_net
    h, surrogate, predict, _ = adv.surrogates("saliency", model, variables, beta=10.0)
    eps, k = 8 / 255, 10
    noise = adv.random_sign(h, predict, images, targets, jax.random.key(6), eps=eps, k=k)
    attack = adv.fragility_attack(h, surrogate, predict, images, targets, eps=eps, steps=5,
                                  k=k)
    assert float(jnp.mean(attack.changes["top_k"])) < float(jnp.mean(noise.changes["top_k"]))
    assert bool(jnp.all(attack.kept)) and bool(jnp.all(predict(attack.images) == targets))
    assert float(jnp.max(jnp.abs(attack.images - images))) <= eps * (1 + 1e-5)
    np.testing.assert_allclose(attack.maps, h(attack.images, targets), atol=1e-6)
    again = adv.map_changes(h(images, targets), attack.maps, k)
    np.testing.assert_allclose(again["top_k"], attack.changes["top_k"])


def test_lime_can_be_attacked_through_its_forward_passes(relu_net):
    """Its segments pass no gradient (piecewise constant), its perturbed passes do."""
    model, variables, images, targets = relu_net
    h = adv.explanation("lime", model, variables, key=jax.random.key(7), n_samples=16,
                        n_segments=4)
    grads = jax.grad(lambda x: jnp.sum(h(x, targets[:2]) ** 2))(images[:2])
    assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.max(jnp.abs(grads))) > 0


def test_map_changes_by_hand():
    a = jnp.zeros((1, 4, 4)).at[0, 0, 0].set(3.0).at[0, 0, 1].set(2.0)
    b = jnp.zeros((1, 4, 4)).at[0, 0, 0].set(-1.0).at[0, 3, 3].set(5.0)
    changes = adv.map_changes(a, b, 2)
    np.testing.assert_allclose(changes["top_k"], [0.5])  # (0, 0) is in both top-2
    # Centres of mass: a at (0, 0.4), b at (2.5, 2.5).
    np.testing.assert_allclose(adv.center_of_mass(a), [[0.0, 0.4]], atol=1e-6)
    np.testing.assert_allclose(changes["center_shift"], [np.hypot(2.5, 2.1)], rtol=1e-6)


def test_manipulation_moves_the_map_toward_the_target(relu_net):
    model, variables, images, targets = relu_net
    h, surrogate, _, logits = adv.surrogates("grad_x_input", model, variables, beta=10.0)
    goal = h(jnp.roll(images, 1, 0), jnp.roll(targets, 1, 0))
    result = adv.manipulate(h, surrogate, logits, images, targets, goal, eps=8 / 255,
                            steps=30, learning_rate=2e-3)
    assert float(jnp.mean(result.mse_after)) < 0.8 * float(jnp.mean(result.mse_before))
    assert float(jnp.max(jnp.abs(result.images - images))) <= 8 / 255 * (1 + 1e-5)
    np.testing.assert_allclose(result.mse_before, adv.map_mse(h(images, targets), goal))
    np.testing.assert_array_equal(result.kept,
                                  jnp.argmax(logits(result.images), -1) == targets)


# ----------------------------------------------------------------------------------------
# Adversarial training and the robustness card.


@pytest.mark.slow
def test_adversarial_training_trains_on_pgd_examples(tiny_model):
    import optax

    import train_cifar10 as tc

    config = tc.TrainConfig(recipe="adversarial", epochs=1, batch_size=8)
    settings = tc.recipe(config)
    assert settings["attack"] == (8 / 255, 2 / 255, 7)
    # the recipe's ε and step with 2 ascents instead of 7: the same program with its
    # ascent unrolled 2 times instead of 7, so less to compile
    attack = settings["attack"][:2] + (2,)
    state = tc.create_train_state(tiny_model, config, jax.random.key(0), 10)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)),
             "label": jnp.arange(8, dtype=jnp.int32)}
    x = batch["image"].astype(jnp.float32) / 255
    dropout = jax.random.key(2)
    found = jax.jit(tc.adversarial_batch, static_argnums=5)(
        state, x, batch["label"], jax.random.key(1), dropout, attack)
    assert float(jnp.max(jnp.abs(found - x))) <= 8 / 255 * (1 + 1e-5)
    assert float(found.min()) >= 0 and float(found.max()) <= 1

    def loss(images):
        logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                                images, train=True, mutable=["batch_stats"],
                                rngs={"dropout": dropout})[0]
        return float(optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["label"]).mean())

    assert loss(found) > loss(x)
    new, metrics = tc.train_step(state, batch, augmented=True, attack=attack)
    assert np.isfinite(float(metrics["loss"])) and int(new.step) == 1


@pytest.mark.slow
def test_robustness_card_from_a_tiny_run(relu_net, tmp_path):
    import robustness_xai as rx
    from cifar10_data import Cifar10

    rng = np.random.default_rng(1)
    test = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(6) % 3).astype(np.int32)  # SmallReLU has three classes
    data = Cifar10(test, labels, test, labels)
    config = rx.RobustnessConfig(
        checkpoint="tiny", output_dir=str(tmp_path), methods=("saliency",),
        accuracy_images=6, accuracy_epsilons=(0, 8), pgd_steps=2, num_images=4,
        sensitivity_images=4, fragility_epsilons=(8,), attack_steps=2, top_k=10,
        manipulation_images=4,
        manipulation_steps=2, sensitivity_samples=2, chunk=4, quiet=True)
    model, variables = relu_net[:2]  # GAP before its Dense: any image size
    report = rx.run(config, model, variables, data)
    for name in ("robustness.json", "robustness.md", "accuracy.png", "fragility.png",
                 "manipulation.png"):
        assert (tmp_path / name).is_file()
    acc = report["accuracy"]
    clean = jnp.mean(jnp.argmax(model.apply(variables, test / 255.0), -1) == labels)
    np.testing.assert_allclose(acc["pgd"][0], clean)
    assert acc["pgd"][1] <= acc["pgd"][0]
    saliency = report["methods"]["saliency"]
    sensitivity = saliency["sensitivity"]
    assert sensitivity["adversarial"]["mean"] >= sensitivity["max"]["mean"]
    assert set(saliency["fragility"]["by_eps"]["8"]) == {"random", "attack", "attack_vs_random"}
    card = (tmp_path / "robustness.md").read_text()
    assert "PGD-2" in card and "Manipulation" in card and "Saliency" in card
    # One more part for another method, into the same folder: the rest is kept.
    again = rx.run(dataclasses.replace(config, parts=("sensitivity",),
                                       methods=("grad_x_input",)),
                   model, variables, data)
    assert again["accuracy"] == report["accuracy"]
    assert again["manipulation"] == report["manipulation"]
    assert again["methods"]["saliency"] == report["methods"]["saliency"]
    assert set(again["methods"]["grad_x_input"]) == {"label", "sensitivity"}
    assert "Kept from an earlier run" in (tmp_path / "robustness.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--fragility-epsilons", "-1"], "must be a non-negative number"),
    (["--beta", "0"], "must be a positive number"),
    (["--methods", "nope"], "invalid choice"),
    (["--chunk", "0"], "must be an int >= 1"),
])
def test_robustness_flags_are_checked(argv, message, capsys):
    import robustness_xai as rx

    with pytest.raises(SystemExit):
        rx.parse_args(argv)
    assert message in capsys.readouterr().err
