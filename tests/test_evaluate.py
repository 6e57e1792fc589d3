"""evaluate_xai.py end to end on a tiny checkpoint and synthetic CIFAR-10 files."""

import json

import pytest

import cifar10_data
import evaluate_xai
import train_cifar10 as tc
from test_demo import PNG, data  # noqa: F401 (a fixture)

FLAGS = ["--num-images", "6", "--chunk", "6", "--randomization-images", "3", "--step", "128",
         "--ig-steps", "8", "--rise-masks", "16", "--occlusion-patch", "8",
         "--occlusion-stride", "8", "--batch-size", "128", "--faithfulness-subsets", "8",
         "--infidelity-perturbations", "4", "--focus-mosaics", "4"]


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tiny_variables, tmp_path_factory):
    """An untrained tiny model: the evaluation's mechanics don't need a trained one, and
    it saves compiling a training step."""
    path = tmp_path_factory.mktemp("evaluate") / "tiny.pkl"
    tc.save_checkpoint(path, tiny_model, tiny_variables)
    return path


@pytest.mark.slow
def test_evaluation_writes_a_card_per_method_tables_and_figures(checkpoint, data,  # noqa: F811
                                                                 tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr(cifar10_data, "load_cifar10", lambda data_dir: data)
    out = tmp_path / "evaluation"
    methods = ["integrated_gradients"]
    evaluate_xai.main(["--checkpoint", str(checkpoint), "--output-dir", str(out), "--methods",
                       *methods, *FLAGS])
    assert capsys.readouterr().out.count("| integrated_gradients |") == 4
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
        # The fresh model is the cascade's last level, for the trained model's class.
        fresh = card["fresh_model"]["for_the_trained_models_target"]
        assert fresh["spearman_abs"] == pytest.approx(
            card["randomization"]["spearman_abs"][-1], abs=1e-4)
        assert -1 <= card["fresh_model"]["for_its_own_prediction"]["spearman_abs"] <= 1
        assert "mean 0, variance 1" in card["randomization_setup"]
        # Every measure: a mean inside its bootstrap interval, and the paired test
        # against the random maps where the measure has a better side.
        assert set(card["statistics"]) == set(evaluate_xai.MEASURES)
        for measure, st in card["statistics"].items():
            assert st["low"] <= st["mean"] <= st["high"], measure
            assert (evaluate_xai.MEASURES[measure][1] is None) == ("vs_random" not in st)
            if "vs_random" in st:
                assert st["vs_random"]["verdict"] in ("better", "worse", "tie")
                assert 0 <= st["vs_random"]["p_value"] <= 1
        assert card["verdicts"]["deletion_below_random"] == (
            card["statistics"]["deletion_auc"]["vs_random"]["verdict"] == "better")
        for measure in ("road_morf_auc", "road_lerf_auc", "deletion_blur", "focus"):
            assert 0 <= card["statistics"][measure]["mean"] <= 1
    assert report["methods"]["integrated_gradients"]["parameters"]["steps"] == 8
    assert report["methods"]["integrated_gradients"]["passes_per_image"] == {
        "forward": 10, "backward": 8}
    gap = report["methods"]["integrated_gradients"]["completeness_gap"]
    assert 0 <= gap["median"] <= gap["max"]
    table = (out / "evaluation.md").read_text()
    assert "| random map |" in table and "| integrated_gradients |" in table
    assert set(report["random_reference"]) == set(evaluate_xai.MEASURES)
    assert "ROAD MoRF AUC ↓" in table and "paired Wilcoxon" in table
    for name in ("deletion_insertion.png", "randomization.png"):
        assert (out / name).read_bytes()[:8] == PNG
