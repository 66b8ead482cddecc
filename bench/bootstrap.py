"""Benchmark: cost, Monte-Carlo error and coverage of the test-metric bootstrap intervals.

On synthetic predictions shaped like the iris test split (11/38/10 images per class):
- seconds for one ``bootstrap_intervals`` call (what evaluate adds) and one
  ``paired_difference`` call (what register adds), at the default number of resamples;
- the Monte-Carlo error of the interval ends: their standard deviation over 50 bootstrap
  seeds on the same predictions, for the default and a few other resample counts;
- coverage of the 95% interval over simulated test sets with known true metrics.

Run: ``python -m bench.bootstrap [--sets 1000]``; one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import numpy as np

from pipeline.lib import stats

COUNTS = (11, 38, 10)
SCENARIOS = {"recall_0.8_0.6_0.7": (0.8, 0.6, 0.7), "recall_0.9_all": (0.9, 0.9, 0.9),
             "recall_0.95_0.5_0.4": (0.95, 0.5, 0.4)}


def simulate(rng: np.random.Generator, recall: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    labels = np.repeat(np.arange(3), COUNTS)
    wrong = (labels + rng.integers(1, 3, labels.size)) % 3
    return labels, np.where(rng.random(labels.size) < np.asarray(recall)[labels], labels, wrong)


def timed(func: Callable[[], object], repeats: int = 20) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        func()
    return round((time.perf_counter() - start) / repeats, 4)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=1000, help="simulated test sets")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    labels, predictions = simulate(rng, SCENARIOS["recall_0.8_0.6_0.7"])
    _, other = simulate(rng, SCENARIOS["recall_0.8_0.6_0.7"])

    result: dict = {"bench": "bootstrap", "cpu_count": os.cpu_count(),
                    "resamples": stats.RESAMPLES, "test_images": int(labels.size)}
    result["seconds_intervals"] = timed(lambda: stats.bootstrap_intervals(labels, predictions, 3))
    result["seconds_paired"] = timed(lambda: stats.paired_difference(
        labels, predictions, other, 3, "balanced_accuracy"))

    spread = {}
    for resamples in (1000, stats.RESAMPLES, 10000):
        ends = np.array([[*stats.bootstrap_intervals(labels, predictions, 3, resamples=resamples,
                                                     seed=s)["balanced_accuracy"]]
                         for s in range(50)])
        spread[str(resamples)] = {"sd_low": round(float(ends[:, 0].std()), 4),
                                  "sd_high": round(float(ends[:, 1].std()), 4),
                                  "mean_width": round(float((ends[:, 1] - ends[:, 0]).mean()), 4)}
        print(json.dumps({"monte_carlo": {resamples: spread[str(resamples)]}}), flush=True)
    result["monte_carlo_error_balanced_accuracy"] = spread

    coverage = {}
    for name, recall in SCENARIOS.items():
        true = {"accuracy": float(np.dot(COUNTS, recall) / sum(COUNTS)),
                "balanced_accuracy": float(np.mean(recall))}
        hits = dict.fromkeys(true, 0)
        sim = np.random.default_rng(1)
        for i in range(args.sets):
            y, p = simulate(sim, recall)
            ci = stats.bootstrap_intervals(y, p, 3, resamples=1000, seed=i)
            for metric, value in true.items():
                hits[metric] += ci[metric][0] <= value <= ci[metric][1]
        coverage[name] = {m: round(h / args.sets, 3) for m, h in hits.items()}
        print(json.dumps({"coverage": {name: coverage[name]}}), flush=True)
    result["coverage_95"] = {"sets": args.sets, "resamples": 1000, **coverage}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
