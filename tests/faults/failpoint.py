"""``medisyn <stage> ...`` held at a failpoint, so a test can SIGKILL it at an exact point (issue #12).

    python tests/faults/failpoint.py MODULE:ATTR MARKER -- <stage> --config ... (the CLI's arguments)

runs the CLI with ``MODULE.ATTR`` wrapped: the first time it returns, ``MARKER`` is written and the
process blocks until it is killed. The stages whose commit is one quick registry call (register,
promote) or whose mid-way leaves no file (a gate between two tasks) have no window a test could
catch by polling; this one waits at the point instead of racing it. Everything else is the real CLI.
"""

from __future__ import annotations

import functools
import importlib
import signal
import sys
from pathlib import Path
from typing import Any


def hold_after(target: str, marker: Path) -> None:
    """Wrap ``MODULE:ATTR`` (ATTR may be dotted) so that, after its first return, ``marker`` is
    written and the process blocks."""
    module_name, attr = target.split(":")
    owner: Any = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)

    @functools.wraps(real)
    def held(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        marker.write_text(target)
        while True:  # until SIGKILL
            signal.pause()
        return out

    setattr(owner, name, held)


def main(argv: list[str]) -> int:
    target, marker, sep, *cli_args = argv
    assert sep == "--", "usage: failpoint.py MODULE:ATTR MARKER -- <stage> <args>"
    hold_after(target, Path(marker))
    from medisyn.cli import main as cli

    return cli(cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
