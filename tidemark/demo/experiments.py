"""The experiments running on the demo platform, and how users are assigned to variants.

- ``checkout_button``: a redesigned "Fund this project" button. Signed-in users are
  exposed when they open a project page; in ``treatment`` the chance that the visit
  ends in a contribution is really higher (``TrafficConfig.checkout_lift``, +20 %
  relative by default), so an analysis must find it significant.
- ``aa_test``: an A/A test exposed at the start of every signed-in session; the
  variants behave identically, so an analysis must *not* find a difference.

Assignment is deterministic and sticky: a SHA-256 hash of ``experiment:unit`` mapped to
[0, 1) and compared against the cumulative variant weights (the same scheme feature-flag
services use), so it does not depend on the RNG or on Python's per-process string hashing.

>>> assign_variant("checkout_button", "user_0000001") == assign_variant("checkout_button", "user_0000001")
True
>>> assign_variant("aa_test", "u", (("only", 1.0),))
'only'
"""

from __future__ import annotations

from dataclasses import dataclass

from api.analyses.assignment import assign_variant as assign

CONTROL = "control"
TREATMENT = "treatment"


@dataclass(frozen=True)
class DemoExperiment:
    """An experiment the demo users take part in: its key and variant weights."""

    key: str
    variants: tuple[tuple[str, float], ...] = ((CONTROL, 0.5), (TREATMENT, 0.5))


CHECKOUT_BUTTON = DemoExperiment("checkout_button")
AA_TEST = DemoExperiment("aa_test")
BUILT_IN_EXPERIMENTS: tuple[DemoExperiment, ...] = (CHECKOUT_BUTTON, AA_TEST)


def assign_variant(
    experiment: str,
    unit_id: str,
    variants: tuple[tuple[str, float], ...] = ((CONTROL, 0.5), (TREATMENT, 0.5)),
) -> str:
    """The variant ``unit_id`` sees in ``experiment``: the same sticky hash assignment the API serves."""
    return assign(experiment, unit_id, variants)
