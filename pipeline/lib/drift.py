"""Has the data drifted? A two-sample test of new images' features against the training set's.

At training time :meth:`Reference.build` keeps the backbone features (the pooled features
the model's head reads, as float16) of up to :data:`MAX_REFERENCE_IMAGES` training images,
their predicted labels and simple image statistics (size, brightness, colour): about a
megabyte, stored with the model. At prediction time :func:`compare` runs a kernel two-sample
test on the new images' features: MMD with an RBF kernel on the top principal components of
the pooled reference and new features, its p-value from permutations. The principal axes
are fitted on both samples together (never on the reference alone, which would make its
own points look more spread out than any new ones and the test flag every set), so the
permutation p-value is exact and the false-positive rate is the threshold ``alpha``. Per
predicted class the same test runs on that class's images.

Only NumPy: no TensorFlow, so the test and its tests are fast and run anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lib.files import atomic_path

#: Fewest images on each side for a verdict: below it a test has little power and its
#: p-value says little, so the report says so instead of guessing.
MIN_IMAGES = 20
#: Verdict threshold on the permutation p-value: the test's false-positive rate.
ALPHA = 0.05
#: Permutations of the pooled sample (the p-value's resolution is 1 / (PERMUTATIONS + 1)).
PERMUTATIONS = 500
#: Principal components of the pooled features the kernel works on (its input dimension).
COMPONENTS = 32
#: Most reference images stored (a random subsample of larger training sets).
MAX_REFERENCE_IMAGES = 400
#: Most new images one test uses (a random subsample): the kernel matrix grows with n^2.
MAX_TEST_IMAGES = 1000
#: Columns of the image statistics, per image.
STAT_NAMES = ("width", "height", "brightness", "red", "green", "blue")

VERDICT_DRIFT = "drift"
VERDICT_NONE = "no drift"


def image_statistics(pixels: np.ndarray, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per image: original width and height, mean brightness and mean of each colour channel.

    ``pixels`` is the uint8 batch ``(n, h, w, 3)`` the model sees, ``sizes`` the original
    ``(width, height)`` of each image. Brightness is the Rec. 601 luma, 0..255.
    """
    pixels = np.asarray(pixels, np.float64)
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or len(sizes) != len(pixels):
        raise ValueError(f"expected (n, h, w, 3) pixels and n sizes, got {pixels.shape} and "
                         f"{len(sizes)} sizes")
    colour = pixels.mean(axis=(1, 2))
    brightness = colour @ np.array([0.299, 0.587, 0.114])
    size = np.asarray(sizes, np.float64).reshape(len(pixels), 2)
    return np.column_stack([size, brightness, colour]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Reference:
    """What a model version remembers of its training images (a few hundred kB)."""

    features: np.ndarray  # (n, d) float16
    labels: np.ndarray  # (n,) predicted class index of each reference image
    stats: np.ndarray  # (n, len(STAT_NAMES))
    classes: tuple[str, ...]

    @classmethod
    def build(cls, features: np.ndarray, labels: np.ndarray, stats: np.ndarray,
              classes: Sequence[str], *, seed: int = 0) -> Reference:
        """Subsample to :data:`MAX_REFERENCE_IMAGES`."""
        features = np.asarray(features, np.float32)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"a reference needs features of at least 2 images, got shape "
                             f"{features.shape}")
        if not len(features) == len(labels) == len(stats):
            raise ValueError("features, labels and stats must have one row per image")
        keep = np.arange(len(features))
        if len(keep) > MAX_REFERENCE_IMAGES:
            keep = np.sort(np.random.default_rng(seed).choice(keep, MAX_REFERENCE_IMAGES,
                                                               replace=False))
        return cls(features[keep].astype(np.float16), np.asarray(labels, np.int32)[keep],
                   np.asarray(stats, np.float32)[keep], tuple(str(c) for c in classes))

    def check(self, features: np.ndarray) -> np.ndarray:
        """``features`` as float64, or a ``ValueError`` when they are not this backbone's."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.features.shape[1]:
            raise ValueError(f"features have shape {features.shape}, the reference has "
                             f"{self.features.shape[1]} dimensions: not the same backbone")
        return features

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` atomically (no pickles: loading it runs no code)."""
        with atomic_path(path) as tmp, tmp.open("wb") as handle:
            np.savez_compressed(handle, features=self.features, labels=self.labels,
                                stats=self.stats, classes=np.asarray(self.classes, dtype=str))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        with np.load(Path(path), allow_pickle=False) as data:
            return cls(data["features"], data["labels"], data["stats"],
                       tuple(str(c) for c in data["classes"]))


def _squared_distances(x: np.ndarray) -> np.ndarray:
    norms = (x * x).sum(axis=1)
    return np.maximum(norms[:, None] + norms[None, :] - 2.0 * x @ x.T, 0.0)


def _mmd2(kernel: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 for each row of the boolean mask ``first`` (membership in sample X)."""
    x = first.astype(np.float64)
    y = 1.0 - x
    n, m = x.sum(axis=1), y.sum(axis=1)
    diagonal = np.diag(kernel)
    kx, ky = x @ kernel, y @ kernel
    xx = ((kx * x).sum(axis=1) - x @ diagonal) / (n * (n - 1))
    yy = ((ky * y).sum(axis=1) - y @ diagonal) / (m * (m - 1))
    xy = (kx * y).sum(axis=1) / (n * m)
    return xx + yy - 2.0 * xy


@dataclasses.dataclass(frozen=True)
class TestResult:
    """One MMD permutation test: the statistic, how far chance alone moves it, the p-value."""

    mmd2: float
    null_std: float  # standard deviation of MMD^2 under permutation (its uncertainty)
    p_value: float
    p_interval: tuple[float, float]  # 95% Monte Carlo interval of the p-value


def principal_components(pooled: np.ndarray, components: int = COMPONENTS) -> np.ndarray:
    """``pooled`` centred and projected on its own top principal axes."""
    centred = pooled - pooled.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    return centred @ axes[:min(components, len(pooled) - 1)].T


def mmd_test(x: np.ndarray, y: np.ndarray, *, permutations: int = PERMUTATIONS,
             seed: int = 0) -> TestResult:
    """Unbiased MMD^2 of samples ``x`` and ``y`` (RBF kernel, median-distance bandwidth, on
    the pooled samples' principal components) with a permutation p-value,
    ``(count + 1) / (permutations + 1)``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"MMD needs at least 2 points per sample, got {len(x)} and {len(y)}")
    pooled = principal_components(np.concatenate([x, y]))
    distances = _squared_distances(pooled)
    off_diagonal = distances[~np.eye(len(pooled), dtype=bool)]
    bandwidth = float(np.median(off_diagonal)) or 1.0
    kernel = np.exp(-distances / bandwidth)
    rng = np.random.default_rng(seed)
    masks = np.zeros((permutations + 1, len(pooled)), bool)
    masks[0, :len(x)] = True
    for row in masks[1:]:
        row[rng.permutation(len(pooled))[:len(x)]] = True
    values = _mmd2(kernel, masks)
    observed, null = float(values[0]), values[1:]
    exceed = int((null >= observed).sum())
    p_value = (exceed + 1) / (permutations + 1)
    return TestResult(observed, float(null.std()), p_value,
                      _wilson(exceed + 1, permutations + 1))


def _wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / (
        1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def verdict(x: np.ndarray, y: np.ndarray, *, alpha: float = ALPHA,
            min_images: int = MIN_IMAGES, seed: int = 0) -> dict[str, Any]:
    """The test's result as a report entry: a verdict when both samples are large enough,
    else the message saying why there is none."""
    entry: dict[str, Any] = {"images": len(y), "reference_images": len(x),
                             "threshold": f"p < {alpha:g}"}
    smaller = min(len(x), len(y))
    if smaller < min_images:
        side = "new" if len(y) <= len(x) else "reference"
        entry["message"] = (f"too few images for a drift verdict ({side} images "
                            f"N = {smaller} < {min_images})")
        entry["verdict"] = None
        return entry
    rng = np.random.default_rng(seed)
    if len(y) > MAX_TEST_IMAGES:
        y = y[rng.choice(len(y), MAX_TEST_IMAGES, replace=False)]
    result = mmd_test(x, y, seed=seed)
    entry.update(mmd2=result.mmd2, mmd2_null_std=result.null_std, p_value=result.p_value,
                 p_interval=list(result.p_interval),
                 verdict=VERDICT_DRIFT if result.p_value < alpha else VERDICT_NONE)
    return entry


def compare(reference: Reference, features: np.ndarray, labels: Sequence[int],
            stats: np.ndarray, *, alpha: float = ALPHA, min_images: int = MIN_IMAGES,
            seed: int = 0) -> dict[str, Any]:
    """The drift report of new images (their features, predicted labels, statistics)
    against ``reference``: the overall test, one per predicted class, and image statistics."""
    features = reference.check(features)
    known = reference.features.astype(np.float64)
    labels = np.asarray(labels, np.int64)
    report: dict[str, Any] = {
        "method": (f"MMD^2 (RBF kernel, median bandwidth) on the top {COMPONENTS} principal "
                   "components of the pooled backbone features, "
                   f"{PERMUTATIONS} permutations"),
        "alpha": alpha, "min_images": min_images,
        "overall": verdict(known, features, alpha=alpha, min_images=min_images, seed=seed),
        "per_class": {},
        "image_statistics": _statistics(reference.stats, np.asarray(stats, np.float64)),
    }
    for index, name in enumerate(reference.classes):
        mine = labels == index
        if mine.any():
            report["per_class"][name] = verdict(known[reference.labels == index],
                                                features[mine], alpha=alpha,
                                                min_images=min_images, seed=seed)
    return report


def _statistics(reference: np.ndarray, new: np.ndarray) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each image statistic, reference beside new."""
    if len(new) == 0:
        return {}
    return {name: {"reference_mean": float(reference[:, i].mean()),
                   "reference_std": float(reference[:, i].std()),
                   "new_mean": float(new[:, i].mean()), "new_std": float(new[:, i].std())}
            for i, name in enumerate(STAT_NAMES)}


def describe(entry: Mapping[str, Any]) -> str:
    """One line: the verdict with its numbers, or why there is none."""
    if entry.get("verdict") is None:
        return str(entry["message"])
    low, high = entry["p_interval"]
    return (f"{entry['verdict']} (MMD^2 {entry['mmd2']:.4f} +- {entry['mmd2_null_std']:.4f} by "
            f"chance, p = {entry['p_value']:.3f} [{low:.3f}, {high:.3f}], threshold "
            f"{entry['threshold']}; {entry['images']} new vs {entry['reference_images']} "
            "training images)")


def render_markdown(report: Mapping[str, Any]) -> str:
    """The drift report for the KFP UI (a Markdown artifact)."""
    lines = ["# Drift check against the model's training images", "",
             f"**Overall: {describe(report['overall'])}**", "",
             f"Method: {report['method']}; verdict `drift` when the permutation p-value is "
             f"below {report['alpha']:g} (the false-positive rate), none below "
             f"{report['min_images']} images on either side.", "",
             "## Per predicted class", "",
             "| class | images | verdict | MMD^2 | p-value [95% interval] |",
             "| --- | ---: | --- | ---: | --- |"]
    for name, entry in report["per_class"].items():
        if entry.get("verdict") is None:
            lines.append(f"| {name} | {entry['images']} | {entry['message']} | | |")
        else:
            low, high = entry["p_interval"]
            lines.append(f"| {name} | {entry['images']} | {entry['verdict']} | "
                         f"{entry['mmd2']:.4f} | {entry['p_value']:.3f} [{low:.3f}, "
                         f"{high:.3f}] |")
    stats = report["image_statistics"]
    if stats:
        lines += ["", "## Image statistics (mean +- std)", "",
                  "| statistic | training | new |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {s['reference_mean']:.1f} +- {s['reference_std']:.1f} | "
                  f"{s['new_mean']:.1f} +- {s['new_std']:.1f} |" for name, s in stats.items()]
    return "\n".join(lines) + "\n"


__all__ = ["ALPHA", "COMPONENTS", "MAX_REFERENCE_IMAGES", "MIN_IMAGES", "PERMUTATIONS",
           "STAT_NAMES", "VERDICT_DRIFT", "VERDICT_NONE", "Reference", "TestResult",
           "compare", "describe", "image_statistics", "mmd_test", "principal_components",
           "render_markdown", "verdict"]
