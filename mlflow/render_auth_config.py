"""Render basic_auth.ini.template into the path given on the command line, from the environment.

A standalone script for the MLflow server image (no package: a directory named ``mlflow`` with an
``__init__.py`` at the repository root would shadow the real library). Fails if a variable is unset.
"""

import os
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).with_name("basic_auth.ini.template")


def render(text: str, env: dict) -> str:
    missing = sorted(set(re.findall(r"\$\{(\w+)\}", text)) - set(env))
    if missing:
        raise SystemExit(f"render_auth_config: unset environment variable(s): {', '.join(missing)}")
    return re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], text)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/basic_auth.ini")
    out.write_text(render(TEMPLATE.read_text(), dict(os.environ)))
    out.chmod(0o600)
