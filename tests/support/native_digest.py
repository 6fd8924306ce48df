"""Prints one digest of everything the core decides over a fixed set of hostile programs.

Run as `python -m tests.support.native_digest N`, once with the compiled core and once with
WALLET_NATIVE=0: the two digests must be equal. The programs are the property tests'
attacked programs (forged, replayed and malformed legs among client commands), drawn by
hypothesis with a fixed seed and no shrinking, so both runs draw the same ones.

Prints JSON: the build the interpreter loaded (null for pure Python), the programs played, the
records and dead letters seen, and the sha256 over all of them.
"""

from __future__ import annotations

import hashlib
import json
import sys

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from infra.native import active_build
from tests.test_machine_properties import History, attacked_programs, small_delays_ms


def main(programs_count: int) -> None:
    digest = hashlib.sha256()
    seen = {"programs": 0, "records": 0, "dead_letters": 0}

    @settings(
        max_examples=programs_count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(program=attacked_programs, delays_ms=st.lists(small_delays_ms, min_size=1, max_size=8))
    def play(program: list[tuple], delays_ms: list[int]) -> None:
        history = History(delays_ms)
        history.play(program)
        seen["programs"] += 1
        for records in history.records():
            for record in records:
                digest.update(record + b"\0")
                seen["records"] += 1
        for letter in history.driver.dead_letters:
            digest.update(letter.value + b"\0" + letter.reason.encode() + b"\0")
            seen["dead_letters"] += 1
        for partition in history.driver.partitions:
            digest.update(repr(sorted(partition.state.accounts.items())).encode() + b"\0")

    play()
    build = active_build()
    print(json.dumps({"build": str(build) if build else None, **seen, "sha256": digest.hexdigest()}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
