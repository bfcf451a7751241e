"""``python -m knlight.summary``: an alias of ``knlight summary`` (see :mod:`knlight.selection.summary`)."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from knlight.cli import console_main

    console_main(["summary", *sys.argv[1:]])
