"""Sticky experiment assignment: which variant a unit sees, by hashing, with no statistics imports.

Kept apart from :mod:`api.analyses.experiments` so that producers of traffic (the demo, SDKs'
helpers) assign exactly as the API does without importing scipy and statsmodels.
:func:`assign_variant` hashes ``f"{experiment}:{unit}"`` with SHA-256, reads the first 8 bytes
as a position in ``[0, 1)`` and picks the first variant whose cumulative (normalised) weight
exceeds it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def bucket(experiment_key: str, unit_id: str) -> float:
    """A stable position in ``[0, 1)`` for ``unit_id`` within ``experiment_key``."""
    digest = hashlib.sha256(f"{experiment_key}:{unit_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_variant(experiment_key: str, user_id: str, variants: Sequence[tuple[str, float]]) -> str:
    """The variant ``user_id`` sees: the hash bucket against the cumulative weights.

    >>> assign_variant("checkout_button", "u1", [("control", 0.5), ("treatment", 0.5)]) in {"control", "treatment"}
    True
    >>> assign_variant("x", "u1", [("only", 1.0)])
    'only'
    """
    if not variants:
        raise ValueError("an experiment needs at least one variant")
    if any(weight < 0 for _, weight in variants):
        raise ValueError("variant weights must not be negative")
    total = sum(weight for _, weight in variants)
    if total <= 0:
        raise ValueError("variant weights must sum to a positive number")
    point = bucket(experiment_key, user_id) * total
    cumulative = 0.0
    for name, weight in variants:
        cumulative += weight
        if point < cumulative:
            return name
    return variants[-1][0]  # float rounding at the very top of the range
