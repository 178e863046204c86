"""``python -m hubload``."""

from hubload.cli import main

if __name__ == "__main__":
    main()
