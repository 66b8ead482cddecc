"""A cheap ``inspect.stack()`` for kfp's pipeline tasks, installed for the test session.

kfp 2.17's ``PipelineTask._ensure_container_spec_exists`` calls ``inspect.stack()`` once per
resource or retry setting (27 times per compile of the default DAG) only to name its caller in
an error message. ``inspect.stack()`` reads the source line of every frame and looks up each
frame's module in ``sys.modules``: in a test process (pytest's deep stack, TensorFlow, MLflow
and kfp all imported) that made one compile take 4 to 8 s instead of the CLI's 0.3 s, 96% of
it in that call. :func:`stack` returns the same frames, files, line numbers and function
names without the source lines, so kfp's behaviour, error message included, is unchanged.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Iterator

import pytest


def stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack(context)`` without ``code_context`` (the one part kfp does not read)."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name,
                                        None, None))
        frame = frame.f_back
    return frames


def _inspect_with_cheap_stack() -> types.ModuleType:
    module = types.ModuleType("inspect", inspect.__doc__)
    module.__dict__.update({k: v for k, v in vars(inspect).items() if not k.startswith("__")})
    module.stack = stack
    return module


@pytest.fixture(scope="session", autouse=True)
def cheap_kfp_stack() -> Iterator[None]:
    """kfp's pipeline tasks see :func:`stack` as ``inspect.stack`` for the whole session."""
    from kfp.dsl import pipeline_task

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_task, "inspect", _inspect_with_cheap_stack())
        yield
