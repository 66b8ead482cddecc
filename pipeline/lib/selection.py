"""Choose a sweep's trial on cross-validated evidence: paired against the leader, cost-aware.

Why this rule: on a few hundred images most trials are within noise of each other, so
"highest score wins" picks whichever trial the folds happened to favour. Every trial here was
scored out of fold on the same images (:mod:`pipeline.lib.folds`), so each is compared with
the leader image by image (a paired bootstrap of the difference, as the champion rule does),
and among the trials not shown to be worse than the leader the cheapest to serve wins: a
user pays for every forward pass on every image they score, and a setting that is not shown
to be better is not worth paying for. Costs within :data:`COST_TOLERANCE` of the cheapest
count as equal (measured costs jitter); among those the better score wins, then the earlier
trial. Where serving cost does not matter, ``sweep_choice=best_score`` takes the leader.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from pipeline.lib import stats

#: Costs within this factor of the cheapest candidate's count as equally cheap.
COST_TOLERANCE = 1.25
#: The rules (config ``sweep_choice``): the cheapest trial not shown worse than the leader,
#: or the leader.
CHEAPEST_WITHIN_NOISE = "cheapest_within_noise"
BEST_SCORE = "best_score"
RULES = (CHEAPEST_WITHIN_NOISE, BEST_SCORE)


@dataclasses.dataclass(frozen=True)
class TrialEvidence:
    """One trial's out-of-fold predictions and what one served image costs with it."""

    index: int
    label: str
    predictions: stats.Predictions
    cost: float  # measured milliseconds per served image (all test-time views included)


@dataclasses.dataclass(frozen=True)
class TrialVerdict:
    """A trial's cross-validated score with its interval, and how it fared against the leader."""

    index: int
    label: str
    score: float
    ci_low: float
    ci_high: float
    cost: float
    difference: stats.Difference | None  # this trial minus the leader (None: the leader)
    within_noise: bool  # not shown to be worse than the leader (the leader itself: True)
    chosen: bool = False


@dataclasses.dataclass(frozen=True)
class Choice:
    """The rule's outcome: the verdicts (best score first), the leader, the winner, a sentence."""

    metric: str
    verdicts: tuple[TrialVerdict, ...]
    leader: int
    chosen: int
    summary: str

    @property
    def winner(self) -> TrialVerdict:
        return next(v for v in self.verdicts if v.index == self.chosen)


def _interval_text(value: float, low: float, high: float, signed: bool = False) -> str:
    form = "{:+.3f}" if signed else "{:.3f}"
    return f"{form.format(value)} [{form.format(low)}, {form.format(high)}]"


def _score(trial: TrialEvidence, metric: str) -> tuple[float, float, float]:
    p = trial.predictions
    num_classes = len(p.classes)
    point = stats.score(p.labels, p.predicted, num_classes)[metric]
    low, high = stats.bootstrap_intervals(p.labels, p.predicted, num_classes)[metric]
    return float(point), float(low), float(high)


def _ranked(trials: Sequence[TrialEvidence], metric: str) -> list[TrialVerdict]:
    """Verdicts best score first (ties: earlier trial), each paired against the leader."""
    scored = sorted(((t, *_score(t, metric)) for t in trials), key=lambda r: (-r[1], r[0].index))
    leader = scored[0][0]
    verdicts = []
    for trial, point, low, high in scored:
        difference = None
        if trial is not leader:
            labels, ours, theirs = stats.align(trial.predictions, leader.predictions)
            difference = stats.paired_difference(labels, ours, theirs,
                                                 len(leader.predictions.classes), metric)
        verdicts.append(TrialVerdict(
            index=trial.index, label=trial.label, score=point, ci_low=low, ci_high=high,
            cost=trial.cost, difference=difference,
            within_noise=difference is None or difference.ci_high >= 0.0))
    return verdicts


def _pick(verdicts: Sequence[TrialVerdict]) -> TrialVerdict:
    """The cheapest trial not shown worse than the leader (near-equal costs: best score)."""
    candidates = [v for v in verdicts if v.within_noise]
    if not all(math.isfinite(v.cost) and v.cost > 0 for v in candidates):
        return verdicts[0]  # an unmeasured cost cannot be compared: the leader stays
    cheapest = min(v.cost for v in candidates)
    near = [v for v in candidates if v.cost <= cheapest * COST_TOLERANCE]
    return min(near, key=lambda v: (-v.score, v.index))


def _summary(verdicts: Sequence[TrialVerdict], chosen: TrialVerdict, rule: str) -> str:
    leader = verdicts[0]
    text = (f"trial {leader.index + 1} leads "
            f"({_interval_text(leader.score, leader.ci_low, leader.ci_high)})")
    if rule == BEST_SCORE:
        passed = _pick(verdicts)
        if passed is leader:
            return f"{text}: chosen ({BEST_SCORE}; no trial within noise is cheaper to serve)"
        return (f"{text}: chosen ({BEST_SCORE}; trial {passed.index + 1} is within noise and "
                f"{leader.cost / passed.cost:.1f}x cheaper to serve)")
    if chosen is leader:
        cheaper = [v for v in verdicts[1:] if v.within_noise]
        reason = ("no other trial is within noise of it" if not cheaper
                  else f"{len(cheaper)} trial(s) within noise are not cheaper to serve")
        return f"{text}: chosen ({reason})"
    d = chosen.difference
    assert d is not None
    ratio = leader.cost / chosen.cost
    return (f"{text}; trial {chosen.index + 1} is within noise "
            f"({_interval_text(d.value, d.ci_low, d.ci_high, signed=True)}) and "
            f"{ratio:.1f}x cheaper to serve: chosen")


def choose_trial(trials: Sequence[TrialEvidence], metric: str,
                 rule: str = CHEAPEST_WITHIN_NOISE) -> Choice:
    """Rank ``trials`` by cross-validated ``metric``, pair each with the leader, and choose
    by ``rule`` (:data:`RULES`): the cheapest not shown worse, or the leader.

    ``ValueError`` when there is no trial, for an unknown rule, or when the trials were not
    scored on the same images (their out-of-fold predictions cannot be paired).
    """
    if not trials:
        raise ValueError("the sweep produced no trials to choose from")
    if metric not in stats.METRICS:
        raise ValueError(f"metric must be one of {list(stats.METRICS)}, got {metric!r}")
    if rule not in RULES:
        raise ValueError(f"sweep_choice must be one of {list(RULES)}, got {rule!r}")
    verdicts = _ranked(trials, metric)
    chosen = verdicts[0] if rule == BEST_SCORE else _pick(verdicts)
    marked = tuple(dataclasses.replace(v, chosen=v is chosen) for v in verdicts)
    return Choice(metric=metric, verdicts=marked, leader=verdicts[0].index,
                  chosen=chosen.index, summary=_summary(verdicts, chosen, rule))


__all__ = ["BEST_SCORE", "CHEAPEST_WITHIN_NOISE", "COST_TOLERANCE", "RULES", "Choice",
           "TrialEvidence", "TrialVerdict", "choose_trial"]
