"""Print the project's pinned dependencies from pyproject.toml for the image's cached pip layer.

The Dockerfiles install dependencies in their own layer, before the source is copied, so a code
change does not re-download TensorFlow. That layer must install exactly what ``pip install .``
would, so the list comes from pyproject.toml (never a second, hand-kept requirements file).
TensorFlow must be pinned with ``==``: the images and the pipeline then run the same TF, and
``--tensorflow-extra and-cuda`` (GPU image) swaps in ``tensorflow[and-cuda]`` at that same pin,
whose extra pulls the CUDA/cuDNN wheels TensorFlow itself declares.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_TENSORFLOW = re.compile(r"^tensorflow\s*(\[[^\]]*\])?\s*==\s*(?P<version>[0-9][0-9A-Za-z.+-]*)$")


def read_requirements(pyproject: Path, tensorflow_extra: str = "",
                      extras: tuple[str, ...] = ()) -> list[str]:
    """The ``[project].dependencies`` of ``pyproject`` plus those of ``extras``.

    TensorFlow gets ``tensorflow_extra`` at its pinned version. Raises ``ValueError`` when the
    file has no dependency list, an extra is unknown, or TensorFlow is missing or not pinned
    exactly, because then the image could silently get a different TensorFlow.
    """
    try:
        data = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read {str(pyproject)!r}: {exc}") from exc
    deps = data.get("project", {}).get("dependencies")
    if not isinstance(deps, list) or not deps:
        raise ValueError(f"{str(pyproject)!r} has no [project].dependencies list")
    optional = data["project"].get("optional-dependencies", {})
    for extra_name in extras:
        if extra_name not in optional:
            raise ValueError(f"unknown extra {extra_name!r} in {str(pyproject)!r}; "
                             f"known: {', '.join(sorted(optional))}")
        deps = deps + optional[extra_name]
    out: list[str] = []
    pinned = None
    for dep in deps:
        name = re.split(r"[\s\[<>=!~;]", dep.strip(), maxsplit=1)[0].lower()
        if name == "tensorflow":
            match = _TENSORFLOW.match(dep.strip())
            if not match:
                raise ValueError(f"tensorflow must be pinned with '==' in {str(pyproject)!r}, "
                                 f"got {dep!r}")
            pinned = match["version"]
            extra = f"[{tensorflow_extra}]" if tensorflow_extra else ""
            dep = f"tensorflow{extra}=={pinned}"
        out.append(dep.strip())
    if pinned is None:
        raise ValueError(f"tensorflow is not among the dependencies in {str(pyproject)!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path, help="path to pyproject.toml")
    parser.add_argument("--tensorflow-extra", default="",
                        help="extra for the tensorflow requirement, e.g. and-cuda (GPU image)")
    parser.add_argument("--extra", action="append", default=[],
                        help="also list this optional-dependencies group (repeatable), e.g. s3")
    args = parser.parse_args(argv)
    try:
        requirements = read_requirements(args.pyproject, args.tensorflow_extra,
                                         tuple(args.extra))
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    sys.stdout.write("\n".join(requirements) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
