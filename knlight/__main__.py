"""``python -m knlight``: the same as the ``knlight`` console script."""

from knlight.cli import main

if __name__ == "__main__":
    main()
