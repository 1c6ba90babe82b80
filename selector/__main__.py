"""`python -m selector`: the same command line as the `selector` console script."""

from selector.cli import main

if __name__ == "__main__":
    main()
