"""Subcommands of the ``tidemark`` command line, one module each (see :mod:`tidemark.cli`)."""
