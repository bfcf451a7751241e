"""``python -m knlight``: the same as the ``knlight`` console script."""

from knlight.cli import console_main

if __name__ == "__main__":
    console_main()
