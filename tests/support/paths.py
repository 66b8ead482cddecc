"""Where the project and the shared, never-downloaded data (``../shared/data``) are.

``IRIS_SHARED_DATA`` points elsewhere for the data set and the ImageNet weights files.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("IRIS_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
IRIS_ZIP = SHARED_DATA / "iris-image.zip"
#: MobileNet v1-0.25: the default backbone, and the small, fast backbone of the training tests.
MOBILENET_WEIGHTS = SHARED_DATA / "mobilenet_2_5_224_tf_no_top.h5"
#: MobileNetV2-0.5: the other backbone of sweeps/default.yaml.
MOBILENET_V2_WEIGHTS = (SHARED_DATA
                        / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5")
#: The default config's backbone weights (what IRIS_MODEL_WEIGHTS names offline).
DEFAULT_BACKBONE_WEIGHTS = MOBILENET_WEIGHTS
