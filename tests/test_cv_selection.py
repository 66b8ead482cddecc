"""Cross-validation folds and the paired, cost-aware choice between trials."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pipeline.lib import stats
from pipeline.lib.folds import assign_folds, check_fold_count
from pipeline.lib.selection import BEST_SCORE, TrialEvidence, choose_trial

CLASSES = ("a", "b", "c")


def _digests(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def _labels(counts: tuple[int, ...]) -> list[int]:
    return [c for c, n in enumerate(counts) for _ in range(n)]


def test_folds_are_stratified_balanced_and_the_same_for_any_order() -> None:
    labels = _labels((13, 50, 17))
    digests = _digests(len(labels))
    folds = assign_folds(digests, labels, 5, seed=42)
    for label in range(3):
        per_fold = np.bincount(folds[np.array(labels) == label], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, (label, per_fold)
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    order = np.random.default_rng(0).permutation(len(labels))
    shuffled = assign_folds([digests[i] for i in order], [labels[i] for i in order], 5, seed=42)
    assert np.array_equal(shuffled, folds[order])
    assert not np.array_equal(assign_folds(digests, labels, 5, seed=7), folds)


def test_copies_of_one_content_share_a_fold() -> None:
    labels = _labels((6, 6, 6))
    digests = _digests(len(labels))
    digests[1] = digests[0]
    digests[8] = digests[7]
    folds = assign_folds(digests, labels, 3, seed=1)
    assert folds[0] == folds[1] and folds[7] == folds[8]


@pytest.mark.parametrize(("folds", "message"), [
    (1, "2 to 20 folds"), (21, "2 to 20 folds"), (6, "class '2' has distinct")])
def test_fold_counts_the_data_cannot_support_are_refused(folds: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_fold_count(folds, {"0": 9, "1": 40, "2": 5})


def test_a_content_under_two_labels_is_refused() -> None:
    digests = _digests(6)
    digests[3] = digests[0]
    with pytest.raises(ValueError, match="two labels"):
        assign_folds(digests, [0, 0, 0, 1, 1, 1], 2, seed=0)


def _trial(index: int, labels: np.ndarray, predicted: np.ndarray, cost: float,
           ids: tuple[str, ...]) -> TrialEvidence:
    probabilities = np.eye(3)[predicted]
    return TrialEvidence(index, f"t{index + 1}",
                         stats.Predictions(ids, labels, predicted, probabilities, CLASSES), cost)


def _noisy(labels: np.ndarray, wrong: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flip = rng.random(labels.size) < wrong
    return np.where(flip, (labels + 1) % 3, labels)


LABELS = np.array(_labels((60, 200, 70)))
IDS = tuple(_digests(LABELS.size, "img"))


def test_a_cheaper_trial_within_noise_of_the_leader_is_chosen_and_said_so() -> None:
    leader = _noisy(LABELS, 0.30, seed=1)
    close = leader.copy()
    close[:4] = (LABELS[:4] + 1) % 3  # a few images worse: within noise
    choice = choose_trial([_trial(0, LABELS, close, cost=10.0, ids=IDS),
                           _trial(1, LABELS, leader, cost=40.0, ids=IDS)],
                          "balanced_accuracy")
    assert choice.leader == 1
    assert choice.chosen == 0
    assert "trial 2 leads" in choice.summary
    assert "trial 1 is within noise" in choice.summary and "4.0x cheaper" in choice.summary


def test_best_score_takes_the_leader_and_names_the_cheaper_trial_it_passed_over() -> None:
    leader = _noisy(LABELS, 0.30, seed=1)
    close = leader.copy()
    close[:4] = (LABELS[:4] + 1) % 3
    trials = [_trial(0, LABELS, close, cost=10.0, ids=IDS),
              _trial(1, LABELS, leader, cost=40.0, ids=IDS)]
    choice = choose_trial(trials, "balanced_accuracy", BEST_SCORE)
    assert choice.leader == choice.chosen == 1
    assert [v.chosen for v in choice.verdicts] == [True, False]  # leader first
    assert choice.summary.startswith("trial 2 leads (")
    assert choice.summary.endswith(
        ": chosen (best_score; trial 1 is within noise and 4.0x cheaper to serve)")
    alone = choose_trial(trials[1:], "balanced_accuracy", BEST_SCORE)
    assert alone.summary.endswith(": chosen (best_score; no trial within noise is cheaper to "
                                  "serve)")
    with pytest.raises(ValueError, match="sweep_choice must be one of"):
        choose_trial(trials, "balanced_accuracy", "cheapest")


def test_a_cheaper_trial_shown_worse_loses_to_the_leader() -> None:
    leader = _noisy(LABELS, 0.10, seed=1)
    worse = _noisy(LABELS, 0.55, seed=2)
    choice = choose_trial([_trial(0, LABELS, worse, cost=1.0, ids=IDS),
                           _trial(1, LABELS, leader, cost=40.0, ids=IDS)],
                          "balanced_accuracy")
    verdicts = {v.index: v for v in choice.verdicts}
    assert not verdicts[0].within_noise and verdicts[0].difference.ci_high < 0
    assert choice.chosen == 1 and "chosen" in choice.summary


def test_near_equal_costs_go_to_the_better_score() -> None:
    base = _noisy(LABELS, 0.30, seed=3)
    slightly = base.copy()
    slightly[:3] = (LABELS[:3] + 2) % 3
    choice = choose_trial([_trial(0, LABELS, slightly, cost=10.0, ids=IDS),
                           _trial(1, LABELS, base, cost=11.0, ids=IDS)], "balanced_accuracy")
    assert choice.chosen == 1


def test_trials_scored_on_other_images_cannot_be_paired() -> None:
    predicted = _noisy(LABELS, 0.3, seed=1)
    other_ids = tuple(_digests(LABELS.size, "other"))
    with pytest.raises(ValueError, match="different test images"):
        choose_trial([_trial(0, LABELS, predicted, 1.0, IDS),
                      _trial(1, LABELS, _noisy(LABELS, 0.1, 2), 2.0, other_ids)],
                     "balanced_accuracy")
