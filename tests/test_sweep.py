"""Sweeps: the sweep file's trials, the validation-only choice, and a two-trial local run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import PipelineConfig
from pipeline.lib.contract import META_RUN_ID, META_SWEEP, META_TRAIN_PARAMS
from pipeline.steps.select import SWEEP_FILE, Trial, rank_trials, select_trial, trial_labels
from pipeline.sweep import MAX_TRIALS, SAME_FOR_EVERY_TRIAL, SWEEPABLE, build_sweep, load_sweep
from tests.support.cli_helpers import V1_BACKBONE, clean_env, run_local_cli, set_flags, succeeded
from tests.support.paths import PROJECT_ROOT

#: Trial labels say how a trial departs from the default config's train settings.
DEFAULTS = PipelineConfig().to_dict()


# --- the sweep file ----------------------------------------------------------------------------
def test_trials_cross_the_grid_and_carry_every_swept_key_from_the_base() -> None:
    base = PipelineConfig(head_c=0.01, pooling="avg_max")
    sweep = build_sweep({"trials": [{}, {"pooling": "avg"}], "grid": {"tta_views": [0, 8]},
                         "parallelism": 3}, base)
    assert sweep.parallelism == 3
    assert sweep.keys == ("pooling", "tta_views")
    assert sweep.trials == (
        {"pooling": "avg_max", "tta_views": 0}, {"pooling": "avg_max", "tta_views": 8},
        {"pooling": "avg", "tta_views": 0}, {"pooling": "avg", "tta_views": 8})


def test_values_are_converted_by_type_and_environment_references_expanded() -> None:
    sweep = build_sweep({"trials": [{"weights": "${W_FILE}", "epochs": "7"},
                                    {"weights": "${UNSET_W:-none}"}]},
                        PipelineConfig(), environ={"W_FILE": "/data/w.h5"})
    assert sweep.trials == ({"epochs": 7, "weights": "/data/w.h5"},
                            {"epochs": 50, "weights": "none"})


@pytest.mark.parametrize(("spec", "message"), [
    ({"trial": [{}]}, "unknown sweep key(s) 'trial'"),
    ({"trials": [{}, {"batch_size": 8}]}, "a sweep cannot vary 'batch_size'"),
    ({"grid": {"split_seed": [1, 2]}}, "a sweep cannot vary 'split_seed'"),
    ({"trials": [{}, {"image_size": 100000}]},
     "trial 2 (image_size=100000): invalid config: image_size must be in [32, 1024]"),
    ({"trials": [{}, {"learning_rate": "nan"}]}, "trial 2 (learning_rate=nan)"),
    ({"trials": [{"pooling": "avg"}, {"pooling": "avg"}]}, "trial 2 (pooling=avg) repeats trial 1"),
    ({"trials": [{"pooling": "avg"}]}, "at least two trials"),
    ({"trials": [{}]}, "overrides nothing"),
    ({"grid": {"seed": list(range(MAX_TRIALS + 1))}}, f"at most {MAX_TRIALS}"),
    ({"grid": {"seed": []}}, "non-empty list"),
    ({"parallelism": 0, "grid": {"seed": [1, 2]}}, "parallelism must be an integer"),
    ({"trials": [{}, {"weights": "${NOT_SET_ANYWHERE}"}]}, "NOT_SET_ANYWHERE is not set"),
    ({"trials": [{}, {"weights": "https://u:hunter2@host/w.h5"}]}, "carries credentials"),
])
def test_bad_sweeps_are_refused_naming_the_problem(spec: dict, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        build_sweep(spec, PipelineConfig(), environ={})
    assert message in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_only_train_settings_no_other_step_reads_are_sweepable() -> None:
    from pipeline.lib.params import TrainParams
    from pipeline.stepspec import STEP_PARAMS

    others = {name for step, classes in STEP_PARAMS.items() if step != "train_model"
              for cls in classes for name in cls.field_names()}
    assert set(TrainParams.field_names()) - others - SAME_FOR_EVERY_TRIAL == SWEEPABLE
    # what the default sweep varies must stay sweepable
    assert {"backbone", "alpha", "pooling", "head_c", "image_size", "head_feature_views",
            "tta_views", "weights"} <= SWEEPABLE


def test_the_shipped_default_sweep_loads() -> None:
    sweep = load_sweep(PROJECT_ROOT / "sweeps" / "default.yaml", PipelineConfig(), environ={})
    labels = [label for label, _ in trial_labels(list(sweep.trials), DEFAULTS)]
    # trial 3 is the default config (the cross-validated choice); the last, the previous one
    assert labels.index("defaults") == 2
    assert labels[-1] == ("alpha=0.5, backbone=mobilenet_v2, image_size=320, pooling=avg_max, "
                          "tta_views=8")
    assert len(set(labels)) == len(labels) >= 6
    assert sweep.shared == {"cv_folds": 5}  # chosen out of fold, not on 59 validation images


def test_the_files_cv_folds_is_every_trials_and_wins_over_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A setting all trials share sits at the top of the file and becomes the run's base
    config, over ``--set`` as a trial's own settings are; a trial may not vary it."""
    seen: list[PipelineConfig] = []

    def fake_run(config: PipelineConfig, **kwargs: object) -> None:
        seen.append(config)
        raise KeyboardInterrupt  # stop here: the config is what this test is about

    monkeypatch.setattr("pipeline.cli.run_local", fake_run)
    spec = tmp_path / "sweep.yaml"
    spec.write_text("cv_folds: 4\ntrials:\n  - {}\n  - {pooling: avg_max}\n")
    main(["--local", "--sweep", str(spec), "--set", "cv_folds=0", "--set", "epochs=7",
          "--output-dir", str(tmp_path / "out")])
    assert (seen[-1].cv_folds, seen[-1].epochs) == (4, 7)
    # the replaced --set is named, though 0 is also the default value
    assert "sets cv_folds=4 for every trial, over cv_folds=0" in caplog.text
    spec.write_text("trials:\n  - {}\n  - {pooling: avg_max}\n")
    main(["--local", "--sweep", str(spec), "--set", "cv_folds=3",
          "--output-dir", str(tmp_path / "out")])
    assert seen[-1].cv_folds == 3  # no shared setting in the file: --set stands
    with pytest.raises(ValueError, match="cv_folds is shared by every trial: set it at the top"):
        build_sweep({"trials": [{"cv_folds": 0}, {"cv_folds": 3}]}, PipelineConfig())
    with pytest.raises(ValueError, match=r"cv_folds \(shared by every trial\).*2 to 20 folds"):
        build_sweep({"cv_folds": 1, "trials": [{}, {"pooling": "avg_max"}]}, PipelineConfig())
    with pytest.raises(ValueError, match=r"trial 2 .*frozen-backbone feature head"):
        build_sweep({"cv_folds": 5, "trials": [{}, {"head_feature_views": 0}]},
                    PipelineConfig())


def test_the_files_sweep_choice_is_the_rule_of_the_whole_sweep() -> None:
    """``sweep_choice`` (the select step's rule) is set once at the top of the file, checked
    like ``--set``, and a trial may not vary it."""
    trials = [{}, {"pooling": "avg_max"}]
    sweep = build_sweep({"cv_folds": 3, "sweep_choice": "best_score", "trials": trials},
                        PipelineConfig())
    assert sweep.shared == {"cv_folds": 3, "sweep_choice": "best_score"}
    assert sweep.base(PipelineConfig()).sweep_choice == "best_score"
    assert build_sweep({"trials": trials}, PipelineConfig()).base(
        PipelineConfig()).sweep_choice == "cheapest_within_noise"
    with pytest.raises(ValueError, match=r"sweep_choice \(shared by every trial\).*"
                                         r"cheapest_within_noise"):
        build_sweep({"sweep_choice": "cheapest", "trials": trials}, PipelineConfig())
    with pytest.raises(ValueError, match="sweep_choice is shared by every trial: set it at the "
                                         "top"):
        build_sweep({"trials": [{"sweep_choice": "best_score"}, {}]}, PipelineConfig())


def test_the_files_shared_setting_expands_variables_and_says_what_it_replaces(
        caplog: pytest.LogCaptureFixture) -> None:
    spec = {"cv_folds": "${FOLDS:-4}", "trials": [{}, {"pooling": "avg_max"}]}
    assert build_sweep(spec, PipelineConfig(), environ={}).shared == {"cv_folds": 4}
    sweep = build_sweep(spec, PipelineConfig(), environ={"FOLDS": "6"})
    assert sweep.shared == {"cv_folds": 6}
    with caplog.at_level("WARNING", logger="pipeline.sweep"):
        assert sweep.base(PipelineConfig()).cv_folds == 6  # over the default: nothing to say
        assert not caplog.records
        assert sweep.base(PipelineConfig(cv_folds=3)).cv_folds == 6
    assert "sets cv_folds=6 for every trial, over cv_folds=3" in caplog.text


def test_a_bad_sweep_file_exits_2_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started despite a bad sweep file")

    monkeypatch.setattr("pipeline.cli.run_local", no_work)
    monkeypatch.setattr("pipeline.cli.compile_pipeline", no_work)
    bad = tmp_path / "sweep.yaml"
    bad.write_text("trials:\n  - {}\n  - {gate_threshold: 0.9}\n")
    for mode in ("--local", "--compile"):
        assert main([mode, "--sweep", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"pipeline.py: error: sweep file {str(bad)!r}: a sweep cannot vary "
                              "'gate_threshold'"), err


# --- the choice ------------------------------------------------------------------------------
def _trial(run: str, val: float, test: float, **params: object) -> dict:
    """A trial's model metadata; ``balanced_accuracy`` stands for a test score it must ignore."""
    return {META_RUN_ID: run, "model_val_balanced_accuracy": val, "balanced_accuracy": test,
            META_TRAIN_PARAMS: {"pooling": DEFAULTS["pooling"], "head_c": 0.003, **params}}


def test_the_best_validation_score_wins_and_test_scores_are_ignored() -> None:
    other_pooling = "avg_max" if DEFAULTS["pooling"] == "avg" else "avg"
    trials = [_trial("a", 0.60, 0.90), _trial("b", 0.70, 0.40, head_c=0.03),
              _trial("c", 0.70, 0.95, pooling=other_pooling)]
    ranked = rank_trials(trials, "balanced_accuracy", DEFAULTS)
    assert [t.run_id for t in ranked] == ["b", "c", "a"]  # tie: the earlier trial first
    assert ranked[0].label == "head_c=0.03" and ranked[2].label == "defaults"


def test_labels_undo_kfp_metadata_number_widening_and_shorten_paths() -> None:
    """KFP metadata hands ``image_size`` 320 back as 320.0; weights paths are long."""
    assert DEFAULTS["image_size"] == 224
    trials = [_trial("a", 0.6, 0.6, image_size=224.0, weights="/data/w/v1.h5"),
              _trial("b", 0.7, 0.6, image_size=320.0, weights="/data/w/v2.h5"),
              _trial("c", 0.5, 0.6, image_size=224.0, weights="/data/w/v1.h5", head_c=0.03)]
    ranked = rank_trials(trials, "balanced_accuracy", DEFAULTS)
    assert [t.label for t in ranked] == ["image_size=320, weights=v2.h5", "weights=v1.h5",
                                        "head_c=0.03, weights=v1.h5"]
    assert ranked[0].overrides["image_size"] == 320
    assert isinstance(ranked[0].overrides["image_size"], int)


def test_a_trial_without_its_validation_score_is_an_error_not_a_loss() -> None:
    trials = [_trial("a", 0.6, 0.6), {META_RUN_ID: "b", META_TRAIN_PARAMS: {}}]
    with pytest.raises(ValueError, match=r"trial 2 .* no validation score "
                                         r"'model_val_balanced_accuracy'"):
        rank_trials(trials, "balanced_accuracy", DEFAULTS)


def test_select_copies_the_winner_with_its_metadata_and_the_verdict(tmp_path: Path) -> None:
    dirs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.keras").write_text(f"model {name}")
        dirs.append(tmp_path / name)
    metadata, _ranked = select_trial(
        dirs, [_trial("a", 0.5, 0.9), _trial("b", 0.8, 0.1, head_c=1.0)],
        tmp_path / "out", "balanced_accuracy", DEFAULTS)
    assert (tmp_path / "out" / "model.keras").read_text() == "model b"
    assert metadata[META_RUN_ID] == "b"
    verdict = json.loads((tmp_path / "out" / SWEEP_FILE).read_text())
    assert verdict == metadata[META_SWEEP]
    assert verdict["winner"] == 1 and [t["val_score"] for t in verdict["trials"]] == [0.5, 0.8]
    assert verdict["trials"][1]["overrides"] == {"head_c": 1.0}


@pytest.mark.slow  # an MLflow SQLite store: its schema migrations take 5-20 s
def test_trial_runs_say_their_rank_and_the_choice_in_name_and_description(
        tmp_path: Path) -> None:
    """The MLflow UI shows run names first; the ``sweep.*`` tags sit low in the tag table."""
    from mlflow.tracking import MlflowClient

    from pipeline.steps.select import _tag_runs

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("sweep")
    parent, first, second = (client.create_run(experiment).info.run_id for _ in range(3))
    client.update_run(parent, name="trial 1 · iris-image.zip · 12-02 22:00")
    ranked = [Trial(1, "head_c=1.0", 0.8, second, {}), Trial(0, "pooling=avg", 0.7, first, {})]
    # cross-validated: the out-of-fold scores rank, not the validation scores
    verdict = {"metric": "cv_balanced_accuracy", "summary": "trial 2 leads: chosen",
               "trials": [{"trial": 0, "val_score": 0.7, "cv_score": 0.66},
                          {"trial": 1, "val_score": 0.8, "cv_score": 0.71}]}
    _tag_runs(client, ranked, ranked[0], parent, verdict)

    winner, loser = client.get_run(second), client.get_run(first)
    assert winner.info.run_name == "train · #1 of 2, chosen · head_c=1.0"
    assert loser.info.run_name == "train · #2 of 2 · pooling=avg"
    assert loser.data.tags["mlflow.note.content"] == (
        "Sweep trial 1 (pooling=avg): cv_balanced_accuracy 0.6600, rank 2 of 2; "
        "not chosen (trial 2, head_c=1.0, scored 0.7100).")
    # the score each trial was ranked by, under a name MLflow's Compare view plots first
    assert loser.data.metrics == {"choice/cv_balanced_accuracy": 0.66}
    assert winner.data.metrics == {"choice/cv_balanced_accuracy": 0.71}
    assert client.get_run(parent).data.tags["sweep.winner"] == (
        "head_c=1.0 (cv_balanced_accuracy 0.710)")
    assert "rank 1 of 2; chosen" in winner.data.tags["mlflow.note.content"]
    assert (client.get_run(parent).info.run_name
            == "sweep of 2: head_c=1.0 · iris-image.zip · 12-02 22:00")


# --- end to end: two trials through kfp.local ------------------------------------------------
@pytest.mark.slow  # two small trainings plus the pipeline's other steps: about 1.5 minutes
def test_a_local_two_trial_sweep_registers_only_the_trial_best_on_validation(
        tmp_path: Path, iris_zip: Path, mobilenet_weights: Path) -> None:
    from mlflow.tracking import MlflowClient

    sweep = tmp_path / "sweep.yaml"
    # parallelism 2 is for a cluster: locally the trials must still train one at a time
    sweep.write_text("parallelism: 2\ntrials:\n  - {head_c: 0.0001, pooling: avg_max}\n"
                     "  - {head_c: 1.0}\n")
    run = run_local_cli(
        tmp_path, "--data", str(iris_zip), "--sweep", str(sweep), "--set", "epochs=2",
        "--set", "image_size=96", "--set", f"weights={mobilenet_weights}", *set_flags(*V1_BACKBONE),
        "--set", "gate_threshold=0", env=clean_env(TF_CPP_MIN_LOG_LEVEL="2"))
    summary = succeeded(run)

    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    parent = summary["mlflow"]["run_id"]
    trains = client.search_runs([summary["mlflow"]["experiment_id"]],
                                f"tags.`mlflow.parentRunId` = '{parent}' "
                                "AND tags.`kfp.step` = 'train'")
    assert len(trains) == 2
    val = {r.info.run_id: r.data.metrics["model_val_balanced_accuracy"] for r in trains}
    for train in trains:  # MLflow's Compare view plots a run's alphabetically first metric
        assert min(train.data.metrics) == "choice/model_val_balanced_accuracy"
        assert train.data.metrics[min(train.data.metrics)] == val[train.info.run_id]
    (winner,) = [r for r in trains if r.data.tags["sweep.chosen"] == "true"]
    assert val[winner.info.run_id] == max(val.values())
    assert winner.data.tags["sweep.rank"] == "1"
    # labelled by departures from the default config, so the first trial is not "base"
    assert {r.data.tags["sweep.trial"] for r in trains} == {"head_c=0.0001, pooling=avg_max",
                                                            "head_c=1.0"}
    parent_run = client.get_run(parent)
    assert parent_run.data.tags["sweep.winner_run_id"] == winner.info.run_id
    # the parent's name carries every swept value of the winner, the defaults' pooling too
    every_swept_value = {"head_c=0.0001, pooling=avg_max": "head_c=0.0001, pooling=avg_max",
                         "head_c=1.0": "head_c=1.0, pooling=avg"}
    assert parent_run.info.run_name.startswith(
        f"sweep of 2: {every_swept_value[winner.data.tags['sweep.trial']]} · ")

    # only the winner went on: evaluated, registered from its own train run
    assert summary["mlflow"]["step_run_ids"]["train"] == winner.info.run_id
    versions = client.search_model_versions(f"name = '{summary['registration']['name']}'")
    assert [v.run_id for v in versions] == [winner.info.run_id]
    chosen = summary["sweep"]["trials"][int(summary["sweep"]["winner"])]
    assert chosen["run_id"] == winner.info.run_id
    assert "<- chosen, evaluated on test" in run.stderr
    lines = run.stdout.splitlines()
    done = [n for n, line in enumerate(lines) if re.search(r"train-model \d/2 done", line)]
    started = [n for n, line in enumerate(lines) if re.search(r"train-model \d/2 \.\.\.$", line)]
    assert len(done) == len(started) == 2 and started[1] > done[0], lines  # one after another
    assert all("train-model" in line for line in lines[started[0]:done[1] + 1]), lines
