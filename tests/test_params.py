"""Each step reads only fields its component receives, checked from the code itself."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from pathlib import Path

import pytest

from pipeline import dag
from pipeline.config import PipelineConfig
from pipeline.lib import params as params_module
from pipeline.lib.params import StepParams, TrainParams
from pipeline.stepspec import STEP_PARAMS
from pipeline.tasks import STEP_FUNCTIONS, TRACKING_URI_PARAM, context_inputs

PACKAGE = Path(params_module.__file__).resolve().parents[1]
PARAM_CLASSES = {cls.__name__: cls for classes in STEP_PARAMS.values() for cls in classes}
#: Methods of a params object a function may call besides reading fields.
PARAM_METHODS = {name for name, _ in inspect.getmembers(StepParams, callable)}


def _component_inputs(func: typing.Callable) -> set[str]:
    return set(inspect.signature(func).parameters)


@pytest.mark.parametrize("func", STEP_FUNCTIONS, ids=lambda f: f.__name__)
def test_each_component_declares_every_field_of_the_params_its_step_takes(func) -> None:
    declared = _component_inputs(func)
    for cls in STEP_PARAMS[func.__name__]:
        missing = set(cls.field_names()) - declared
        assert not missing, f"{func.__name__} does not receive {sorted(missing)} of {cls.__name__}"
        assert f"{cls.__name__}.from_mapping" in inspect.getsource(func), func.__name__


@pytest.mark.parametrize("func", STEP_FUNCTIONS, ids=lambda f: f.__name__)
def test_each_component_declares_no_config_field_its_step_does_not_take(func) -> None:
    taken = {name for cls in STEP_PARAMS[func.__name__] for name in cls.field_names()}
    config_fields = set(PipelineConfig.field_names())
    unused = (_component_inputs(func) & config_fields) - taken
    assert not unused, f"{func.__name__} declares {sorted(unused)} but its step never reads them"


def _params_reads(tree: ast.AST) -> list[tuple[str, str, str, int]]:
    """(function, params class, attribute, line) for every attribute read on a parameter
    annotated with a params class, in every function of ``tree``."""
    reads = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        typed = {}
        for arg in [*node.args.args, *node.args.kwonlyargs]:
            annotation = ast.unparse(arg.annotation) if arg.annotation else ""
            if annotation.strip("'\"") in PARAM_CLASSES:
                typed[arg.arg] = annotation.strip("'\"")
        for inner in ast.walk(node):
            if (isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name)
                    and inner.value.id in typed):
                reads.append((node.name, typed[inner.value.id], inner.attr, inner.lineno))
    return reads


def test_steps_and_libraries_read_only_fields_of_their_params_objects() -> None:
    """A read of a field the object lacks would fail at run time, or (before these objects
    existed) silently take the config default: here it fails at test time, for every path."""
    checked = 0
    for path in sorted((PACKAGE / "steps").glob("*.py")) + sorted((PACKAGE / "lib").glob("*.py")):
        for function, cls_name, attr, line in _params_reads(ast.parse(path.read_text())):
            checked += 1
            fields = set(PARAM_CLASSES[cls_name].field_names()) | PARAM_METHODS
            assert attr in fields, f"{path.name}:{line} {function}() reads {cls_name}.{attr}"
    assert checked > 50  # the scan sees the steps' parameters (it is not vacuous)


def test_the_scan_catches_a_read_of_a_missing_field() -> None:
    source = "def f(config: TrainParams):\n    return config.val_fraction\n"
    reads = _params_reads(ast.parse(source))
    assert reads == [("f", "TrainParams", "val_fraction", 2)]
    assert "val_fraction" not in TrainParams.field_names()


def test_params_objects_refuse_unknown_fields_and_name_missing_ones() -> None:
    train = PipelineConfig().params_for(TrainParams)
    with pytest.raises(AttributeError):
        train.val_fraction  # noqa: B018 (the read itself is the test)
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.seed = 1  # type: ignore[misc]
    with pytest.raises(KeyError, match="TrainParams needs seed"):
        TrainParams.from_mapping({k: v for k, v in train.to_dict().items() if k != "seed"})


def test_numbers_widened_by_metadata_come_back_as_ints() -> None:
    values = {**PipelineConfig().to_dict(), "seed": 7.0, "epochs": 3.0}
    train = TrainParams.from_mapping(values)
    assert (train.seed, train.epochs) == (7, 3) and isinstance(train.seed, int)


def test_steps_do_not_import_the_pipeline_layer() -> None:
    """Layer 1 knows nothing of the config object, the DAG or the runners."""
    for path in sorted((PACKAGE / "steps").glob("*.py")) + sorted((PACKAGE / "lib").glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        bad = {m for m in modules if (m and m.split(".")[:2] == ["pipeline", "config"])
               or m in ("pipeline.dag", "pipeline.tasks", "pipeline.cli")
               or (m or "").startswith("pipeline.runners") or (m or "").startswith("kfp")}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_pipeline_signature_is_the_config_plus_the_tracking_uri() -> None:
    """dag.py spells the parameters out for readers; they must stay the config's fields."""
    pipeline = dag.create_pipeline({"cpu": "cpu:1", "gpu": "gpu:1"})
    signature = inspect.signature(pipeline.pipeline_func)
    defaults, types = PipelineConfig(), PipelineConfig.field_types()
    expected = [*types, TRACKING_URI_PARAM]
    assert sorted(signature.parameters) == sorted(expected)
    for name, kind in types.items():
        parameter = signature.parameters[name]
        assert parameter.annotation in (kind, kind.__name__), name
        assert parameter.default == getattr(defaults, name), name
    assert not set(context_inputs(dag.PIPELINE_NAME)) & set(expected)
