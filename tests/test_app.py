"""The Streamlit explorer's page logic (Streamlit's AppTest, in-process, on a tiny
checkpoint and synthetic data) and its upload reader. The real-browser test is in
test_app_browser.py."""

import io
import os

import jax
import numpy as np
import pytest
from PIL import Image

import app
import checkpoints
import cifar10_data
import train_cifar10 as tc
from cifar10_data import CLASS_NAMES
from test_demo import data  # noqa: F401 (a fixture)

AppTest = pytest.importorskip("streamlit.testing.v1").AppTest  # not on the GPU machine

APP = str(app.ROOT / "app.py")


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tiny_variables, tmp_path_factory):
    """The untrained tiny model: it misclassifies plenty, which the filters need."""
    path = tmp_path_factory.mktemp("app") / "tiny.pkl"
    tc.save_checkpoint(path, tiny_model, tiny_variables)
    return path


@pytest.fixture
def page(checkpoint, data, monkeypatch):  # noqa: F811 (data)
    """A fresh session of the page on the tiny checkpoint and the synthetic test set."""
    monkeypatch.setattr(cifar10_data, "load_cifar10", lambda data_dir: data)
    monkeypatch.setenv("XAI_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("CIFAR10_DIR", "synthetic")
    at = AppTest.from_file(APP, default_timeout=120)
    return at.run()


def _probabilities(checkpoint, image_u8):  # noqa: F811
    model, variables = tc.load_checkpoint(checkpoint)
    return np.asarray(jax.nn.softmax(model.apply(variables, image_u8[None] / np.float32(255))))[0]


def _text(at):
    return "\n".join(m.value for m in at.markdown)


def test_a_test_image_is_shown_with_prediction_maps_and_evidence(page, checkpoint, data):  # noqa: F811
    assert not page.exception and not page.error
    assert f"Explaining {checkpoint}: no test accuracy recorded." in [
        c.value for c in page.caption]
    probs = _probabilities(checkpoint, data.test_images[0])
    pred, label = int(probs.argmax()), int(data.test_labels[0])
    text = _text(page)
    assert f"### Prediction: {CLASS_NAMES[pred]} ({probs[pred]:.1%})" in text
    assert f"true class **{CLASS_NAMES[label]}**" in text
    top3 = ", ".join(f"{CLASS_NAMES[i]} {probs[i]:.1%}" for i in np.argsort(probs)[::-1][:3])
    assert f"Top 3: {top3}" in text
    # the default explainers, each with a figure and its evidence
    assert [h.value for h in page.subheader] == [f"Grad-CAM — {CLASS_NAMES[pred]}",
                                                 f"Saliency — {CLASS_NAMES[pred]}"]
    assert len(page.get("image")) == 1 + 2  # the image, then one figure per explainer
    for name in ("ROAD AUC, most relevant removed first on this image",
                 "ROAD AUC, least relevant removed first on this image",
                 "Deletion AUC to blur on this image"):
        assert text.count(name) == 2, name
    assert "Deletion AUC on this image" not in text  # to black: not a measure that holds
    assert text.count("Sanity checks: **not evaluated** for this checkpoint") == 2
    assert "including compilation (its first call)" in text
    # the shipped checkpoints are listed after the chosen one; only the methods that fit
    # the CNN are offered (no attention rollout)
    shipped = page.sidebar.selectbox(key="shipped")
    assert shipped.options[0] == str(checkpoint)
    assert any("pretrained/cifar10_cnn.pkl" in option for option in shipped.options)
    offered = page.sidebar.multiselect[0].options
    assert "Attention rollout" not in offered and "Guided Backprop" in offered


def test_filters_pick_a_class_or_only_misclassified_images(page, checkpoint, data):  # noqa: F811
    page.selectbox[0].select("one class").run()
    page.selectbox[1].select("dog").run()
    assert "true class **dog**" in _text(page) and not page.exception
    page.number_input[0].set_value(2).run()
    second_dog = np.flatnonzero(data.test_labels == CLASS_NAMES.index("dog"))[1]
    assert page.get("image")[0].proto.imgs[0].caption == f"test record {second_dog}"

    page.selectbox[0].select("misclassified only").run()
    assert "**misclassified**" in _text(page) and not page.exception
    model, variables = tc.load_checkpoint(checkpoint)
    preds = np.asarray(model.apply(variables, data.test_images / np.float32(255))).argmax(-1)
    wrong = np.flatnonzero(preds != data.test_labels)
    assert f"{len(wrong):,} of {len(preds):,} test images are misclassified" in "\n".join(
        c.value for c in page.caption)


def test_explainers_and_target_class_are_chosen_in_the_sidebar(page, checkpoint, data):  # noqa: F811
    page.sidebar.multiselect[0].set_value(["grad_x_input", "occlusion"]).run()
    probs = _probabilities(checkpoint, data.test_images[0])
    target = "airplane" if probs.argmax() != 0 else "ship"
    page.sidebar.selectbox(key="target").select(target).run()
    assert not page.exception
    assert [h.value for h in page.subheader] == [
        f"Gradient × Input — {target} (not the predicted class)",
        f"Occlusion — {target} (not the predicted class)"]
    p = probs[CLASS_NAMES.index(target)]
    assert _text(page).count(f"p({target}) = {p:.1%}") == 2

    page.sidebar.multiselect[0].set_value([]).run()
    assert "Choose one or more explainers" in page.info[0].value


def test_the_attack_panel_shows_the_adversarial_image_and_its_maps(page, checkpoint, data):  # noqa: F811
    import xai_attacks

    page.sidebar.multiselect[0].set_value(["saliency"]).run()
    page.sidebar.checkbox(key="attack").check().run()
    page.sidebar.slider(key="steps").set_value(3).run()
    assert not page.exception and not page.error
    assert [h.value for h in page.main.header] == ["Under attack: PGD-3, ε = 8/255"]
    model, variables = tc.load_checkpoint(checkpoint)
    image = data.test_images[0] / np.float32(255)
    label = int(data.test_labels[0])
    found = xai_attacks.pgd(model, variables, image[None], np.array([label]), None,
                            eps=8 / 255, step_size=2.5 * 8 / 255 / 3, steps=3,
                            random_init=False)
    probs = np.asarray(jax.nn.softmax(model.apply(variables, found)))[0]
    moved = int(probs.argmax())
    assert f"Adversarial prediction: **{CLASS_NAMES[moved]}** ({probs[moved]:.1%})" in _text(page)
    pred = int(_probabilities(checkpoint, data.test_images[0]).argmax())
    assert page.subheader[-1].value == f"Saliency, clean and adversarial — {CLASS_NAMES[pred]}"
    assert "top-100 pixels kept" in _text(page)
    assert len(page.get("image")) == 1 + 1 + 3 + 2  # image, figure, attack row, two maps


def test_lrp_offers_its_composites(page, checkpoint, data):  # noqa: F811
    page.sidebar.multiselect[0].set_value(["lrp"]).run()
    assert "epsilon_plus_flat" in page.sidebar.selectbox(key="lrp.composite").options
    evidence = [line for line in _text(page).splitlines() if "on this image" in line]
    page.sidebar.selectbox(key="lrp.composite").select("epsilon_plus_flat").run()
    assert not page.exception and not page.error
    probs = _probabilities(checkpoint, data.test_images[0])
    pred = int(probs.argmax())
    assert page.subheader[0].value == f"LRP (epsilon_plus_flat) — {CLASS_NAMES[pred]}"
    assert f"p({CLASS_NAMES[pred]}) = {probs[pred]:.1%}" in _text(page)
    # The map's own evidence changed: the composite reached the explainer.
    assert [line for line in _text(page).splitlines() if "on this image" in line] != evidence


def test_a_bad_checkpoint_or_data_folder_is_a_message_not_a_crash(page, checkpoint, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    page.sidebar.text_input[0].input(str(tmp_path / "missing.pkl")).run()
    assert not page.exception
    assert "Could not load the checkpoint" in page.error[0].value
    assert "missing.pkl' does not exist" in page.error[0].value

    def no_data(data_dir):
        raise cifar10_data.DataError(f"data_dir {data_dir!r} holds no CIFAR-10 data")

    monkeypatch.setattr(cifar10_data, "load_cifar10", no_data)
    page.sidebar.text_input[0].input(str(checkpoint)).run()
    page.sidebar.text_input[1].input("/nowhere").run()
    assert not page.exception
    assert "Could not load CIFAR-10 from /nowhere" in page.error[0].value
    assert "upload an image instead" in page.error[0].value


def _png(mode, size, **save):
    buffer = io.BytesIO()
    colour = {"1": 1, "L": 128, "I;16": 40_000, "LA": (128, 0), "RGBA": (255, 0, 0, 0),
              "P": 3, "CMYK": (0, 255, 0, 0)}.get(mode, (10, 200, 30))
    Image.new(mode, size, colour).save(buffer, format=save.pop("format", "PNG"), **save)
    return buffer.getvalue()


def _animated_gif():
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def test_uploads_are_read_converted_and_described():
    image, notes = app.read_upload(_png("RGB", (64, 48)), "photo.png")
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert "photo.png: PNG, 64×48, mode RGB." in notes
    assert "It was center-cropped to 48×48." in notes
    assert "It was resized to 32×32, the size the model reads." in notes
    np.testing.assert_array_equal(image, np.broadcast_to([10, 200, 30], (32, 32, 3)))

    image, notes = app.read_upload(_png("L", (32, 32)))
    assert "It was converted from grayscale to RGB." in notes and len(notes) == 2
    assert (image == 128).all()
    image, notes = app.read_upload(_png("RGBA", (32, 32)))  # red, fully transparent
    assert "Its transparency was flattened onto white." in notes and (image == 255).all()
    image, notes = app.read_upload(_png("I;16", (32, 32)))
    assert "Its I;16 pixels were rescaled to 8 bits." in notes
    assert (image == int(40_000 / 65535 * 255)).all()
    image, notes = app.read_upload(_animated_gif(), "anim.gif")
    assert "It is animated (2 frames); the first frame is explained." in notes
    np.testing.assert_array_equal(image[0, 0], [255, 0, 0])


@pytest.mark.parametrize("payload, fragment", [
    (b"", "x is empty (0 bytes); choose an image file."),
    (b"GIF89a not really", "x is not an image that Pillow can read (17 bytes)"),
    (b"%PDF-1.4\n" + bytes(100), "x is not an image that Pillow can read"),
    ("huge", "x is 8000×6000 (48 megapixels); the limit is 40 megapixels."),
    ("truncated", "x could not be decoded"),
])
def test_bad_uploads_are_refused_with_a_message(payload, fragment):
    if payload == "huge":
        payload = _png("1", (8000, 6000))
    elif payload == "truncated":
        payload = _png("RGB", (64, 64), format="JPEG")[:300]
    with pytest.raises(app.UploadError) as info:
        app.read_upload(payload, "x")
    assert fragment in str(info.value)


def test_every_kind_of_upload_keeps_the_page_alive(page):
    page.radio[0].set_value("Upload").run()
    assert "Choose a file to explain." in page.info[0].value
    for payload, shown in [(b"", "error"), (b"not an image", "error"),
                           (_png("1", (8000, 6000)), "error"), (_animated_gif(), "info"),
                           (_png("L", (50, 50)), "info"), (_png("RGBA", (50, 50)), "info")]:
        page.file_uploader[0].set_value(("upload.png", payload, "image/png")).run()
        assert not page.exception
        if shown == "error":
            assert len(page.error) == 1 and not page.subheader
        else:
            assert not page.error and "upload.png" in page.info[0].value
            assert "### Prediction:" in _text(page) and "your upload" in str(
                page.get("image")[0].proto)
            assert len(page.subheader) == 2


def test_sanity_status_comes_from_the_evaluation_of_the_same_checkpoint(tmp_path, monkeypatch):
    # the shipped cards only: a `make evaluate` in this checkout would come first
    monkeypatch.setattr(app, "EVALUATIONS", app.EVALUATIONS[1:])
    card = app.sanity_status(checkpoints.PRETRAINED, "guided_backprop")
    assert card["num_images"] == 1000 and card["verdicts"]["randomization"] == "fails"
    lines = app.describe_sanity(card)
    assert lines[0].startswith("Randomisation test: **fails** (mean |ρ| 0.79")
    assert "insertion AUC" in lines[1]
    assert app.sanity_status(tmp_path / "other.pkl", "gradcam") is None
    assert "not evaluated" in app.describe_sanity(None)[0]


def test_without_the_variable_from_another_folder_the_shipped_cnn_is_explained(
        data, monkeypatch, tmp_path):  # noqa: F811 (data)
    """`python -m streamlit run /path/to/app.py` from an empty folder, XAI_CHECKPOINT
    unset: the shipped CNN first, the other shipped checkpoints after it."""
    import checkpoints

    monkeypatch.setattr(cifar10_data, "load_cifar10", lambda data_dir: data)
    monkeypatch.delenv("XAI_CHECKPOINT", raising=False)
    monkeypatch.chdir(tmp_path)
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception and not at.error
    box = at.sidebar.selectbox(key="shipped")
    shipped = checkpoints.pretrained_checkpoints()
    assert box.value == str(checkpoints.PRETRAINED)
    assert box.options == [f"{name} ({checkpoints.shown(path)})"
                           for name, path in shipped.items()]
    assert [c.value for c in at.caption if c.value.startswith("Explaining")] == [
        f"Explaining {checkpoints.describe_checkpoint(checkpoints.PRETRAINED)}."]
    assert "### Prediction:" in _text(at)


def test_your_checkpoint_joins_the_list_where_it_exists(monkeypatch, tmp_path):
    import checkpoints

    monkeypatch.chdir(tmp_path)
    shipped = {str(checkpoints.PRETRAINED): "cnn"}
    assert app.checkpoint_choices(None, shipped) == [str(checkpoints.PRETRAINED)]
    (tmp_path / "cifar10_model.pkl").write_bytes(b"")
    assert app.checkpoint_choices(None, shipped) == ["cifar10_model.pkl",
                                                     str(checkpoints.PRETRAINED)]
    assert app.checkpoint_choices("other.pkl", shipped) == [
        "other.pkl", "cifar10_model.pkl", str(checkpoints.PRETRAINED)]


@pytest.mark.slow
def test_the_explorers_explainers_give_the_maps_of_explain(checkpoint):
    """Every method the explorer offers for the checkpoint (LRP with each composite), as
    the page computes it, against `xv.explain` called as a user calls it, with the same
    key: the page builds each method's explainer with the method's own options. (Traced
    against constant variables, for every method and option set: tests/test_traced.py.)"""
    import xai_lrp
    import xai_visualizations as xv

    mtime = os.path.getmtime(checkpoint)  # the page keys its caches by it
    model, variables = app.load_model(str(checkpoint), mtime)
    # smooth, so that LIME's and KernelSHAP's segments are several (SLIC leaves noise whole)
    image = jax.image.resize(jax.random.uniform(jax.random.key(3), (8, 8, 3)), (32, 32, 3),
                             "linear")
    cases = [(method, ()) for method in app.supported_methods(str(checkpoint), mtime)
             if method != "lrp"]
    cases += [("lrp", (("composite", name),)) for name in xai_lrp.COMPOSITES]
    for method, options in cases:
        want = xv.explain(method, model, variables, image[None], np.array([4]),
                          jax.random.key(0) if xv.METHODS[method].sampling else None,
                          **dict(options)).maps[0]
        explainer = app.explainer(str(checkpoint), mtime, method, options)
        raw, _, _ = explainer.explain(variables["params"], variables["batch_stats"], image,
                                      4, normalize=False)
        scale = float(np.max(np.abs(want)))
        assert scale > 0, (method, options)
        np.testing.assert_allclose(raw, want, rtol=0, atol=1e-6 * scale,
                                   err_msg=f"{method} {options}")


def test_a_compressed_variant_is_shown_beside_the_original_with_its_survival(
        tiny_model, tiny_variables, data, monkeypatch, tmp_path):  # noqa: F811 (data)
    """A pruned variant written where compress_xai.py writes them (`variants/` beside the
    checkpoint) is offered; chosen, each method's map of it sits beside the original's
    with this image's top-100 intersection and Spearman ρ, computed here independently
    (scipy's rank correlation of |map|, numpy's top-100 sets)."""
    from scipy.stats import spearmanr

    import xai_compression as xc
    import xai_visualizations as xv
    from xai_io import file_sha256

    original = tmp_path / "tiny.pkl"
    tc.save_checkpoint(original, tiny_model, tiny_variables)
    (tmp_path / "variants").mkdir()
    variant = tmp_path / "variants" / "sparse50.pkl"
    pruned = xc.prune(tiny_variables, xc.magnitude_masks(tiny_variables["params"], 0.5))
    tc.save_checkpoint(variant, tiny_model, pruned,
                       compression={"pruning": "magnitude", "sparsity": 0.5, "original": {
                           "sha256": file_sha256(original)}})
    other = tmp_path / "variants" / "of_another.pkl"  # a variant of another checkpoint
    tc.save_checkpoint(other, tiny_model, pruned, compression={
        "pruning": "magnitude", "sparsity": 0.5, "original": {"sha256": "0" * 64}})
    monkeypatch.setattr(cifar10_data, "load_cifar10", lambda data_dir: data)
    monkeypatch.setenv("XAI_CHECKPOINT", str(original))
    at = AppTest.from_file(APP, default_timeout=120).run()
    box = at.sidebar.selectbox(key="variant")
    assert box.options == ["none", f"50% sparse ({checkpoints.shown(variant.resolve())})"]
    at.sidebar.multiselect[0].set_value(["saliency"]).run()
    box.select(str(variant.resolve())).run()
    assert not at.exception and not at.error
    image = data.test_images[0][None] / np.float32(255)
    pred = int(_probabilities(original, data.test_images[0]).argmax())
    maps = [np.asarray(xv.explain("saliency", tiny_model, v, image, np.array([pred])).maps[0])
            for v in (tiny_variables, pruned)]
    assert not np.allclose(maps[0], maps[1])  # pruning half the weights moved the map
    top = [set(np.argsort(np.abs(m).ravel())[-100:]) for m in maps]
    rho = spearmanr(np.abs(maps[0]).ravel(), np.abs(maps[1]).ravel())[0]
    text = _text(at)
    assert f"top-100 pixels kept: **{len(top[0] & top[1]) / 100:.0%}**" in text
    assert f"Spearman ρ of |map|: **{rho:.3f}**" in text
    assert len(at.get("image")) == 1 + 1 + 2  # the image, the figure, original | variant
