"""The one exception the core raises on purpose.

Bugs crash, bad input does not: a record the core cannot decide (a forged, malformed or
unmatched saga leg) raises `UndecidableInput` before anything is folded, and that is the
only exception the processor dead-letters. Anything else out of the core (an
`AssertionError` of a broken invariant, a `KeyError`) is a bug and stops the process.
"""
from __future__ import annotations


class UndecidableInput(ValueError):
    """The command cannot be decided: it is bad input, not a bug; the state is untouched."""
