"""The frozen-backbone feature cache: same features back, a miss for any other key part,
corrupt entries recomputed (never trusted), atomic writes, LRU eviction within its budget,
and the training's extraction reading what an earlier one stored."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.lib.feature_cache import CACHE_ROOT_ENV, FeatureCache, feature_key

BACKBONE = {"weights": "ab" * 32, "backbone": "mobilenet_v2", "alpha": 0.5, "image_size": 320,
            "pooling": "avg_max"}
VIEW = {"kind": "augment", "index": 3, "seed": 42,
        "augment": {"flip": True, "rotation": 1.0, "shift": 0.2, "zoom": 0.1, "contrast": 0.1}}
IMAGE = "cd" * 32


def _features(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=2560).astype(np.float32)


def test_a_stored_entry_reads_back_the_same_features(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    key = feature_key(BACKBONE, VIEW, IMAGE)
    assert cache.get(key) is None
    cache.put(key, _features())
    got = cache.get(key)
    assert got is not None and got.dtype == np.float32
    np.testing.assert_array_equal(got, _features())
    assert (cache.hits, cache.misses) == (1, 1)
    assert not list(tmp_path.rglob(".tmp-*"))  # written atomically, nothing left behind


@pytest.mark.parametrize("part", [*(("backbone", k) for k in BACKBONE), ("view", "index"),
                                  ("view", "seed"), ("view", "kind"), ("augment", "rotation"),
                                  ("augment", "flip"), ("image", None)])
def test_every_key_part_changes_the_key(part: tuple[str, str | None]) -> None:
    backbone, view, image = dict(BACKBONE), dict(VIEW), IMAGE
    where, name = part
    if where == "backbone":
        backbone[name] = f"other-{backbone[name]}"
    elif where == "view":
        view[name] = f"other-{view[name]}"
    elif where == "augment":
        view["augment"] = {**VIEW["augment"], name: 0.5}
    else:
        image = "ef" * 32
    assert feature_key(backbone, view, image) != feature_key(BACKBONE, VIEW, IMAGE)
    assert feature_key(dict(BACKBONE), dict(VIEW), IMAGE) == feature_key(BACKBONE, VIEW, IMAGE)


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate", "empty", "not_numpy"])
def test_a_corrupt_entry_is_a_miss_and_is_removed(tmp_path: Path, damage: str) -> None:
    cache = FeatureCache(tmp_path)
    key = feature_key(BACKBONE, VIEW, IMAGE)
    cache.put(key, _features())
    path = cache.path(key)
    data = bytearray(path.read_bytes())
    if damage == "flip_a_byte":
        data[-3] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    else:  # a valid checksum over a payload that is not an array
        import hashlib
        data = bytearray(hashlib.sha256(b"junk").digest() + b"junk")
    path.write_bytes(bytes(data))
    assert cache.get(key) is None
    assert not path.exists()
    cache.put(key, _features(1))  # recomputed and stored again
    np.testing.assert_array_equal(cache.get(key), _features(1))


def test_eviction_removes_the_least_recently_used_until_within_budget(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, budget_bytes=10**9)
    keys = [feature_key(BACKBONE, VIEW, f"{i:064x}") for i in range(5)]
    for age, key in enumerate(keys):
        cache.put(key, _features(age))
        os.utime(cache.path(key), (1_000 + age, 1_000 + age))  # oldest first
    size = cache.path(keys[0]).stat().st_size
    assert cache.get(keys[0]) is not None  # a hit makes the oldest the most recently used
    cache.budget_bytes = 3 * size
    assert cache.evict() == 2
    kept = {key for key in keys if cache.path(key).exists()}
    assert kept == {keys[0], keys[3], keys[4]}
    assert cache.evict() == 0


def test_the_cache_is_configured_by_the_environment(tmp_path: Path) -> None:
    assert FeatureCache.from_env({}) is None
    cache = FeatureCache.from_env({CACHE_ROOT_ENV: str(tmp_path), "IRIS_FEATURE_CACHE_BYTES": "5"})
    assert cache is not None and cache.root == tmp_path and cache.budget_bytes == 5
    with pytest.raises(ValueError, match="IRIS_FEATURE_CACHE_BYTES='lots'"):
        FeatureCache.from_env({CACHE_ROOT_ENV: str(tmp_path), "IRIS_FEATURE_CACHE_BYTES": "lots"})


def test_extraction_reads_cached_features_and_recomputes_a_changed_setting(tmp_path: Path) -> None:
    """A second extraction of the same split and views computes nothing; another seed's
    augmented views miss, while its plain view (seed-free) still hits."""
    from pipeline.lib import inputs, models
    from pipeline.lib.feature_head import extract_features, plain_and_augmented
    from tests.support.train_helpers import tiny_prepared_data, tiny_train

    data_dir = tiny_prepared_data(tmp_path, {"a": 4, "b": 4})
    config = tiny_train()
    core = models.build_model(config, 2)
    augmenter = inputs.build_augmenter(config)
    cache = FeatureCache(tmp_path / "cache")
    views = plain_and_augmented(1)
    first = extract_features(core, data_dir, "train", config, views, augmenter=augmenter,
                             cache=cache)
    images = len(first.y) // 2
    assert first.computed == 2 * images
    again = extract_features(core, data_dir, "train", config, views, augmenter=augmenter,
                             cache=cache)
    assert again.computed == 0
    np.testing.assert_array_equal(again.x, first.x)
    uncached = extract_features(core, data_dir, "train", config, views, augmenter=augmenter)
    np.testing.assert_allclose(uncached.x, first.x, rtol=1e-5, atol=1e-5)
    reseeded = dataclasses.replace(config, seed=config.seed + 1)
    other = extract_features(core, data_dir, "train", reseeded, views, augmenter=augmenter,
                             cache=cache)
    assert other.computed == images  # only the augmented view
    np.testing.assert_array_equal(other.x[:images], first.x[:images])
    assert not np.allclose(other.x[images:], first.x[images:])
