"""Cross-validated training (``cv_folds``): the fold loop, the train step's records, the select
step's paired cost-aware rule, and the refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import PipelineConfig
from pipeline.lib import crossval, inputs, stats
from pipeline.lib.contract import (
    CROSS_VALIDATION_FILE,
    META_RUN_ID,
    META_SERVING_MS,
    META_SWEEP,
    META_TRAIN_PARAMS,
    OOF_PREDICTIONS_FILE,
)
from pipeline.lib.feature_head import head_model, l2_strength
from pipeline.lib.training import class_weights_for, compile_model
from pipeline.steps.select import SWEEP_FILE, select_trial
from pipeline.sweep import build_sweep
from tests.support.train_helpers import tiny_prepared_data, tiny_train

#: Trial labels say how a trial departs from the default config's train settings.
DEFAULTS = PipelineConfig().to_dict()

CLASSES = ("a", "b", "c")


def _features(count: int, width: int, seed: int, signal: float = 0.0
              ) -> crossval.PooledFeatures:
    """Random features of ``count`` images in two views; ``signal`` adds the label to one
    coordinate per class (0: labels unrelated to the features)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(CLASSES)
    x = rng.normal(size=(2, count, width)).astype(np.float32)
    x[:, np.arange(count), labels] += signal
    ids = tuple(hashlib.sha256(f"image{i}".encode()).hexdigest() for i in range(count))
    return crossval.PooledFeatures(ids, labels, x, x[:1], 0)


def _config(**overrides: object):
    return tiny_train(**{"cv_folds": 3, "epochs": 20, "early_stopping_patience": 0,
                         **overrides})


def test_held_out_images_are_never_trained_on() -> None:
    """Labels unrelated to the features: a head that memorizes its rows (weak penalty) scores
    about chance out of fold, and near 1.0 only if a fold's images leaked into its own head."""
    features = _features(30, 128, seed=0)
    features = dataclasses.replace(
        features, labels=np.random.default_rng(1).permutation(features.labels))
    config = _config(head_c=1e4, learning_rate=0.05, epochs=10, seed=1)
    cv = crossval.cross_validate(features, CLASSES, config)
    assert cv.scores()["accuracy"] < 0.6
    seen, _ = crossval.HeadTrainer(128, 3, config).fit(features.training, features.labels, 10)
    memorized = seen.linear().view_probabilities(features.scoring).argmax(axis=1)
    assert (memorized == features.labels).mean() > 0.85  # what a leak would score
    assert len(cv.fold_scores) == len(cv.best_epochs) == 3
    assert sorted(cv.predictions.image_ids) == sorted(features.image_ids)
    summary = cv.summary()
    assert (summary["cv_accuracy_ci_low"] <= summary["cv_accuracy"]
            <= summary["cv_accuracy_ci_high"])
    assert len(summary["cv_fold_accuracy"]) == 3


def test_two_trials_hold_out_the_same_images_whatever_their_seed_and_order() -> None:
    """Folds follow the contents (no trial setting enters), so trials pair image by image."""
    features = _features(18, 4, seed=2)
    first = crossval.cross_validate(features, CLASSES, _config(cv_folds=2, epochs=2, seed=1))
    order = np.random.default_rng(3).permutation(18)
    shuffled = crossval.PooledFeatures(
        tuple(features.image_ids[i] for i in order), features.labels[order],
        features.training[:, order], features.scoring[:, order], 0)
    second = crossval.cross_validate(shuffled, CLASSES,
                                     _config(cv_folds=2, epochs=2, seed=2, head_c=0.1))
    fold_of = dict(zip(first.predictions.image_ids, first.folds.tolist(), strict=True))
    assert [fold_of[i] for i in second.predictions.image_ids] == second.folds.tolist()
    assert sorted(np.bincount(first.folds).tolist()) == [9, 9]


def _keras_head_weights(training: np.ndarray, labels: np.ndarray, config, epochs: int
                        ) -> list[np.ndarray]:
    """A head fitted as the train step fits one: a model of its own, with its own L2,
    compiled for this fit alone."""
    views, _, width = training.shape
    x, y = training.reshape(-1, width), np.tile(labels, views)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    model = head_model(width, len(CLASSES), keras.regularizers.L2(l2_strength(config, len(y))))
    batches, steps = inputs.epoch_batches(
        tf.data.Dataset.from_tensor_slices(((x - mean) / std, y)), len(y), config,
        first_epoch=0, last_epoch=epochs, augmenter=None)
    compile_model(model, config.learning_rate, config, steps_per_execution=steps)
    model.fit(batches, epochs=epochs, steps_per_epoch=steps, shuffle=False, verbose=0,
              class_weight=class_weights_for(labels, len(CLASSES)))
    return model.get_weights()


def test_a_head_fitted_after_another_fold_is_the_head_fitted_on_its_own() -> None:
    """The fold heads share one compiled model (one traced training loop): a fit that follows
    another fold's, with other rows (so another L2 strength) and the optimizer moved on,
    gives the very weights of a head compiled and fitted on its own from the same seed."""
    features = _features(24, 6, seed=6, signal=1.0)
    config = _config(epochs=6, learning_rate=0.2, head_c=0.05, seed=3)
    first, second = np.arange(24) < 21, np.arange(24) >= 2  # 21 and 22 images: 6 steps each
    trainer = crossval.HeadTrainer(6, len(CLASSES), config)
    trainer.fit(features.training[:, first], features.labels[first], 6)
    keras.utils.set_random_seed(9)
    reused, _ = trainer.fit(features.training[:, second], features.labels[second], 6)
    keras.utils.set_random_seed(9)
    alone = _keras_head_weights(features.training[:, second], features.labels[second],
                                config, 6)
    assert trainer.compilations == 1
    for got, expected in zip(reused.model.get_weights(), alone, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_each_fold_head_scores_the_extra_images_as_it_scored_its_own_fold() -> None:
    """``also_score`` (the fold-ensemble bench's test split) goes through the very heads that
    made the out-of-fold predictions, in fold order: given the train + validation features
    themselves (reversed), fold i's row of ``fold_probabilities`` repeats its fold's numbers."""
    features = _features(18, 4, seed=4, signal=2.0)
    cv = crossval.cross_validate(features, CLASSES, _config(cv_folds=3, epochs=3, seed=1),
                                 also_score=features.scoring[:, ::-1])
    assert cv.fold_probabilities.shape == (3, 18, len(CLASSES))
    for fold in range(3):
        held = cv.folds == fold
        np.testing.assert_allclose(cv.fold_probabilities[fold][::-1][held],
                                   cv.predictions.probabilities[held], rtol=1e-5)
    assert crossval.cross_validate(features, CLASSES, _config(cv_folds=3, epochs=1)
                                   ).fold_probabilities is None


def test_the_exported_head_is_the_fold_heads_averaged_into_one_dense_layer() -> None:
    """``cv.head`` (what the train step folds into the model) gives, as the model's one Dense
    softmax layer, the softmax of the mean of the fold heads' logits; each fold head's logits
    on raw features are its standardized head's."""
    from pipeline.lib import models

    features = _features(24, 5, seed=8, signal=1.5)
    config = _config(cv_folds=3, epochs=4, seed=2)
    cv = crossval.cross_validate(features, CLASSES, config)
    x = features.scoring[0]
    fold_logits = [x @ h.kernel + h.bias for h in cv.fold_heads]
    assert len(fold_logits) == 3 and not np.allclose(fold_logits[0], fold_logits[1])
    core = head_model(5, len(CLASSES), keras.regularizers.L2(0.0))
    cv.head.fold_into(core)
    mean_logits = np.mean(fold_logits, axis=0)
    expected = np.exp(mean_logits) / np.exp(mean_logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(core(x)), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cv.head.view_probabilities(features.scoring), expected,
                               rtol=1e-4, atol=1e-6)
    fitted, _ = crossval.HeadTrainer(5, len(CLASSES), config).fit(
        features.training, features.labels, 2)
    standardized = ((x - fitted.mean) / fitted.std).astype(np.float32)
    np.testing.assert_allclose(fitted.linear().view_probabilities(x[None]),
                               np.asarray(fitted.model(standardized)), rtol=1e-4, atol=1e-6)
    assert core.get_layer(models.HEAD).get_weights()[0].shape == (5, len(CLASSES))


def test_more_folds_than_a_class_has_images_is_refused_naming_the_class() -> None:
    features = _features(12, 4, seed=0)  # 4 images per class
    with pytest.raises(ValueError, match=r"class 'a' has distinct .* \(4\).*cv_folds <= 4"):
        crossval.cross_validate(features, CLASSES, _config(cv_folds=5))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"cv_folds": 1}, "needs 2 to 20 folds"),
    ({"cv_folds": 21}, r"cv_folds must be in \[0, 20\]"),
    ({"cv_folds": 5, "fine_tune_epochs": 2}, "each fold would be a full training"),
    ({"cv_folds": 5, "head_feature_views": 0}, "frozen-backbone feature head"),
    ({"cv_folds": 5, "model": "seed_cnn", "image_size": 128}, "frozen-backbone feature head"),
])
def test_cv_folds_the_pipeline_cannot_run_are_config_errors(overrides: dict,
                                                            message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PipelineConfig(**overrides)


def test_a_sweep_cannot_vary_cv_folds() -> None:
    with pytest.raises(ValueError, match="cannot vary 'cv_folds'"):
        build_sweep({"trials": [{"cv_folds": 0}, {"cv_folds": 3}]}, PipelineConfig())


def test_out_of_fold_predictions_cover_train_and_val_once_and_no_test_image(
        tmp_path: Path) -> None:
    from pipeline.lib import models
    from pipeline.lib.feature_cache import FeatureCache

    data_dir = tiny_prepared_data(tmp_path)
    config = tiny_train(cv_folds=3, early_stopping_patience=2, tta_views=2)
    features = crossval.pooled_features(models.build_model(config, 3), data_dir, config,
                                        inputs.build_augmenter(config),
                                        cache=FeatureCache(tmp_path / "cache"))
    assert features.training.shape[:2] == (2, 20) and features.scoring.shape[:2] == (2, 20)
    assert features.computed == 3 * 20  # the plain view once, for training and scoring
    cv = crossval.cross_validate(features, ["a", "b", "c"], config)
    expected = [*inputs.read_index(data_dir, "train")[0], *inputs.read_index(data_dir, "val")[0]]
    assert sorted(cv.predictions.image_ids) == sorted(expected)  # each exactly once
    assert not set(cv.predictions.image_ids) & set(inputs.read_index(data_dir, "test")[0])
    for fold in range(3):  # every fold holds every class
        assert set(cv.predictions.labels[cv.folds == fold].tolist()) == {0, 1, 2}


@pytest.mark.slow  # a tiny training with its export: about 15 s on idle cores
def test_the_train_step_records_the_cross_validation_in_the_model_folder(
        tmp_path: Path) -> None:
    from pipeline.steps.train import train_model

    data_dir = tiny_prepared_data(tmp_path)
    result = train_model(data_dir, tmp_path / "model",
                         tiny_train(cv_folds=3, early_stopping_patience=2, tta_views=2))
    oof = stats.Predictions.read_csv(tmp_path / "model" / OOF_PREDICTIONS_FILE)
    expected = [*inputs.read_index(data_dir, "train")[0], *inputs.read_index(data_dir, "val")[0]]
    assert sorted(oof.image_ids) == sorted(expected)
    figures = json.loads((tmp_path / "model" / CROSS_VALIDATION_FILE).read_text())
    assert figures["cv_folds"] == 3 and figures["cv_images"] == len(expected)
    assert figures["cv_balanced_accuracy"] == pytest.approx(
        stats.score(oof.labels, oof.predicted, 3)["balanced_accuracy"])
    assert result.model_val_balanced_accuracy == pytest.approx(figures["cv_balanced_accuracy"])
    assert figures[META_SERVING_MS] > 0
    assert len(figures["cv_best_epochs"]) == 3 and "cv_final_epochs" not in figures


# --- the select step on cross-validated trials -------------------------------------------
def _oof_trial(folder: Path, correct: list[bool], cost: float, run: str,
               **params: object) -> dict:
    """A trial folder holding out-of-fold predictions (right where ``correct``) and metadata."""
    folder.mkdir()
    labels = np.arange(len(correct)) % 3
    predicted = np.where(correct, labels, (labels + 1) % 3)
    probabilities = np.eye(3)[predicted]
    ids = tuple(hashlib.sha256(f"{i}".encode()).hexdigest() for i in range(len(correct)))
    oof = stats.Predictions(ids, labels, predicted, probabilities, CLASSES)
    oof.write_csv(folder / OOF_PREDICTIONS_FILE)
    (folder / "model.keras").write_text(run)
    score = stats.score(labels, predicted, 3)["balanced_accuracy"]
    return {META_RUN_ID: run, "model_val_balanced_accuracy": score,
            "cv_balanced_accuracy": score, META_SERVING_MS: cost,
            META_TRAIN_PARAMS: {"tta_views": 8, **params}}


def test_select_takes_the_cheaper_trial_within_noise_of_the_leader(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.random(120) < 0.7
    slower = base.copy()
    slower[np.flatnonzero(~base)[:3]] = True  # 3 more right: better, within noise
    metas = [_oof_trial(tmp_path / "slow", list(slower), 40.0, "slow"),
             _oof_trial(tmp_path / "fast", list(base), 10.0, "fast", tta_views=0)]
    metadata, ranked = select_trial([tmp_path / "slow", tmp_path / "fast"], metas,
                                    tmp_path / "out", "balanced_accuracy", DEFAULTS)
    assert [t.run_id for t in ranked] == ["slow", "fast"]  # ranked by score
    assert metadata[META_RUN_ID] == "fast"
    assert (tmp_path / "out" / "model.keras").read_text() == "fast"
    verdict = json.loads((tmp_path / "out" / SWEEP_FILE).read_text())
    assert verdict == metadata[META_SWEEP]
    assert verdict["metric"] == "cv_balanced_accuracy" and verdict["winner"] == 1
    assert verdict["summary"].startswith("trial 1 leads")
    assert "trial 2 is within noise" in verdict["summary"] and "4.0x cheaper" in verdict["summary"]
    assert verdict["rule"] == "cross-validated, paired: cheapest within noise"
    fast = verdict["trials"][1]
    assert fast["difference"]["value"] < 0 <= fast["difference"]["ci_high"]
    assert verdict["trials"][0]["difference"] is None
    # sweep_choice=best_score: serving cost does not matter, the leader is taken
    metadata, _ = select_trial([tmp_path / "slow", tmp_path / "fast"], metas, tmp_path / "out",
                               "balanced_accuracy", DEFAULTS, "best_score")
    assert metadata[META_RUN_ID] == "slow"
    assert (tmp_path / "out" / "model.keras").read_text() == "slow"
    verdict = metadata[META_SWEEP]
    assert verdict["rule"] == "cross-validated, paired: best score" and verdict["winner"] == 0
    assert verdict["summary"].endswith(
        ": chosen (best_score; trial 2 is within noise and 4.0x cheaper to serve)")


def test_the_select_step_names_each_trial_run_by_its_out_of_fold_rank(
        tmp_path: Path, new_sqlite_store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trial runs in MLflow say the choice: ranked by the out-of-fold score, the cheaper
    trial within noise chosen although it ranks second."""
    from mlflow.tracking import MlflowClient

    from pipeline.lib import tracking_runs
    from pipeline.lib.params import SelectParams, TrackingParams
    from pipeline.steps import select

    monkeypatch.chdir(tmp_path)
    uri = new_sqlite_store("select")
    tracking = TrackingParams(tracking_uri=uri, experiment_name="sweep", pipeline_run_id="p-1",
                              pipeline_name="iris-image-pipeline")
    run_ids = []
    for _ in range(2):
        with tracking_runs.tracked_step("train", tracking, {}) as run:
            run_ids.append(run.info.run_id)
    base = np.random.default_rng(0).random(120) < 0.7
    better = base.copy()
    better[np.flatnonzero(~base)[:3]] = True  # 3 more right: the leader, within noise
    metas = [_oof_trial(tmp_path / "slow", list(better), 40.0, run_ids[0]),
             _oof_trial(tmp_path / "fast", list(base), 10.0, run_ids[1], tta_views=0)]
    select.run_step([tmp_path / "slow", tmp_path / "fast"], metas, tmp_path / "out",
                    SelectParams(gate_metric="balanced_accuracy",
                                 sweep_choice="cheapest_within_noise"), tracking, DEFAULTS)
    leader, chosen = (MlflowClient(uri).get_run(run_id) for run_id in run_ids)
    assert [leader.data.tags["sweep.rank"], chosen.data.tags["sweep.rank"]] == ["1", "2"]
    assert [leader.data.tags["sweep.chosen"], chosen.data.tags["sweep.chosen"]] == [
        "false", "true"]
    assert chosen.info.run_name.startswith("train · #2 of 2, chosen · ")
    assert leader.info.run_name.startswith("train · #1 of 2 · ")
    assert chosen.data.metrics["choice/cv_balanced_accuracy"] < leader.data.metrics[
        "choice/cv_balanced_accuracy"]


def test_select_keeps_the_leader_when_the_cheaper_trial_is_shown_worse(tmp_path: Path) -> None:
    good = [True] * 100 + [False] * 20
    bad = [True] * 60 + [False] * 60
    metas = [_oof_trial(tmp_path / "slow", good, 40.0, "slow"),
             _oof_trial(tmp_path / "fast", bad, 10.0, "fast", tta_views=0)]
    metadata, _ = select_trial([tmp_path / "slow", tmp_path / "fast"], metas,
                               tmp_path / "out", "balanced_accuracy", DEFAULTS)
    assert metadata[META_RUN_ID] == "slow"
    assert not metadata[META_SWEEP]["trials"][1]["within_noise"]


def test_select_refuses_a_sweep_where_only_some_trials_were_cross_validated(
        tmp_path: Path) -> None:
    metas = [_oof_trial(tmp_path / "a", [True] * 30, 10.0, "a"),
             {META_RUN_ID: "b", "model_val_balanced_accuracy": 0.5,
              META_TRAIN_PARAMS: {"tta_views": 0}}]
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=r"trial\(s\) \[2\] have no out-of-fold predictions"):
        select_trial([tmp_path / "a", tmp_path / "b"], metas, tmp_path / "out",
                     "balanced_accuracy", DEFAULTS)


# --- end to end: a cross-validated two-trial sweep through kfp.local -----------------------
@pytest.mark.slow  # two small cross-validated trainings plus the other steps: about 2 minutes
def test_a_cross_validated_two_trial_sweep_registers_the_rules_choice(
        tmp_path: Path, iris_zip: Path, mobilenet_weights: Path) -> None:
    from mlflow.tracking import MlflowClient

    from tests.support.cli_helpers import (
        V1_BACKBONE,
        clean_env,
        run_local_cli,
        set_flags,
        succeeded,
    )

    sweep = tmp_path / "sweep.yaml"
    # cv_folds for every trial, from the file's top (as sweeps/default.yaml sets it)
    sweep.write_text("cv_folds: 3\ntrials:\n  - {tta_views: 2}\n  - {tta_views: 0}\n")
    run = run_local_cli(
        tmp_path, "--data", str(iris_zip), "--sweep", str(sweep), "--set", "epochs=5",
        "--set", "image_size=64", "--set", f"weights={mobilenet_weights}",
        *set_flags(*V1_BACKBONE), "--set", "head_feature_views=1",
        "--set", "gate_threshold=0", env=clean_env(TF_CPP_MIN_LOG_LEVEL="2"))
    summary = succeeded(run)
    verdict = summary["sweep"]
    assert verdict["metric"] == "cv_balanced_accuracy"
    chosen = verdict["trials"][int(verdict["winner"])]
    assert verdict["summary"] in run.stdout  # the select step's line
    assert summary["cross_validation"]["cv_folds"] == 3
    assert "cross-validated" in run.stderr  # the closing block, beside the test score

    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    winner = client.get_run(chosen["run_id"])
    assert winner.data.tags["sweep.chosen"] == "true"
    # ranked by the out-of-fold score (the cost-aware rule may choose another than the first)
    ranks = sorted(verdict["trials"], key=lambda t: -t["cv_score"])
    assert winner.data.tags["sweep.rank"] == str(ranks.index(chosen) + 1)
    assert "cv_balanced_accuracy_ci_low" in winner.data.metrics
    # the out-of-fold score ranked the trials: MLflow's Compare view plots it first
    assert min(winner.data.metrics) == "choice/cv_balanced_accuracy"
    assert winner.data.metrics["choice/cv_balanced_accuracy"] == pytest.approx(
        chosen["cv_score"])
    assert "serving_ms_per_image" in winner.data.metrics
    assert OOF_PREDICTIONS_FILE in {a.path for a in client.list_artifacts(winner.info.run_id)}
    parent = client.get_run(summary["mlflow"]["run_id"])
    settings = f"tta_views={int(chosen['overrides']['tta_views'])}"
    assert parent.info.run_name.startswith(f"sweep of 2: {settings}")
    assert parent.data.params["sweep_choice"] == "cheapest_within_noise"  # the select step's
    versions = client.search_model_versions(f"name = '{summary['registration']['name']}'")
    assert [v.run_id for v in versions] == [winner.info.run_id]


# --- the terminal ------------------------------------------------------------------------------
def test_cv_folds_of_one_exits_2_before_any_work(capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    assert main(["--compile", "--set", "cv_folds=1"]) == 2
    assert "cv_folds=1: cross-validation needs 2 to 20 folds" in capsys.readouterr().err


def test_the_closing_block_shows_the_cross_validated_estimate_and_the_paired_ranking() -> None:
    from pipeline.cli_closing import closing_block

    sweep = {"metric": "cv_balanced_accuracy", "winner": 1, "summary": "trial 1 leads (...)",
             "trials": [
                 {"trial": 0, "label": "base", "cv_score": 0.70, "cv_ci_low": 0.6,
                  "cv_ci_high": 0.8, "serving_ms_per_image": 40.0, "difference": None},
                 {"trial": 1, "label": "tta_views=0", "cv_score": 0.68, "cv_ci_low": 0.58,
                  "cv_ci_high": 0.78, "serving_ms_per_image": 10.0,
                  "difference": {"value": -0.02, "ci_low": -0.06, "ci_high": 0.01}}]}
    summary = {
        "test_metrics": {"balanced_accuracy": 0.6, "balanced_accuracy_ci_low": 0.45,
                         "balanced_accuracy_ci_high": 0.75, "test_examples": 59.0},
        "majority_baseline": None, "interval_method": "stratified bootstrap",
        "cross_validation": {"cv_folds": 5, "cv_images": 300,
                             "cv_balanced_accuracy": 0.68, "cv_balanced_accuracy_ci_low": 0.62,
                             "cv_balanced_accuracy_ci_high": 0.73,
                             "cv_fold_balanced_accuracy": [0.7] * 5},
        "sweep": sweep,
        "gate": {"metric": "balanced_accuracy", "value": 0.6, "threshold": 0.5, "passed": True},
        "registration": None, "mlflow": {"run_id": "r", "experiment_name": "e",
                                         "experiment_id": "1", "tracking_uri": "sqlite:///m.db"},
        "data": {"sha256": "ab" * 32, "sha256_checked": True}, "run_dir": "/w",
        "elapsed_s": 1.0, "cached_steps": [],
    }
    lines = closing_block(summary)
    assert lines[2] == "cross-validated:      balanced_accuracy 0.680 [0.620, 0.730]"
    assert lines[3].endswith("(out of fold, 5 folds over the 300 train + validation images; "
                             "the model: the 5 fold heads averaged)")
    assert "sweep: trial 1 leads (...)" in lines
    assert ("  0.680 [0.580, 0.780]  -0.020 [-0.060, +0.010]  10.0 ms  trial 2: tta_views=0"
            "  <- chosen, evaluated on test") in lines


def test_the_step_lines_give_the_cross_validated_score_and_the_rules_sentence() -> None:
    from pipeline.stepspec import STEP_SPECS

    train = STEP_SPECS["train_model"].show({
        "cv_balanced_accuracy": 0.68, "cv_balanced_accuracy_ci_low": 0.62,
        "cv_balanced_accuracy_ci_high": 0.73, "cv_folds": 5.0,
        META_SERVING_MS: 41.5, "model_val_balanced_accuracy": 0.68})
    assert train == ("cross-validated balanced_accuracy 0.680 [0.620, 0.730] over 5 folds, "
                     "their heads averaged; serving 41.5 ms/image")
    sentence = "trial 1 leads (0.700 [0.600, 0.800]): chosen (no other trial is within noise)"
    select = STEP_SPECS["select_model"].show({META_SWEEP: {
        "winner": 0, "summary": sentence, "metric": "cv_balanced_accuracy",
        "trials": [{"trial": 0, "label": "defaults", "val_score": 0.7, "cv_score": 0.7}]}})
    assert select == sentence
