"""The drift reference reads the training images' identity-view features from the feature
cache instead of a second backbone pass, and those are the features it would compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.lib import drift, embeddings, inputs, models, records
from pipeline.lib.contract import DRIFT_REFERENCE_FILE
from pipeline.lib.feature_cache import CACHE_ROOT_ENV, FeatureCache, feature_key
from pipeline.lib.feature_head import View, backbone_key, extract_features
from tests.support.train_helpers import tiny_prepared_data, tiny_train


def test_drift_reference_reuses_the_feature_heads_cached_features(
        tmp_path: Path, mobilenet_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tiny_prepared_data(tmp_path)
    config = tiny_train(weights=str(mobilenet_weights), tta_views=2)
    core = models.build_model(config, 3)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    models.with_test_time_views(core, 2, config.image_size).save(model_dir / models.MODEL_FILE)
    computed = drift.Reference.load(
        embeddings.write_reference(model_dir, data, config.image_size))

    # the feature head's identity-view features are the drift reference's
    cache = FeatureCache(tmp_path / "cache")
    head = extract_features(core, data, "train", config, [View("plain")], cache=cache)
    shas = [example.sha256 for example in records.read_split(data, "train")]
    row_of = {sha: row for sha, row in zip(inputs.read_index(data, "train")[0], head.x,
                                            strict=True)}
    head_features = np.stack([row_of[sha] for sha in shas])  # in the reference's order
    np.testing.assert_allclose(head_features, computed.features.astype(np.float32),
                               rtol=1e-2, atol=1e-2)

    # with them all in the cache (marked, to see where they come from), no backbone pass
    monkeypatch.setenv(CACHE_ROOT_ENV, str(cache.root))
    keys = [feature_key(backbone_key(config), View("plain").key(config), sha) for sha in shas]
    marked = head_features + np.arange(len(shas), dtype=np.float32)[:, None]
    for key, row in zip(keys, marked, strict=True):
        cache.put(key, row)
    reused = drift.Reference.load(embeddings.write_reference(model_dir, data, config.image_size,
                                                             config=config))
    np.testing.assert_allclose(reused.features.astype(np.float32), marked, rtol=1e-2)
    kernel, bias = core.get_layer(models.HEAD).get_weights()
    assert reused.labels.tolist() == (marked @ kernel + bias).argmax(axis=1).tolist()
    np.testing.assert_array_equal(reused.stats, computed.stats)

    # one entry missing: all computed again
    cache.path(keys[0]).unlink()
    again = drift.Reference.load(embeddings.write_reference(model_dir, data, config.image_size,
                                                            config=config))
    np.testing.assert_array_equal(again.features, computed.features)
    assert (model_dir / DRIFT_REFERENCE_FILE).is_file()
