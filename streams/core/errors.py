"""The one exception the runtime may dead-letter.

`UndecidableInput`: a record the core cannot decide at all (a saga leg that is not a positive
canonical amount of a known currency, a refund that matches no pending debit, ...). The core
raises it before folding anything, so the state is untouched, and the processor sends the
record to `wallet.dlq` with the reason. Every other exception out of the core is a bug (a
broken invariant) and must stop the process loudly.
"""

from __future__ import annotations


class UndecidableInput(Exception):
    """A record the core refuses to decide; the state is unchanged."""
