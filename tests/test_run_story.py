"""The registry decision on the pipeline's parent run: tags, description section, model link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.lib import run_story

CHAMPION = {"registered": True, "decision": "champion", "name": "iris", "version": "3",
            "alias": "champion", "reason": "beats champion v2", "metric_name": "balanced_accuracy",
            "comparison": {"method": "paired_bootstrap", "champion_version": "2",
                           "difference": 0.05, "difference_ci_low": 0.01,
                           "difference_ci_high": 0.09, "images": 59, "margin": 0.0}}


def test_section_links_the_version_and_gives_the_paired_comparison() -> None:
    text = run_story.decision_markdown(CHAMPION)
    assert "[iris v3](#/models/iris/versions/3)** got alias **@champion**: beats" in text
    assert ("champion v2 by paired bootstrap: balanced_accuracy difference +0.050 (95% "
            "interval [+0.010, +0.090] over 59 paired test images)") in text
    refused = run_story.decision_markdown({"registered": False, "reason": "gate failed"})
    assert "Not registered: gate failed." in refused


def test_section_replaces_its_earlier_self_and_keeps_the_rest() -> None:
    first = run_story.with_section("About this run.", run_story.decision_markdown(CHAMPION))
    again = run_story.with_section(first, "### Registry decision\n\nnew\n")
    assert again == "About this run.\n\n### Registry decision\n\nnew\n"


@pytest.mark.slow  # a fresh sqlite store: migrations take seconds
def test_parent_run_gets_tags_description_and_the_logged_model(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "a"))
    parent = client.create_run(experiment, tags={run_story.TAG_NOTE: "Pipeline run."})
    child = client.create_run(experiment, tags={run_story.TAG_PARENT: parent.info.run_id})
    model = client.create_logged_model(experiment, source_run_id=child.info.run_id)
    run_story.tell_parent(child.info.run_id, CHAMPION, model.model_id, client=client)
    got = client.get_run(parent.info.run_id)
    assert got.data.tags[run_story.TAG_DECISION] == "champion"
    assert got.data.tags[run_story.TAG_VERSION] == "iris v3"
    assert got.data.tags[run_story.TAG_NOTE].startswith("Pipeline run.\n\n### Registry decision")
    assert [m.model_id for m in got.outputs.model_outputs] == [model.model_id]


def test_trials_differing_only_in_pooling_get_distinct_model_names() -> None:
    settings = {"pooling": "avg_max", "head_c": 0.003, "weights": "/a/w.h5"}
    first = run_story.model_name("mobilenet_v2-a0.5-320px", 42, settings)
    assert re.fullmatch(r"iris-mobilenet_v2-a0\.5-320px-seed42-[0-9a-f]{6}", first)
    avg = {**settings, "pooling": "avg"}
    assert run_story.model_name("mobilenet_v2-a0.5-320px", 42, avg) != first
    # the weights file's path differs per machine: the name does not
    moved = {**settings, "weights": "/b/w.h5"}
    assert run_story.model_name("mobilenet_v2-a0.5-320px", 42, moved) == first
