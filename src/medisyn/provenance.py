"""Provenance facts about the running code, at the bottom of the package (issue #22).

Tracking tags the parent run of a pipeline run with :func:`code_version` and the registry tags every
registered version with it; both import it from here, so neither reaches into the other for it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def code_version() -> str:
    """Git sha of the code (``+dirty`` with local changes), else $MEDISYN_CODE_VERSION, else the package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0 and sha.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=30)
            return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    import medisyn

    return os.environ.get("MEDISYN_CODE_VERSION") or f"medisyn-{medisyn.__version__}"
