"""Both models on tiny tensors: every backbone, raw uint8 input of any size, weights, safe
loading, test-time views."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import CHOICES, PipelineConfig
from pipeline.lib import models
from pipeline.lib.backbones import model_label
from pipeline.lib.contract import SAVED_MODEL_DIR
from pipeline.lib.params import TrainParams
from pipeline.lib.training import export_model
from tests.support.train_helpers import small_train


def _odd_images(n: int = 2, h: int = 71, w: int = 53) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def built() -> Callable[[TrainParams], keras.Model]:
    """``build_model(config, 3)``, built once per config for this module's tests.

    Building a backbone is most of a test's time here (0.5-3 s each), and several tests
    build the same one. Only for tests that run, wrap, save or read a model: one that changes
    its layers (trainability, weights) builds its own or restores them (``unfrozen_core``),
    and one that compares two builds calls ``build_model`` for the second.
    """
    cache: dict[TrainParams, keras.Model] = {}

    def build(config: TrainParams) -> keras.Model:
        if config not in cache:
            cache[config] = models.build_model(config, 3)
        return cache[config]

    return build


@pytest.fixture(scope="module")
def core_model(built, mobilenet_weights) -> keras.Model:
    """The default transfer model: MobileNet-0.25 with the shared weights, 64 px."""
    return built(small_train(weights=str(mobilenet_weights)))


@pytest.fixture
def unfrozen_core(core_model) -> Iterator[keras.Model]:
    """``core_model`` for a test that unfreezes backbone layers, frozen again afterwards as
    ``build_model`` returns it, so the tests sharing the model do not depend on the order."""
    backbone = core_model.get_layer(models.BACKBONE)

    def trainability() -> list[tuple[str, bool]]:
        return ([(layer.name, layer.trainable) for layer in core_model.layers + backbone.layers]
                + [(v.path, v.trainable) for v in core_model.weights])

    before = trainability()
    yield core_model
    backbone.trainable = False  # build_backbone's freeze: every layer and variable
    assert trainability() == before


def test_mobilenet_takes_uint8_of_any_size(core_model):
    model = core_model
    for shape in [(2, 71, 53), (1, 300, 17), (3, 64, 64)]:
        out = np.asarray(model(_odd_images(*shape), training=False))
        assert out.shape == (shape[0], 3)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    assert model.get_layer(models.BACKBONE).trainable is False


def test_seed_cnn_matches_notebook_architecture():
    model = models.build_model(small_train(model="seed_cnn", image_size=96), 3)
    out = np.asarray(model(_odd_images(), training=False))
    assert out.shape == (2, 3)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [16, 32, 64, 64, 64]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers) == 5
    assert [d.rate for d in model.layers if isinstance(d, keras.layers.Dropout)] == [0.5] * 3
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [d.units for d in dense] == [512, 3]


@pytest.mark.parametrize(("pooling", "width"), [("avg", 1), ("avg_max", 2)])
def test_pooling_feeds_average_or_average_and_max_features(built, mobilenet_weights, pooling,
                                                           width):
    model = built(small_train(weights=str(mobilenet_weights), pooling=pooling))
    backbone = model.get_layer(models.BACKBONE)
    channels = backbone.output_shape[-1]
    assert model.get_layer(models.POOL).output.shape[-1] == width * channels
    # the pooled vector is [mean over cells, max over cells] of the backbone's feature map
    images = _odd_images()
    pooled = keras.Model(model.inputs, model.get_layer(models.POOL).output)(images)
    backbone_input = keras.Model(model.inputs, model.get_layer("rescale").output)(images)
    feature_map = np.asarray(backbone(backbone_input, training=False))
    expected = [np.mean(feature_map, axis=(1, 2)), np.max(feature_map, axis=(1, 2))][:width]
    np.testing.assert_allclose(np.asarray(pooled), np.concatenate(expected, axis=1),
                               rtol=1e-5, atol=1e-5)


def test_imagenet_weights_file_is_loaded(core_model, mobilenet_weights):
    loaded = core_model
    again = models.build_model(small_train(weights=str(mobilenet_weights)), 3)  # a 2nd build
    random = models.build_model(small_train(weights="none"), 3)
    kernel = loaded.get_layer(models.BACKBONE).get_layer("conv1").get_weights()[0]
    np.testing.assert_array_equal(
        kernel, again.get_layer(models.BACKBONE).get_layer("conv1").get_weights()[0])
    assert not np.allclose(
        kernel, random.get_layer(models.BACKBONE).get_layer("conv1").get_weights()[0])


def test_weights_setting_is_resolved_with_clear_errors(tmp_path):
    assert models.resolve_weights("none") is None
    assert models.resolve_weights("imagenet") == "imagenet"
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        models.resolve_weights(str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match="at least 2 classes"):
        models.build_model(small_train(weights="none"), 1)


def test_another_backbones_weights_file_is_refused_naming_file_backbone_and_fix(
        mobilenet_v2_weights):
    """IRIS_MODEL_WEIGHTS left at the MobileNetV2 file while the config asks for v1."""
    with pytest.raises(ValueError) as caught:
        models.build_model(small_train(weights=str(mobilenet_v2_weights)), 3)
    message = str(caught.value)
    assert str(mobilenet_v2_weights) in message and "backbone 'mobilenet' at alpha 0.25" in message
    assert "IRIS_MODEL_WEIGHTS=PATH" in message and "--set weights=PATH" in message


def test_weights_download_failure_says_how_to_use_a_local_copy(closed_port_uri, tmp_path):
    url = f"{closed_port_uri}/mobilenet-{uuid.uuid4().hex}.h5"  # nothing listens: refused
    with pytest.raises(models.WeightsDownloadError) as caught:
        models.build_model(small_train(weights=url), 3)
    message = str(caught.value)
    assert url in message
    assert "IRIS_MODEL_WEIGHTS=PATH" in message and "--set weights=PATH" in message
    with pytest.raises(FileNotFoundError, match="weights file not found"):  # not a download
        models.build_model(small_train(weights=str(tmp_path / "missing.h5")), 3)


def test_fine_tune_unfreezes_top_convolutions_only(unfrozen_core):
    model = unfrozen_core
    count = models.set_fine_tune(model, 4)
    backbone = model.get_layer(models.BACKBONE)
    trainable = [layer.name for layer in backbone.layers if layer.trainable and layer.weights]
    assert count == 4 and len(trainable) == 4
    assert not any(isinstance(backbone.get_layer(n), keras.layers.BatchNormalization)
                   for n in trainable)
    assert models.set_fine_tune(model, 0) > 4  # 0 = every convolution


def test_mixed_precision_keeps_float32_output():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = models.build_model(small_train(weights="none"), 3)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert model.get_layer(models.BACKBONE).compute_dtype == "float16"
    assert str(model(_odd_images()).dtype) in {"float32", "<dtype: 'float32'>"}


@pytest.mark.parametrize(("backbone", "views"), [("mobilenet", 0), ("mobilenet_v2", 2)])
def test_load_model_uses_safe_mode_and_round_trips(built, tmp_path, backbone, views):
    config = small_train(weights="none", backbone=backbone, alpha=0.5)
    model = models.with_test_time_views(built(config), views, config.image_size)
    model.save(tmp_path / models.MODEL_FILE)
    loaded = models.load_model(tmp_path)
    x = _odd_images()
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no trained model"):
        models.load_model(tmp_path / "nowhere")


WEIGHT_BYTES = b"not really hdf5, but bytes to hash" * 100


@pytest.fixture
def weights_url() -> Iterator[tuple[str, list[str]]]:
    """A weights file served on 127.0.0.1 (no network); also returns the request log."""
    served: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(WEIGHT_BYTES)))
            self.end_headers()
            self.wfile.write(WEIGHT_BYTES)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/mirror/weights.h5", served
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_weights_url_is_checked_against_weights_sha256(
        weights_url: tuple[str, list[str]], tmp_path: Path) -> None:
    url, served = weights_url
    digest = hashlib.sha256(WEIGHT_BYTES).hexdigest()

    path = models.resolve_weights(url, digest, cache_dir=tmp_path)
    assert path is not None and Path(path).read_bytes() == WEIGHT_BYTES
    assert models.resolve_weights(url, digest.upper(), cache_dir=tmp_path) == path
    assert len(served) == 1  # the verified cached copy is reused

    wrong = "0" * 64
    with pytest.raises(ValueError, match=re.escape(url) + f" have sha256 {digest}, not "
                       f"weights_sha256 {wrong}; the download was removed"):
        models.resolve_weights(url, wrong, cache_dir=tmp_path)
    assert len(served) == 2  # fetched once more before giving up
    assert not list((tmp_path / "models").iterdir())


def test_a_local_weights_file_is_checked_against_weights_sha256(tmp_path: Path) -> None:
    local = tmp_path / "w.h5"
    local.write_bytes(WEIGHT_BYTES)
    digest = hashlib.sha256(WEIGHT_BYTES).hexdigest()
    assert models.resolve_weights(str(local), digest) == str(local)
    with pytest.raises(ValueError, match=r"w\.h5' has sha256 .*, not weights_sha256 f{64}"):
        models.resolve_weights(local.as_uri(), "f" * 64)
    assert local.exists()


#: Per backbone: Keras' preprocessing module (its documented ``preprocess_input``) and the
#: channels of the backbone's last feature map (with alpha 0.5 where it applies).
BACKBONE_FACTS = {
    "mobilenet": (keras.applications.mobilenet, 512),
    "mobilenet_v2": (keras.applications.mobilenet_v2, 1280),
    "mobilenet_v3_small": (keras.applications.mobilenet_v3, 288),
    "mobilenet_v3_large": (keras.applications.mobilenet_v3, 480),
    "efficientnet_v2_b0": (keras.applications.efficientnet_v2, 1280),
    "convnext_tiny": (keras.applications.convnext, 768),
}


def test_every_configurable_backbone_has_a_builder():
    assert set(CHOICES["backbone"]) == set(models.BACKBONES) == set(BACKBONE_FACTS)
    # the sweep's cross-validated choice (README: Sweeps): IRIS_MODEL_WEIGHTS names v1's file
    assert (PipelineConfig().backbone, PipelineConfig().alpha) == ("mobilenet", 0.25)


def test_config_rejects_unknown_backbone_and_view_counts(core_model):
    with pytest.raises(ValueError, match="backbone='resnet'"):
        PipelineConfig(backbone="resnet")
    with pytest.raises(ValueError, match="tta_views=3"):
        PipelineConfig(tta_views=3)
    with pytest.raises(ValueError, match="tta_views must be one of"):
        models.with_test_time_views(core_model, 5, 64)


@pytest.mark.parametrize("backbone", [
    *[b for b in BACKBONE_FACTS if b != "convnext_tiny"],
    pytest.param("convnext_tiny", marks=pytest.mark.slow),  # 28M parameters
])
def test_backbone_predicts_on_raw_uint8_with_its_own_preprocessing(backbone):
    """Each backbone takes raw uint8 images of odd sizes and feeds itself what Keras documents.

    The backbone's input is compared with Keras' ``preprocess_input`` of the resized image
    (a scaling to [-1, 1] for MobileNet v1/v2, the identity for backbones that carry their
    own preprocessing layers), so no backbone sees unscaled or twice-scaled pixels.
    """
    module, channels = BACKBONE_FACTS[backbone]
    model = models.build_model(  # its own: set_fine_tune below changes its layers
        small_train(backbone=backbone, weights="none", alpha=0.5, image_size=64,
                    pooling="avg_max"), 3)
    backbone_layer = model.get_layer(models.BACKBONE)
    assert model.get_layer(models.POOL).output.shape[-1] == 2 * channels
    # the classifier's output and its pooled features from one pass (a pass of the larger
    # backbones takes 0.3-0.8 s here): the same layers model() calls, in the same graph
    probe = keras.Model(model.input, [model.output, model.get_layer(models.POOL).output])
    images = _odd_images()
    probabilities, pooled = probe(images, training=False)
    for shape, out in [((2, 71, 53), probabilities),
                       ((1, 40, 97), model(_odd_images(1, 40, 97), training=False))]:
        out = np.asarray(out)
        assert out.shape == (shape[0], 3)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    resized = np.array(model.get_layer("resize")(images.astype("float32")))
    feature_map = np.asarray(backbone_layer(module.preprocess_input(resized), training=False))
    expected = np.concatenate([feature_map.mean(axis=(1, 2)), feature_map.max(axis=(1, 2))], 1)
    np.testing.assert_allclose(np.asarray(pooled), expected, rtol=1e-4, atol=1e-4)
    # with random weights the MobileNets' features are tiny (1e-17 to 1e-7), under the absolute
    # tolerance above whatever the pooling or pixel scaling: compared to their scale as well
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(pooled) / scale, expected / scale, rtol=1e-4, atol=1e-4)
    # fine-tuning finds layers to train in every backbone and leaves batch statistics frozen
    assert models.set_fine_tune(model, 0) > 0
    assert not [layer.name for layer in backbone_layer.layers
                if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]


def _h5_arrays(path) -> list[np.ndarray]:
    """Every weight array of a legacy Keras .h5 weights file, in the file's layer order."""
    arrays = []
    with h5py.File(path, "r") as f:
        for name in f.attrs["layer_names"]:
            group = f[name]
            arrays += [np.asarray(group[w]) for w in group.attrs["weight_names"]]
    return arrays


def test_mobilenet_v2_weights_file_loads_by_layer_order(built, mobilenet_v2_weights):
    """The shared MobileNetV2-0.5 file (old layer names) fills every backbone weight, in order."""
    config = small_train(backbone="mobilenet_v2", alpha=0.5, weights=str(mobilenet_v2_weights))
    backbone = models.build_model(config, 3).get_layer(models.BACKBONE)
    expected = _h5_arrays(mobilenet_v2_weights)
    loaded = [np.asarray(w) for w in backbone.weights]
    assert len(loaded) == len(expected) and sum(a.size for a in expected) == 706_224
    for got, want in zip(loaded, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    random = built(dataclasses.replace(config, weights="none"))
    assert not np.allclose(np.asarray(random.get_layer(models.BACKBONE).weights[0]), expected[0])


#: The 8 symmetries of a square as numpy computes them, independently of DihedralView.
NUMPY_VIEWS = [
    lambda x: x,
    lambda x: x[:, :, ::-1],
    lambda x: x[:, ::-1],
    lambda x: x[:, ::-1, ::-1],
    lambda x: x.transpose(0, 2, 1, 3),
    lambda x: np.rot90(x, 1, axes=(1, 2)),
    lambda x: np.rot90(x, -1, axes=(1, 2)),
    lambda x: np.rot90(x, 2, axes=(1, 2)).transpose(0, 2, 1, 3),
]


TTA_IMAGES = _odd_images(2, 71, 53)


@pytest.fixture(scope="module")
def core_on_view(core_model) -> Callable[[int], np.ndarray]:
    """``core_model``'s probabilities for ``NUMPY_VIEWS[i]`` of :data:`TTA_IMAGES`, each
    computed once for the three view counts (2 + 4 + 8 passes would repeat views 0-3)."""
    outputs: dict[int, np.ndarray] = {}

    def output(i: int) -> np.ndarray:
        if i not in outputs:
            view = np.ascontiguousarray(NUMPY_VIEWS[i](TTA_IMAGES))
            outputs[i] = np.asarray(core_model(view, training=False))
        return outputs[i]

    return output


@pytest.mark.parametrize(("views", "which"), [(2, [0, 1]), (4, [0, 1, 2, 3]), (8, range(8))])
def test_test_time_views_average_the_flips_and_turns(core_model, core_on_view, views, which):
    core = core_model
    tta = models.with_test_time_views(core, views, small_train().image_size)
    expected = np.mean([core_on_view(i) for i in which], axis=0)
    got = np.asarray(tta(TTA_IMAGES, training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, core_on_view(0), atol=1e-4)  # view 0: the images as they are
    assert models.with_test_time_views(core, 0, 64) is core


@pytest.mark.slow  # a SavedModel export of the 8-view model
def test_export_serves_test_time_views(tmp_path, mobilenet_weights):
    """model.keras and the SavedModel both average the views: serving = what evaluate scores."""
    config = small_train(weights=str(mobilenet_weights), tta_views=8)
    core = models.build_model(config, 3)
    exported = export_model(core, config, 3, tmp_path, mixed_precision=False)
    images = _odd_images(2, 71, 53)
    expected = np.mean([np.asarray(core(np.ascontiguousarray(view(images)), training=False))
                        for view in NUMPY_VIEWS], axis=0)
    from_keras = np.asarray(models.load_model(tmp_path)(images, training=False))
    saved = tf.saved_model.load(str(tmp_path / SAVED_MODEL_DIR))
    assert set(saved.signatures) == {"serve", "serving_default"}  # as Keras' export names them
    from_saved = saved.signatures["serving_default"](images=tf.constant(images))["probabilities"]
    from_serve = saved.serve(tf.constant(images))["probabilities"]
    for got in (np.asarray(exported(images, training=False)), from_keras, from_saved.numpy(),
                from_serve.numpy()):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_model_mobilenet_is_the_deprecated_spelling_of_transfer(caplog):
    assert PipelineConfig().model == "transfer"
    with caplog.at_level("WARNING"):
        config = PipelineConfig(model="mobilenet")
    assert config.model == "transfer"
    assert "model='mobilenet' is deprecated: use model='transfer'" in caplog.text
    with pytest.raises(ValueError, match="model='resnet' is not one of"):
        PipelineConfig(model="resnet")


def test_trained_models_are_named_by_their_backbone():
    assert model_label("transfer", "mobilenet_v2", 0.5, 320) == "mobilenet_v2-a0_5-320px"
    assert model_label("transfer", "mobilenet", 1.0, 224) == "mobilenet-a1-224px"
    assert model_label("transfer", "convnext_tiny", 0.5, 224) == "convnext_tiny-224px"
    assert model_label("seed_cnn", "mobilenet_v2", 0.5, 128) == "seed_cnn-128px"
    # the label names the MLflow logged model, whose names refuse these characters
    label = model_label("transfer", "mobilenet_v3_small", 0.75, 320)
    assert not set(label) & set("/:.%\"'"), label


def _exported_before_view_stack(core: keras.Model, views: int) -> keras.Model:
    """A model as exported before :class:`ViewStack`: the classifier called once per view."""
    inputs = keras.Input(shape=(None, None, 3), name="image")
    outputs = [core(models.DihedralView(i, name=f"view_{i}")(inputs)) for i in range(views)]
    averaged = keras.layers.Average(dtype="float32", name=models.HEAD)(outputs)
    return keras.Model(inputs, averaged, name=f"{core.name}_tta{views}")


@pytest.mark.parametrize(("views", "earlier_format"), [(0, False), (8, False), (4, True)])
def test_view_batched_predictor_gives_the_exported_models_numbers(core_model, tmp_path, views,
                                                                  earlier_format):
    """Evaluate scores every view in one backbone call: the saved model's own output, also
    for a champion exported before the views were stacked inside the model."""
    size = small_train().image_size
    viewed = (_exported_before_view_stack(core_model, views) if earlier_format
              else models.with_test_time_views(core_model, views, size))
    viewed.save(tmp_path / models.MODEL_FILE)
    loaded = models.load_model(tmp_path)
    images = _odd_images(3, size, size)
    predict = models.view_batched_predictor(loaded, size)
    np.testing.assert_allclose(predict(images), np.asarray(loaded(images, training=False)),
                               rtol=1e-5, atol=1e-6)
    assert models.test_time_view_count(loaded) == max(1, views)
