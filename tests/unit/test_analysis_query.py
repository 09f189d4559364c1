"""The analyses' SQL builder (api/analyses/query.py): its docstring examples run."""

from __future__ import annotations

import doctest

import api.analyses.query


def test_docstring_examples_run() -> None:
    result = doctest.testmod(api.analyses.query)
    assert result.attempted > 0 and result.failed == 0
