"""`python -m rayft ...` is the `rayft` command."""

from rayft.cluster.cli import main

if __name__ == "__main__":
    main()
