"""Interactive explorer: every heatmap next to the evidence for trusting it.

    make app                                    # http://127.0.0.1:8501
    make app APP_CHECKPOINT=cifar10_model.pkl   # your own checkpoint
    streamlit run app.py                        # from any folder, with the app's path
    XAI_CHECKPOINT=my.pkl streamlit run app.py  # another checkpoint first in the list

Pick a test image (by record, by class, or only the misclassified ones) or upload your
own, choose explainers and a target class, and each map is shown as an overlay and as a
raw heatmap with its colour bar, next to
  - its evidence on this image, against a random map's: ROAD's MoRF and LeRF AUC
    (removed pixels imputed from their neighbours) and the deletion AUC to a blurred
    copy. Deleting to black is not shown here: black holes push the image out of the
    data's distribution, and on the shipped CNN it rated most maps below random;
  - the method's sanity checks from the evaluation of this checkpoint
    (`evaluate_xai.py`: cascading randomisation, and faithfulness over 1,000 images);
  - the time it took.
The sidebar's attack panel adds a PGD adversarial image within ε, its prediction, and
each map of it beside the clean one, with how far the map moved (`xai_attacks.py`,
`adversarial.py`).

The checkpoint is `$XAI_CHECKPOINT`, else your `cifar10_model.pkl` where it exists, else
the shipped CNN; the sidebar lists the shipped checkpoints of every architecture too.
The data is found as everywhere in the project (`cifar10_data.load_cifar10`:
`$CIFAR10_DIR`, a tensorflow-datasets copy, the download cache); both can be changed in
the sidebar. The model, the data
and the jitted functions are cached across interactions with `st.cache_resource`.
"""

import functools
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from cifar10_data import CLASS_NAMES

ROOT = Path(__file__).resolve().parent
EVIDENCE_STEP = 32               # pixels per point of the per-image deletion curve
MAX_UPLOAD_PIXELS = 40_000_000   # larger uploads are refused before they are decoded
DISPLAY_SCALE = 6                # 32 px images are shown 192 px wide, pixels kept sharp
DEFAULT_METHODS = ("gradcam", "saliency")
SURVIVAL_TOP_K = 100             # pixels in the variant panel's top-k intersection
POOLS = ("every test image", "one class", "misclassified only")
# Where evaluation reports are looked for, in order: `make evaluate`'s (in the working
# folder, then in the clone), then the shipped ones (docs/evaluation/ for the CNN,
# docs/evaluation/<architecture>/ for the others; a clone only, not the wheel).
EVALUATIONS = tuple(dict.fromkeys((Path("xai_results", "evaluation").resolve(),
                                   ROOT / "xai_results" / "evaluation",
                                   ROOT / "docs" / "evaluation")))


def evaluation_reports():
    """Every evaluation.json under `EVALUATIONS`, each folder's own first."""
    return [path for folder in EVALUATIONS
            for path in [folder / "evaluation.json"] + sorted(folder.glob("*/evaluation.json"))]


# ----------------------------------------------------------------------------------------
# Uploads: any size or format Pillow reads becomes a 32x32 RGB image, or a clear refusal.


class UploadError(ValueError):
    """An upload that cannot be explained; the message says why, for the page."""


def read_upload(data: bytes, name: str = "the upload"):
    """Decodes an uploaded file into a (32, 32, 3) uint8 image.

    Returns (image, notes): `notes` says in words what was done to the file (frames
    dropped, mode converted, transparency flattened, crop and resize). Raises
    UploadError for an empty file, a file Pillow cannot read, an image over
    MAX_UPLOAD_PIXELS, or one that fails to decode.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UploadError(f"{name} is empty (0 bytes); choose an image file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > MAX_UPLOAD_PIXELS:
                raise UploadError(
                    f"{name} is {width}×{height} ({width * height / 1e6:.0f} megapixels); "
                    f"the limit is {MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels.")
            notes = [f"{name}: {img.format or 'image'}, {width}×{height}, mode {img.mode}."]
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                notes.append(f"It is animated ({frames} frames); the first frame is explained.")
                img.seek(0)
            img.load()
            img = _to_rgb(img, notes)
    except UnidentifiedImageError:
        raise UploadError(f"{name} is not an image that Pillow can read "
                          f"({len(data):,} bytes); try PNG, JPEG, GIF, BMP or WebP.") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(f"{name} is too large to decode safely; the limit is "
                          f"{MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, UploadError):
            raise
        raise UploadError(f"{name} could not be decoded ({e}); the file may be truncated "
                          "or corrupted.") from None
    side = min(img.size)
    if img.size != (side, side):
        left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
        img = img.crop((left, top, left + side, top + side))
        notes.append(f"It was center-cropped to {side}×{side}.")
    if img.size != (32, 32):
        img = img.resize((32, 32), Image.Resampling.LANCZOS)
        notes.append("It was resized to 32×32, the size the model reads.")
    return np.asarray(img, np.uint8), notes


def _to_rgb(img, notes):
    from PIL import Image

    mode = img.mode
    if mode.startswith("I") or mode == "F":  # 16- or 32-bit grayscale: rescale to 8 bits
        values = np.asarray(img, np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(values.max(), 1e-12)
        img = Image.fromarray(np.clip(values / top * 255, 0, 255).astype(np.uint8), "L")
        notes.append(f"Its {mode} pixels were rescaled to 8 bits.")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append("Its transparency was flattened onto white.")
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode != "RGB":
        kind = "grayscale" if img.mode in ("1", "L") else img.mode
        notes.append(f"It was converted from {kind} to RGB.")
    return img.convert("RGB")


# ----------------------------------------------------------------------------------------
# Evidence that does not depend on Streamlit.


def sanity_status(checkpoint, method, options=()):
    """The method's card from an evaluation of this checkpoint, or None.

    Looks at `make evaluate`'s output, then the shipped evaluation of the pretrained
    checkpoint; a report counts only when it evaluated the same file with the same
    options (`options` as (name, value) pairs, e.g. LRP's composite).
    """
    target = Path(checkpoint).resolve()
    for path in evaluation_reports():
        if not path.is_file():
            continue
        report = _read_report(path, path.stat().st_mtime)
        evaluated = Path(report.get("config", {}).get("checkpoint") or "")
        candidates = {evaluated.resolve(), (ROOT / evaluated).resolve()}
        card = report.get("methods", {}).get(method)
        parameters = (card or {}).get("parameters", {})
        if any(parameters.get(name, value) != value for name, value in options):
            continue  # the card evaluated other options (e.g. another LRP composite)
        if card and target in candidates:
            return {"report": path, "num_images": report["num_images"],
                    "random": report["random_reference"], **card}
    return None


@functools.lru_cache(maxsize=4)
def _read_report(path, mtime):
    """An evaluation report, read once per version of the file (not once per method and
    page run)."""
    return json.loads(path.read_text())


def describe_sanity(card):
    """One line of Markdown per check, from a card of `sanity_status`."""
    if card is None:
        return ["Sanity checks: **not evaluated** for this checkpoint (run `make evaluate`)."]
    v, rnd = card["verdicts"], card["random"]
    rho = v["randomization_mean_abs_spearman"]
    lines = [
        f"Randomisation test: **{v['randomization']}** (mean |ρ| {rho:.2f} to the trained "
        f"model's maps over {len(card['randomization_levels'])} levels; < 0.5 passes)"]
    stats = card.get("statistics")
    if stats is None:  # a card from before the statistics
        return lines + [
            f"Over {card['num_images']:,} images: deletion AUC {card['deletion_auc']:.3f} "
            f"({'below' if v['deletion_below_random'] else 'not below'} random "
            f"{rnd['deletion_auc']:.3f}), insertion AUC {card['insertion_auc']:.3f} "
            f"({'above' if v['insertion_above_random'] else 'not above'} random "
            f"{rnd['insertion_auc']:.3f})"]
    from xai_metrics import EVIDENCE

    words = {"better": "beats", "worse": "loses to", "tie": "ties with"}
    for key, (name, _) in EVIDENCE.items():
        key = key if key in stats else key + "_auc"
        if key in stats:
            st, test = stats[key], stats[key]["vs_random"]
            lines.append(f"Over {card['num_images']:,} images: {name} {st['mean']:.3f} "
                         f"[95 % CI {st['low']:.3f}, {st['high']:.3f}], "
                         f"**{words[test['verdict']]}** the random map's {rnd[key]:.3f} "
                         f"(paired Wilcoxon p = {test['p_value']:.2g})")
    return lines


def top_k(probs, k=3):
    order = np.argsort(probs)[::-1][:k]
    return [(CLASS_NAMES[i], float(probs[i])) for i in order]


def heatmap_figure(image, heatmap, raw, signed, title):
    """Overlay (normalised map over the image) and raw heatmap, each with a colour bar.
    Signed maps are drawn on a diverging scale centred on 0."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from xai_visualizations import overlay

    fig = Figure(figsize=(6.4, 2.8), dpi=100)
    left, right = fig.subplots(1, 2)
    left.imshow(overlay(image, heatmap), interpolation="nearest")
    fig.colorbar(ScalarMappable(Normalize(0, 1), "jet"), ax=left, fraction=0.046,
                 label="normalised")
    left.set_title(f"{title}: overlay", fontsize=9)
    limit = float(np.abs(raw).max()) or 1.0
    im = right.imshow(raw, cmap="bwr" if signed else "jet", interpolation="nearest",
                      vmin=-limit if signed else None, vmax=limit if signed else None)
    fig.colorbar(im, ax=right, fraction=0.046, label="raw value")
    right.set_title(f"{title}: raw heatmap", fontsize=9)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------
# The page.


def main():
    import streamlit as st

    from xai_cache import enable_compilation_cache

    enable_compilation_cache()  # the next server start loads the explainers' programs
    st.set_page_config(page_title="cifar10-xai explorer", layout="wide")
    st.title("cifar10-xai explorer")
    st.caption("Each heatmap next to the evidence for trusting it: on this image, ROAD "
               "(pixels removed and imputed from their neighbours, Rong et al. 2022) and "
               "deletion to a blurred copy, against a random map; the method's sanity "
               "checks; and its time.")

    from xai_visualizations import METHODS

    with st.sidebar:
        st.header("Model and data")
        shipped = _shipped()
        choices = checkpoint_choices(os.environ.get("XAI_CHECKPOINT"), shipped)
        chosen = st.selectbox("Shipped checkpoints", choices, key="shipped",
                              format_func=lambda path: shipped.get(path, path))
        checkpoint = st.text_input("Checkpoint", value=chosen)
        data_dir = st.text_input("CIFAR-10 folder", value=os.environ.get("CIFAR10_DIR", ""))
    try:
        load_model(checkpoint, _mtime(checkpoint))
    except (OSError, ValueError) as e:
        st.error(f"Could not load the checkpoint: {e}")
        st.stop()
    fits = supported_methods(checkpoint, _mtime(checkpoint))
    variants = compressed_variants(checkpoint, _mtime(checkpoint))
    with st.sidebar:
        variant = st.selectbox(
            "Compressed variant", (None, *variants), key="variant",
            format_func=lambda path: "none" if path is None else variants[path],
            help="a quantised or pruned checkpoint of this architecture (compress_xai.py "
                 "writes them): its maps beside the original's, with how much of each "
                 "map survived on this image")
        st.header("Explain")
        methods = st.multiselect("Explainers", fits,
                                 default=[m for m in DEFAULT_METHODS if m in fits],
                                 format_func=lambda method: METHODS[method].label,
                                 help="the methods that can explain this model")
        target_name = st.selectbox("Target class", ("predicted",) + CLASS_NAMES, key="target")
        options = {}
        for method in methods:  # the options the registry marks `shown`
            spec = METHODS[method]
            options[method] = {
                name: st.selectbox(f"{spec.label} {name}", option.choices,
                                   index=option.choices.index(option.default),
                                   key=f"{method}.{name}", help=option.help)
                for name, option in spec.options.items() if option.shown and option.choices}
        st.header("Attack")
        attack = st.checkbox("Attack the image (PGD, L∞)", key="attack",
                             help="an adversarial image within ε of this one, its "
                                  "prediction and its maps beside the clean ones")
        eps = st.slider("ε (/255)", 1, 16, 8, key="eps", disabled=not attack)
        steps = st.slider("PGD steps", 1, 40, 10, key="steps", disabled=not attack)
    st.caption(f"Explaining {describe_model(checkpoint, _mtime(checkpoint))}.")

    source = st.radio("Image", ("Test set", "Upload"), horizontal=True)
    if source == "Test set":
        image_u8, label, record = choose_test_image(st, checkpoint, data_dir)
    else:
        image_u8, label, record = choose_upload(st)
    image = image_u8.astype(np.float32) / 255

    probs = predict(checkpoint, _mtime(checkpoint), image[None])[0]
    pred = int(np.argmax(probs))
    target = pred if target_name == "predicted" else CLASS_NAMES.index(target_name)
    show_prediction(st, image_u8, probs, pred, label, record)
    if not methods:
        st.info("Choose one or more explainers in the sidebar.")
        return
    for method in methods:
        raw = show_method(st, checkpoint, method, image, target, pred, options.get(method, {}))
        if variant:
            show_variant(st, variant, method, image, target, raw, options.get(method, {}))
    if attack:
        show_attack(st, checkpoint, methods, image, pred if label is None else label,
                    eps, steps, options)


def checkpoint_choices(chosen, shipped):
    """The sidebar's checkpoints, the default first: `chosen` ($XAI_CHECKPOINT) when set,
    else `checkpoints.default_checkpoint()` (your cifar10_model.pkl where it exists, else
    the shipped CNN); then your cifar10_model.pkl and every shipped checkpoint."""
    from checkpoints import OWN_CHECKPOINT, default_checkpoint
    own = [str(OWN_CHECKPOINT)] if OWN_CHECKPOINT.is_file() else []
    first = chosen or str(default_checkpoint())
    return list(dict.fromkeys([first] + own + list(shipped)))


def _shipped():
    """{path: 'name (path)'} of the shipped checkpoints of every architecture."""
    from checkpoints import pretrained_checkpoints, shown
    return {str(path): f"{name} ({shown(path)})"
            for name, path in pretrained_checkpoints().items()}


def _mtime(path):
    """Part of the cache key, so a checkpoint rewritten on disk is loaded again."""
    try:
        return os.path.getmtime(path)
    except OSError:
        return None


def _cache(fn):
    """`st.cache_resource`, applied at the first call, so that importing this module (the
    upload reader, the tests) needs no Streamlit."""
    cached = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal cached
        if cached is None:
            import streamlit as st
            cached = st.cache_resource(show_spinner=False, max_entries=8)(fn)
        return cached(*args, **kwargs)

    return call


@_cache
def load_model(checkpoint, mtime):
    from checkpoints import load_checkpoint
    return load_checkpoint(checkpoint)


@_cache
def describe_model(checkpoint, mtime):
    """Which checkpoint, and its recorded test accuracy, in one line."""
    from checkpoints import describe_checkpoint
    return describe_checkpoint(checkpoint)


def predict(checkpoint, mtime, images):
    """Softmax probabilities of float images (`xai_models.predict`)."""
    from xai_models import predict as predict_batches
    model, variables = load_model(checkpoint, mtime)
    return predict_batches(model, variables, images, batch_size=len(images))


@_cache
def load_test_set(data_dir):
    from cifar10_data import load_cifar10
    data = load_cifar10(data_dir or None)
    return data.test_images, data.test_labels


@_cache
def predict_test_set(checkpoint, mtime, data_dir, _bar=None):
    """Predicted classes of every test image (`xai_models.predict`, 500 at a time)."""
    from xai_models import predict as predict_batches

    images, _ = load_test_set(data_dir)
    model, variables = load_model(checkpoint, mtime)

    done = [0]

    def progress(size):
        done[0] += size
        if _bar is not None:
            _bar.progress(done[0] / len(images),
                          text=f"predicting the test set: {done[0]:,} / {len(images):,}")

    return predict_batches(model, variables, images, batch_size=500,
                           on_batch=progress).argmax(-1)


@_cache
def supported_methods(checkpoint, mtime):
    """The methods that can explain this checkpoint's model, in the registry's order."""
    from xai_visualizations import METHODS, unsupported
    model, _ = load_model(checkpoint, mtime)
    return [method for method in METHODS if not unsupported(method, model)]


@_cache
def explainer(checkpoint, mtime, method, options=()):
    """The method's `Explainer`; `options` as sorted (name, value) pairs."""
    from xai_visualizations import Explainer
    model, _ = load_model(checkpoint, mtime)
    return Explainer(model, method, **dict(options))


@_cache
def _compiled_explainers(checkpoint, mtime):
    """The methods whose explainer has run for this checkpoint (so has compiled)."""
    return set()


@_cache
def evidence_fn(checkpoint, mtime):
    """`xai_metrics.evidence` for (map, random map) on one image, one compile: a dict of
    ROAD's MoRF and LeRF AUC and the deletion AUC to blur, each (2,)."""
    import jax
    import jax.numpy as jnp

    from xai_metrics import evidence
    model, variables = load_model(checkpoint, mtime)

    def fn(image, maps, target):
        images, targets = jnp.repeat(image[None], 2, 0), jnp.full((2,), target)
        return evidence(model, variables, images, maps, targets, jax.random.key(0),
                        step=EVIDENCE_STEP)._asdict()

    return jax.jit(fn)


def choose_test_image(st, checkpoint, data_dir):
    try:
        with st.spinner("loading the CIFAR-10 test set"):
            images, labels = load_test_set(data_dir)
    except Exception as e:  # noqa: BLE001 - any data problem is shown, not raised
        st.error(f"Could not load CIFAR-10 from {data_dir or 'the default places'}: {e}. "
                 "Set the CIFAR-10 folder in the sidebar, or upload an image instead.")
        st.stop()
    left, right = st.columns(2)
    pool_kind = left.selectbox("Show", POOLS)
    if pool_kind == "one class":
        name = right.selectbox("Class", CLASS_NAMES)
        pool = np.flatnonzero(labels == CLASS_NAMES.index(name))
    elif pool_kind == "misclassified only":
        bar = st.progress(0.0, text="predicting the test set")
        preds = predict_test_set(checkpoint, _mtime(checkpoint), data_dir, _bar=bar)
        bar.empty()
        pool = np.flatnonzero(preds != labels)
        right.caption(f"{len(pool):,} of {len(labels):,} test images are misclassified "
                      f"({1 - len(pool) / len(labels):.1%} accuracy).")
    else:
        pool = np.arange(len(labels))
    if len(pool) == 0:
        st.warning("No test image matches.")
        st.stop()
    position = st.number_input(f"Image (1 – {len(pool):,} of those shown)", min_value=1,
                               max_value=len(pool), value=1, step=1)
    record = int(pool[int(position) - 1])
    return images[record], int(labels[record]), record


def choose_upload(st):
    upload = st.file_uploader("Upload an image (any size or format Pillow reads)")
    if upload is None:
        st.info("Choose a file to explain.")
        st.stop()
    try:
        image, notes = read_upload(upload.getvalue(), name=upload.name)
    except UploadError as e:
        st.error(str(e))
        st.stop()
    st.info(" ".join(notes))
    return image, None, None


def show_prediction(st, image_u8, probs, pred, label, record):
    left, right = st.columns([1, 3])
    big = np.repeat(np.repeat(image_u8, DISPLAY_SCALE, 0), DISPLAY_SCALE, 1)
    where = f"test record {record}" if record is not None else "your upload"
    left.image(big, caption=where)
    verdict = ""
    if label is not None:
        verdict = (f" — true class **{CLASS_NAMES[label]}**, "
                   + ("correct" if label == pred else "**misclassified**"))
    right.markdown(f"### Prediction: {CLASS_NAMES[pred]} ({probs[pred]:.1%}){verdict}")
    right.markdown("Top 3: " + ", ".join(f"{name} {p:.1%}" for name, p in top_k(probs)))


def show_method(st, checkpoint, method, image, target, pred, options=None):
    from xai_metrics import EVIDENCE
    from xai_visualizations import METHODS, normalize_maps

    mtime = _mtime(checkpoint)
    _, variables = load_model(checkpoint, mtime)
    chosen = tuple(sorted((options or {}).items()))
    explain = explainer(checkpoint, mtime, method, chosen)
    params, stats = variables["params"], variables.get("batch_stats")
    compiled = _compiled_explainers(checkpoint, mtime)  # the page's own bookkeeping
    compiling = (method, chosen) not in compiled
    start = time.perf_counter()
    raw, _, score = explain.explain(params, stats, image, target, normalize=False)
    seconds = time.perf_counter() - start
    compiled.add((method, chosen))
    heatmap = np.asarray(normalize_maps(raw))
    random_map = np.random.default_rng(0).uniform(size=raw.shape).astype(np.float32)
    evidence = {k: np.asarray(v) for k, v in evidence_fn(checkpoint, mtime)(
        image, np.stack([raw, random_map]), target).items()}
    label = METHODS[method].label + "".join(f" ({v})" for _, v in chosen)
    st.subheader(f"{label} — {CLASS_NAMES[target]}"
                 + ("" if target == pred else " (not the predicted class)"))
    left, right = st.columns([2, 1])
    fig = heatmap_figure(image, heatmap, raw, METHODS[method].signed, label)
    left.pyplot(fig, clear_figure=True)
    lines = [
        *(f"{name} on this image: **{evidence[key][0]:.3f}** (random map "
          f"{evidence[key][1]:.3f}; {'lower' if lower else 'higher'} is better)"
          for key, (name, lower) in EVIDENCE.items()),
        *describe_sanity(sanity_status(checkpoint, method, chosen)),
        f"Time: {seconds * 1000:,.0f} ms" + (", including compilation (its first call)"
                                              if compiling else ""),
        f"p({CLASS_NAMES[target]}) = {score:.1%}",
    ]
    right.markdown("\n".join(f"- {line}" for line in lines))
    return raw


def show_variant(st, variant, method, image, target, original, options=None):
    """The compressed variant's map for the same target beside the original's, with
    this image's survival measures (`xai_metrics.map_survival`)."""
    import jax.numpy as jnp

    from xai_metrics import map_survival
    from xai_visualizations import METHODS, normalize_maps, overlay, unsupported

    mtime = _mtime(variant)
    model, variables = load_model(variant, mtime)
    why = unsupported(method, model)
    if why:
        st.caption(f"{METHODS[method].label} cannot explain the variant: {why}")
        return
    chosen = tuple(sorted((options or {}).items()))
    raw, _, score = explainer(variant, mtime, method, chosen).explain(
        variables["params"], variables.get("batch_stats"), image, target, normalize=False)
    survival = map_survival(jnp.asarray(raw)[None], jnp.asarray(original)[None],
                            k=SURVIVAL_TOP_K)
    probs = predict(variant, mtime, image[None])[0]
    left, right, notes = st.columns([1, 1, 1])
    for column, shown, caption in ((left, original, "original"), (right, raw, "variant")):
        picture = overlay(image, np.asarray(normalize_maps(shown)))
        column.image(np.repeat(np.repeat(np.asarray(picture), 4, 0), 4, 1),
                     caption=caption, clamp=True)
    notes.markdown("\n".join([
        f"- Compressed: **{compressed_variants_label(variant)}**",
        f"- top-{SURVIVAL_TOP_K} pixels kept: **{float(survival['top_k'][0]):.0%}**",
        f"- Spearman ρ of |map|: **{float(survival['spearman'][0]):.3f}**",
        f"- the variant predicts **{CLASS_NAMES[int(np.argmax(probs))]}**; "
        f"p({CLASS_NAMES[target]}) = {score:.1%}"]))


def compressed_variants_label(path, record=None):
    """'int8 (pretrained/cifar10_cnn_int8.pkl)' and the like; `record` when already read."""
    from checkpoints import compression_record, shown
    record = record or compression_record(path) or {}
    if "quantization" in record:
        how = record["quantization"]
    elif record.get("pruning") == "filters":
        how = f"filters −{record.get('fraction', 0):.0%}"
    else:
        how = f"{record.get('sparsity', 0):.0%} sparse"
    return f"{how} ({shown(path)})"


@_cache
def compressed_variants(checkpoint, mtime):
    """{path: label} of the compressed variants of this checkpoint: those, shipped or
    beside it or in a `variants/` folder beside it (where compress_xai.py writes them),
    whose record names this file's sha256 as their original."""
    from checkpoints import PRETRAINED_DIR, compression_record
    from xai_io import file_sha256
    try:
        digest = file_sha256(checkpoint)
    except OSError:
        return {}
    here = Path(checkpoint).parent
    found = sorted({path.resolve() for folder in (PRETRAINED_DIR, here, here / "variants")
                    for path in Path(folder).glob("*.pkl")})
    records = {path: compression_record(path) or {} for path in found}  # each file read once
    return {str(path): compressed_variants_label(path, record)
            for path, record in records.items()
            if (record.get("original") or {}).get("sha256") == digest}


@_cache
def attack_fn(checkpoint, mtime, steps):
    """PGD (L∞, no random start: the same image gives the same attack) as
    (image, label, ε) -> adversarial image."""
    import jax
    import jax.numpy as jnp

    from xai_attacks import pgd
    model, variables = load_model(checkpoint, mtime)

    def fn(image, label, eps):
        return pgd(model, variables, image[None], jnp.asarray([label]), None, eps=eps,
                   step_size=2.5 * eps / steps, steps=steps, random_init=False)[0]

    return jax.jit(fn)


def show_attack(st, checkpoint, methods, image, label, eps, steps, options=None):
    """The adversarial image, its prediction, and each method's maps of the clean and the
    adversarial image for the clean prediction, with how far the map moved."""
    import jax.numpy as jnp

    from adversarial import map_changes
    from xai_visualizations import METHODS, normalize_maps, overlay

    mtime = _mtime(checkpoint)
    adversarial = np.asarray(attack_fn(checkpoint, mtime, steps)(image, label, eps / 255))
    probs = predict(checkpoint, mtime, np.stack([image, adversarial]))
    pred, moved = int(np.argmax(probs[0])), int(np.argmax(probs[1]))
    st.header(f"Under attack: PGD-{steps}, ε = {eps}/255")
    columns = st.columns(3)
    delta = np.clip(10 * np.abs(adversarial - image), 0, 1)
    for column, picture, caption in zip(columns, (image, adversarial, delta),
                                        ("clean", "adversarial", "|δ| × 10")):
        big = np.repeat(np.repeat(picture, DISPLAY_SCALE, 0), DISPLAY_SCALE, 1)
        column.image(big, caption=caption, clamp=True)
    st.markdown(f"Adversarial prediction: **{CLASS_NAMES[moved]}** ({probs[1][moved]:.1%}); "
                f"clean: {CLASS_NAMES[pred]} ({probs[0][pred]:.1%})"
                + (" — **the attack changed the class**" if moved != pred else ""))
    _, variables = load_model(checkpoint, mtime)
    params, stats = variables["params"], variables.get("batch_stats")
    for method in methods:
        explain = explainer(checkpoint, mtime, method,
                            tuple(sorted((options or {}).get(method, {}).items())))
        raws = [explain.explain(params, stats, x, pred, normalize=False)[0]
                for x in (image, adversarial)]
        changes = map_changes(jnp.asarray(raws[0])[None], jnp.asarray(raws[1])[None], 100)
        label_text = METHODS[method].label
        st.subheader(f"{label_text}, clean and adversarial — {CLASS_NAMES[pred]}")
        left, right, notes = st.columns([1, 1, 1])
        for column, x, raw, caption in zip((left, right), (image, adversarial), raws,
                                           ("clean", "adversarial")):
            shown = overlay(x, np.asarray(normalize_maps(raw)))
            column.image(np.repeat(np.repeat(np.asarray(shown), 4, 0), 4, 1),
                         caption=caption, clamp=True)
        notes.markdown(f"- top-100 pixels kept: **{float(changes['top_k'][0]):.0%}**\n"
                       f"- Spearman ρ of |map|: **{float(changes['spearman'][0]):.3f}**\n"
                       f"- centre of mass moved: **{float(changes['center_shift'][0]):.1f} px**")


# .streamlit/config.toml's settings, for `cifar10-xai-app`, which runs from any folder.
SERVER_FLAGS = ("--server.address=127.0.0.1", "--server.headless=true",
                "--server.maxUploadSize=25", "--browser.gatherUsageStats=false")


def serve(argv=None):
    """`cifar10-xai-app [streamlit options]`: serves this page as `streamlit run app.py`
    does from the repository root (http://127.0.0.1:8501)."""
    try:
        from streamlit.web import cli
    except ImportError:
        sys.exit("cifar10-xai-app needs Streamlit: pip install 'cifar10-xai[app]'")
    sys.argv = ["streamlit", "run", str(Path(__file__).resolve()), *SERVER_FLAGS,
                *(sys.argv[1:] if argv is None else argv)]
    sys.exit(cli.main())


if __name__ == "__main__":
    main()
