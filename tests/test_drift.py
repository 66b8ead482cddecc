"""The drift test on synthetic features: it flags a shift, not a same-distribution sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.lib import drift

DIM = 64


def _features(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 0.2, DIM)  # a few strong directions, as embeddings have
    return rng.normal(size=(n, DIM)) * scales + shift


def _reference(n: int = 200, seed: int = 0) -> drift.Reference:
    labels = np.arange(n) % 2
    stats = np.full((n, len(drift.STAT_NAMES)), 100.0)
    return drift.Reference.build(_features(n, seed), labels, stats, ["a", "b"])


def _stats(n: int) -> np.ndarray:
    return np.full((n, len(drift.STAT_NAMES)), 120.0)


def test_flags_a_shifted_distribution() -> None:
    report = drift.compare(_reference(), _features(80, 1, shift=1.0), np.arange(80) % 2,
                           _stats(80))
    assert report["overall"]["verdict"] == drift.VERDICT_DRIFT
    assert report["overall"]["p_value"] < drift.ALPHA
    assert {e["verdict"] for e in report["per_class"].values()} == {drift.VERDICT_DRIFT}


def test_does_not_flag_a_sample_of_the_same_distribution() -> None:
    verdicts = [drift.compare(_reference(), _features(80, seed), np.arange(80) % 2,
                              _stats(80))["overall"]["verdict"] for seed in range(1, 6)]
    assert verdicts.count(drift.VERDICT_NONE) >= 4  # alpha 0.05: at most a rare false alarm


def test_false_alarms_stay_rare_with_more_dimensions_than_images() -> None:
    """Embeddings have more dimensions than a training set has images: principal axes fitted
    on the reference alone would overfit it, and every same-distribution set would differ."""
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(480, 400)) * np.linspace(1.5, 0.5, 400)
    alarms = 0
    for seed in range(4):
        order = np.random.default_rng(seed).permutation(len(pool))
        first, second = order[:120], order[120:240]
        reference = drift.Reference.build(pool[first], np.zeros(120, int), _stats(120), ["a"])
        report = drift.compare(reference, pool[second], np.zeros(120, int), _stats(120),
                               seed=seed)
        alarms += report["overall"]["verdict"] == drift.VERDICT_DRIFT
    assert alarms <= 1


def test_small_sets_get_a_message_instead_of_a_verdict() -> None:
    report = drift.compare(_reference(), _features(12, 1, shift=5.0), np.zeros(12, int),
                           _stats(12))
    overall = report["overall"]
    assert overall["verdict"] is None
    assert overall["message"] == ("too few images for a drift verdict (new images N = 12 < "
                                  f"{drift.MIN_IMAGES})")
    assert "too few images" in drift.render_markdown(report)


def test_p_value_interval_and_uncertainty_are_reported() -> None:
    result = drift.mmd_test(_features(40, 1), _features(40, 2))
    low, high = result.p_interval
    assert 0.0 <= low <= result.p_value <= high <= 1.0
    assert result.null_std > 0


def test_reference_round_trips_and_stays_small(tmp_path: Path) -> None:
    features = _features(600, 0) @ np.random.default_rng(1).normal(size=(DIM, 1280))
    reference = drift.Reference.build(features, np.arange(600) % 3,
                                      _stats(600), ["a", "b", "c"])
    path = reference.save(tmp_path / "drift_reference.npz")
    loaded = drift.Reference.load(path)
    assert len(loaded.features) == drift.MAX_REFERENCE_IMAGES
    assert loaded.classes == ("a", "b", "c")
    np.testing.assert_array_equal(loaded.features, reference.features)
    assert path.stat().st_size < 1_100_000  # 400 images x 1280 features as float16


def test_features_of_another_backbone_are_refused() -> None:
    with pytest.raises(ValueError, match="not the same backbone"):
        _reference().check(np.zeros((3, DIM + 1)))


def test_image_statistics() -> None:
    pixels = np.zeros((2, 4, 4, 3), np.uint8)
    pixels[1, ..., 0] = 255
    stats = drift.image_statistics(pixels, [(640, 480), (32, 32)])
    assert stats[0].tolist() == [640, 480, 0, 0, 0, 0]
    assert stats[1, 2] == pytest.approx(0.299 * 255, rel=1e-5)
    assert stats[1, 3] == 255
