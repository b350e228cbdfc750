"""`python -m ftune …` runs the same CLI as the `ftune` console script."""

from ftune.cli import main

if __name__ == "__main__":
    main()
