"""The ``tidemark`` command: one entry point, one module per subcommand in ``tidemark.commands``.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from tidemark.settings import get_settings

COMMANDS = ("run", "serve", "sink", "worker", "demo", "sql", "topics", "backfill", "alerts")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(prog="tidemark", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tidemark.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"tidemark.commands.{name}":
                continue  # not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tidemark`` command line."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=get_settings().log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns what matters
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
