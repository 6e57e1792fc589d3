"""demo_xai.py end to end on a tiny untrained checkpoint and synthetic CIFAR-10 files."""

from pathlib import Path

import jax
import numpy as np
import pytest

import cifar10_data
import demo_xai
import train_cifar10 as tc
from architectures import ResNet20
from cifar10_cnn_model import CIFAR10CNN

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(binary_dataset):
    """The synthetic files' arrays (100 train, 20 test images), read by the real reader."""
    folder, _, _ = binary_dataset
    return cifar10_data.load_folder(folder, records=20)


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tiny_variables, tmp_path_factory):
    """An untrained tiny model: the figures' mechanics don't need a trained one, and it
    saves compiling a training step."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pkl"
    tc.save_checkpoint(path, tiny_model, tiny_variables)
    return path


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
    """A tiny ResNet-20 checkpoint with random numpy weights (no jitted init)."""
    model = ResNet20(width=2)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.0, s.shape).astype(np.float32), shapes)
    path = tmp_path_factory.mktemp("ckpt") / "resnet.pkl"
    tc.save_checkpoint(path, model, variables)
    return path


@pytest.mark.slow
def test_demo_writes_every_figure(checkpoint, tiny_resnet, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cifar10_data, "load_cifar10", lambda data_dir: data)
    # the architectures figure explains every shipped network: tiny ones here
    monkeypatch.setattr(demo_xai, "pretrained_checkpoints",
                        lambda: {"cnn": checkpoint, "resnet20": tiny_resnet})
    out = tmp_path / "xai_results"
    demo_xai.main(["--checkpoint", str(checkpoint),
                   "--output-dir", str(out), "--num-images", "6", "--num-detailed", "2",
                   "--smoothgrad-samples", "4", "--lime-samples", "16", "--seed", "1", "--num-compare", "2"])
    printed = capsys.readouterr().out
    assert printed.startswith(f"explaining {checkpoint}: no test accuracy recorded\n")
    detailed = sorted(out.glob("detailed_*.png"))
    expected = detailed + [out / name for name in
                           ("batch_gradcam.png", "misclassified.png", "confusion_matrix.png",
                            "architectures.png")]
    assert len(detailed) == 2
    for path in expected:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000, path
        assert str(path) in printed
    assert sorted(out.iterdir()) == sorted(expected)
    assert f"on the first {len(data.test_labels)} test records" in printed


def test_each_network_explains_the_same_images(checkpoint, tiny_resnet, data):
    networks = {"cnn": tc.load_checkpoint(checkpoint), "resnet20": tc.load_checkpoint(tiny_resnet)}
    images = data.test_images[:2] / np.float32(255)  # the shape the figure test compiles
    explained = demo_xai.explain_architectures(networks, images, ("gradcam", "saliency"))
    assert list(explained) == ["cnn", "resnet20"]
    for name, (preds, maps) in explained.items():
        model, variables = networks[name]
        np.testing.assert_array_equal(preds, np.argmax(model.apply(variables, images), -1))
        for method, m in maps.items():
            assert m.shape == (2, 32, 32) and m.min() >= 0 and m.max() <= 1 + 1e-6, method
    assert not np.allclose(explained["cnn"][1]["saliency"], explained["resnet20"][1]["saliency"])


def test_demo_without_checkpoint_says_how_to_get_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        demo_xai.main(["--checkpoint", str(tmp_path / "missing.pkl"), "--quiet"])
    assert info.value.code == 1
    assert "does not exist; train one with" in capsys.readouterr().err


def _readme_block(heading):
    """The first ```python block after `heading` in the README."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = text[text.index(heading):]
    start = after.index("```python\n") + len("```python\n")
    return after[start:after.index("```", start)]


def test_seed_custom_xai_snippet_runs_as_written(data, tmp_path, monkeypatch):
    """The README's snippet, unchanged, on a width-64 checkpoint written by
    `train_cifar10.save_checkpoint` (what training writes; untrained, to save the
    compilation of a width-64 training step)."""
    monkeypatch.chdir(tmp_path)
    model = CIFAR10CNN()
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    tc.save_checkpoint("cifar10_model.pkl", model, variables)
    image = data.test_images[3] / np.float32(255)
    scope = {"your_image": image}
    exec(_readme_block("### Custom XAI analysis"), scope)
    for name in ("heatmap", "saliency_map", "smooth_sal"):
        assert scope[name].shape == (32, 32) and 0 <= scope[name].min() <= 1
        assert scope[name].max() == pytest.approx(1, abs=1e-4)
    model, variables = tc.load_checkpoint(tmp_path / "cifar10_model.pkl")
    logits = model.apply(variables, image[None])
    assert scope["pred_class"] == int(np.argmax(logits))
    assert scope["score"] == pytest.approx(float(jax.nn.softmax(logits).max()), rel=1e-5)
    assert scope["overlay"].shape == (32, 32, 3)
