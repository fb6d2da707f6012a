"""`python -m capsx ...` is the same as the `capsx` console script."""

from capsx.cli import main

if __name__ == "__main__":
    main()
