"""``python -m knlight.select``: an alias of ``knlight select`` (see :mod:`knlight.selection`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(args: Sequence[str] | None = None) -> int:
    """Runs ``knlight select`` with ``args`` (default ``sys.argv[1:]``); returns the exit status."""
    from knlight.cli import console_main

    try:
        console_main(["select", *(sys.argv[1:] if args is None else args)])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
