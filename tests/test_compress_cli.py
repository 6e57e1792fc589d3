"""compress_xai.py end to end on a tiny checkpoint and synthetic CIFAR-10 files."""

import json
from typing import NamedTuple
import subprocess
import sys

import jax
import numpy as np
import pytest

import checkpoints
import cifar10_data
import compress_xai
import xai_cli as cli
import train_cifar10 as tc
import xai_compression as xc
from conftest import ROOT
from test_demo import data  # noqa: F401 (a fixture)

pytest.importorskip("qwix")
# No fine-tuning in the end-to-end card (its training step is the costliest program to
# compile; build_variant's fine-tuning is tested with QAT below and the masks' in
# test_compression.py)
FLAGS = ["--num-images", "4", "--calibration-images", "16", "--finetune-epochs", "0",
         "--top-k", "20", "--timing-repeats", "1", "--step", "256", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tiny_variables, tmp_path_factory):
    path = tmp_path_factory.mktemp("compress") / "tiny.pkl"
    tc.save_checkpoint(path, tiny_model, tiny_variables)
    return path


@pytest.mark.slow
def test_the_card_measures_every_variant_and_saves_each_as_a_checkpoint(
        checkpoint, data, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(cifar10_data, "load_cifar10", lambda data_dir: data)
    out = tmp_path / "card"
    compress_xai.main(["--checkpoint", str(checkpoint), "--output-dir", str(out),
                       "--variants", "int8", "filters", "--methods", "saliency",
                       "--filter-fraction", "0.5", "--parts", "size", "accuracy", "speed",
                       "survival", *FLAGS])
    report = json.loads((out / "compression.json").read_text())
    rows = report["variants"]
    assert list(rows) == ["original", "int8", "filters"]
    assert rows["original"]["speed"]["throughput_ratio"] == 1.0
    assert rows["int8"]["size"]["weight_bytes"] < rows["original"]["size"]["weight_bytes"] / 3
    assert rows["filters"]["size"]["flops"] < 0.4 * rows["original"]["size"]["flops"]
    from xai_io import file_sha256
    assert rows["filters"]["record"] == {
        "pruning": "filters", "fraction": 0.5, "criterion": "l1", "finetune_epochs": 0,
        "original": {"checkpoint": checkpoints.shown(checkpoint),  # the explorer pairs
                     "sha256": file_sha256(checkpoint)}}  # a variant with its original
    for name in ("int8", "filters"):
        assert 0 <= rows[name]["accuracy"]["agreement"] <= 1
        survival = rows[name]["survival"]["saliency"]
        assert -1 <= survival["spearman"]["low"] <= survival["spearman"]["high"] <= 1
        # every variant is a checkpoint that loads and runs
        model, variables = checkpoints.load_checkpoint(out / "variants" / f"{name}.pkl")
        assert np.all(np.isfinite(np.asarray(model.apply(
            variables, np.asarray(data.test_images[:2], np.float32) / 255))))
    assert xc.record(checkpoints.load_checkpoint(out / "variants" / "int8.pkl")[0]) == (
        rows["int8"]["record"])
    own = json.loads((out / "variants" / "int8.json").read_text())  # each variant's report
    assert own["accuracy"] == rows["int8"]["accuracy"] and own["compression"] == rows["int8"][
        "record"] and own["original"]["size"] == rows["original"]["size"]
    assert checkpoints.describe_checkpoint(out / "variants" / "int8.pkl").endswith(
        f"{rows['int8']['accuracy']['accuracy_first1000']:.1%} on the first 1,000 test "
        f"records, {rows['int8']['accuracy']['accuracy']:.1%} on all")
    md = (out / "compression.md").read_text()
    assert "| int8 | saliency |" in md and "| filters |" in md
    assert (out / "survival.png").read_bytes()[:4] == b"\x89PNG"

    # a variant tuned elsewhere (e.g. on a GPU) is measured here without tuning it again,
    # and a part run on its own joins the parts already in the card
    monkeypatch.setattr(tc, "fine_tune", lambda *a, **k: pytest.fail("tuned again"))
    (out / "compression.json").write_text(json.dumps(
        {**report, "variants": {**rows, "filters": {**rows["filters"], "size": "stale"}}}))
    compress_xai.main(["--checkpoint", str(checkpoint), "--output-dir", str(out),
                       "--variants", "filters", "--variants-from", str(out / "variants"),
                       "--parts", "size", *FLAGS, "--finetune-epochs", "1"])  # not used
    again = json.loads((out / "compression.json").read_text())["variants"]
    assert list(again) == ["original", "filters"]
    assert again["filters"]["record"] == rows["filters"]["record"]
    assert again["filters"]["size"] == rows["filters"]["size"]  # redone
    for part in ("accuracy", "speed", "survival"):  # kept
        assert again["filters"][part] == rows["filters"][part], part
    (out / "variants" / "filters.pkl").rename(out / "variants" / "sparse50.pkl")
    with pytest.raises(SystemExit):
        compress_xai.main(["--checkpoint", str(checkpoint), "--output-dir",
                           str(tmp_path / "re"), "--variants", "sparse50", "--variants-from",
                           str(out / "variants"), "--parts", "size", *FLAGS])
    assert ("is not the variant 'sparse50': it records {'pruning': 'filters'"
            in capsys.readouterr().err)


class FakeCard(NamedTuple):
    measures: dict
    summary: dict


def test_faithfulness_pairs_each_image_of_the_variant_with_the_original():
    morf = np.linspace(0.2, 0.6, 12)
    cards = {"original": FakeCard({"road_morf_auc": morf, "road_lerf_auc": morf},
                                  {"randomization": {"spearman_abs": [0.2, 0.4]}}),
             "variant": FakeCard({"road_morf_auc": morf + 0.05, "road_lerf_auc": morf},
                                 {"randomization": None})}
    found = compress_xai.faithfulness_part(cards, compress_xai.CompressConfig())
    # every image's MoRF AUC worse by 0.05: the paired test says worse, though the
    # two sets of AUCs overlap almost entirely
    assert found["road_morf_auc"]["variant_vs_original"]["verdict"] == "worse"
    assert found["road_lerf_auc"]["variant_vs_original"]["verdict"] == "tie"
    assert found["road_morf_auc"]["variant"]["mean"] == pytest.approx(np.mean(morf) + 0.05)
    assert found["randomization_original"] == pytest.approx(0.3)
    assert found["randomization_variant"] is None


@pytest.mark.slow
def test_a_bad_flag_is_one_line_from_the_command_line():
    done = subprocess.run([sys.executable, "compress_xai.py", "--variants", "int3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--variants: invalid choice: 'int3'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("flags, message", [
    (["--filter-fraction", "1.5"], "--filter-fraction: must be in [0, 1), got 1.5"),
    (["--filter-criterion", "l2"], "--filter-criterion: invalid choice: 'l2'"),
    (["--num-images", "0"], "--num-images: must be an int >= 1, got 0"),
    (["--finetune-lr", "0"], "--finetune-lr: must be > 0, got 0.0"),
])
def test_bad_flags_name_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        compress_xai.parse_args(flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_quantisation_aware_fine_tuning_trains_through_the_rounding(tiny_model, tiny_variables,
                                                                     data):  # noqa: F811
    config = compress_xai.CompressConfig(finetune_images=64, finetune_batch_size=32,
                                         finetune_lr=0.05, quiet=True)
    qmodel, qvariables, record = compress_xai.build_variant(
        "int4_weights_qat", tiny_model, tiny_variables, data, config)
    assert record == {"quantization": "int4_weights", "quantization_aware_epochs": 1,
                      "finetune_device": cli.describe_device()}
    ptq_model, ptq_variables = xc.quantize(tiny_model, tiny_variables, "int4_weights")
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), qvariables["params"],
                         ptq_variables["params"])
    assert any(jax.tree.leaves(moved))  # the fine-tuning changed the weights ...
    stored = xc.stored_params(qmodel, qvariables)  # ... and they are on the int4 grid
    kernel = stored["block1"]["Conv_0"]["kernel"]
    assert np.abs(kernel["qvalue"]).max() <= 7
    np.testing.assert_array_equal(xc.dequantize(kernel),
                                  np.asarray(qvariables["params"]["block1"]["Conv_0"]["kernel"]))
