"""Component ``select_model`` (sweeps only): the trial the sweep's rule chooses."""

from typing import List  # noqa: UP035 (KFP reads the annotation: List[Model], not list[Model])

from kfp.dsl import Input, Model, Output


def select_model(
    trained_models: Input[List[Model]],  # noqa: UP006
    tracking_uri: str,
    pipeline_run_id: str,
    pipeline_name: str,
    experiment_name: str,
    gate_metric: str,
    sweep_choice: str,
    selected_model: Output[Model],
) -> None:
    """Copy the trial the rule chooses on ``gate_metric`` into ``selected_model``: out of
    fold, paired and cost-aware (``sweep_choice``) when the trials were cross-validated, else
    the best validation score.

    The test split is not read: evaluation scores only the model chosen here.
    """
    from pipeline.config import PipelineConfig
    from pipeline.lib.params import SelectParams, TrackingParams, TrainParams
    from pipeline.lib.progress import report_step
    from pipeline.steps import select

    values = locals()
    selected_model.metadata.update(report_step(
        select.run_step, [model.path for model in trained_models],
        [model.metadata for model in trained_models],
        selected_model.path, SelectParams.from_mapping(values),
        TrackingParams.from_mapping(values),
        PipelineConfig().params_for(TrainParams).to_dict()))
