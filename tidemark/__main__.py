import sys

from tidemark.cli import main

if __name__ == "__main__":  # not when a stage's child process imports it (multiprocessing's spawn)
    sys.exit(main())
