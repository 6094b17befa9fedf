"""The one container image every MediSyn component (and every job it launches) runs in.

Built from ``docker/Dockerfile.trainer``. Set ``MEDISYN_IMAGE`` before importing the pipeline, or
pass ``--image`` to ``medisyn pipeline compile``, to compile against another tag/digest.
"""

import os

DEFAULT_IMAGE = "ghcr.io/medisyn/medisyn-trainer:0.1.0"
MEDISYN_IMAGE = os.environ.get("MEDISYN_IMAGE", DEFAULT_IMAGE)
