"""evaluate_xai.py end to end on a tiny checkpoint and synthetic CIFAR-10 files."""

import json

import pytest

import cifar10_data
import evaluate_xai
import train_cifar10 as tc
from test_demo import PNG, data  # noqa: F401 (a fixture)

FLAGS = ["--num-images", "6", "--chunk", "6", "--randomization-images", "3", "--step", "128",
         "--ig-steps", "8", "--rise-masks", "16", "--occlusion-patch", "8",
         "--occlusion-stride", "8", "--batch-size", "128"]


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tiny_variables, tmp_path_factory):
    """An untrained tiny model: the evaluation's mechanics don't need a trained one, and
    it saves compiling a training step."""
    path = tmp_path_factory.mktemp("evaluate") / "tiny.pkl"
    tc.save_checkpoint(path, tiny_model, tiny_variables)
    return path


def test_evaluation_writes_a_card_per_method_tables_and_figures(checkpoint, data,  # noqa: F811
                                                                 tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr(cifar10_data, "load_cifar10", lambda data_dir: data)
    out = tmp_path / "evaluation"
    methods = ["integrated_gradients"]
    evaluate_xai.main(["--checkpoint", str(checkpoint), "--output-dir", str(out), "--methods",
                       *methods, *FLAGS])
    assert capsys.readouterr().out.count("| integrated_gradients |") == 2
    report = json.loads((out / "evaluation.json").read_text())
    assert report["num_images"] == 6 and list(report["methods"]) == methods
    for name, card in report["methods"].items():
        for key in ("deletion_auc", "insertion_auc"):
            assert 0 <= card[key] <= 1
        assert card["randomization_levels"][0] == "head/Dense_1"
        assert card["randomization_levels"][-1] == "block1/Conv_0"
        for values in card["randomization"].values():
            assert len(values) == 9 and all(-1 <= v <= 1 for v in values)
        assert set(card["random_logit"]) == {"spearman_abs", "spearman_signed", "ssim"}
        assert card["ms_per_image"] > 0 and card["passes_per_image"]["forward"] >= 1
        assert card["verdicts"]["randomization"] in ("passes", "fails")
    assert report["methods"]["integrated_gradients"]["parameters"]["steps"] == 8
    assert report["methods"]["integrated_gradients"]["passes_per_image"] == {
        "forward": 10, "backward": 8}
    gap = report["methods"]["integrated_gradients"]["completeness_gap"]
    assert 0 <= gap["median"] <= gap["max"]
    table = (out / "evaluation.md").read_text()
    assert "| random map |" in table and "| integrated_gradients |" in table
    for name in ("deletion_insertion.png", "randomization.png"):
        assert (out / name).read_bytes()[:8] == PNG
