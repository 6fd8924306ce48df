"""`wallet bench scale` end to end on a tiny input, against the real broker and real processor processes.

The figures of a run this small mean nothing; what is checked is that every process count ran its
processors, measured a rate, saw every outcome it should and passed its checks, that the takeover
folded the whole events topic without a snapshot and nothing with one, and that no topic is left.
The rebalance phase (tens of seconds of load around a join and a leave) is
skipped here; the arithmetic of its gaps is checked on its own.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pytest

from benchmarks import pipeline_bench, scale_bench
from infra.admin import admin_client
from tests.conftest import session_broker_count

TRANSFERS = 300
ACCOUNTS = 40
SEED = 5


def _scale_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    # The global flags of `wallet`, which the bench reads through settings_from_args.
    parser.add_argument("--bootstrap")
    parser.add_argument("--topic-prefix")
    scale_bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_gaps_run_from_the_last_arrival_before_the_event_to_the_first_after_it() -> None:
    arrivals_s = [1.0, 1.1, 1.2, 4.0, 4.1, 9.5]
    assert scale_bench._longest_gap(arrivals_s, 1.15, 9.0) == (1.2, 4.0)
    assert scale_bench._longest_gap(arrivals_s, 4.05, 9.0) == (4.0, 4.1)  # 9.5 is past the window
    assert scale_bench._longest_gap(arrivals_s, 4.05, 10.0) == (4.1, 9.5)
    assert scale_bench._longest_gap(arrivals_s, 0.5, 1.05) == (0.5, 1.0)  # none before: from the event
    assert scale_bench._longest_gap(arrivals_s, 4.2, 9.0) is None  # no progress after the event


@pytest.mark.timeout(300)
def test_scale_runs_each_process_count_and_a_takeover_and_deletes_its_topics(kafka_bootstrap: str, capsys) -> None:
    args = _scale_args(
        [
            "--bootstrap",
            kafka_bootstrap,
            "--processors",
            "1,2",
            "--partitions",
            "4",
            "--transfers",
            str(TRANSFERS),
            "--accounts",
            str(ACCOUNTS),
            "--seed",
            str(SEED),
            "--brokers",
            str(session_broker_count()),
            "--rebalance-seconds",
            "0",
            "--skip-kill-takeover",  # its two extra runs and kills take longer than CI has
            "--json",
        ]
    )

    exit_code = scale_bench.run(args)

    captured = capsys.readouterr()
    assert captured.out.startswith("{"), captured.err[-3000:]
    report = json.loads(captured.out)
    assert exit_code == 0 and report["ok"], report["problems"]
    assert report["brokers"] == session_broker_count() and report["partitions"] == 4
    expected: Counter[str] = Counter()
    for _ in pipeline_bench.transfer_records(ACCOUNTS, TRANSFERS, SEED, "t", expected, ts_ms=1):
        pass
    runs = report["runs"]
    assert [run["processors"] for run in runs] == [1, 2]
    for run in runs:
        assert run["transfers_per_s"] > 0 and run["checks_ok"], run["problems"]
        assert run["outcomes"] == dict(expected)
        assert run["ledger"]["balances_minor"] == run["ledger"]["money_in_minor"] > 0
        assert len(run["load_average"]) == 3
    assert runs[0]["ratio_to_first"] == 1.0
    assert runs[1]["ratio_to_first"] == pytest.approx(
        runs[1]["transfers_per_s"] / runs[0]["transfers_per_s"], rel=1e-2, abs=5e-4
    )
    assert "rebalance" not in report

    takeover = report["takeover"]
    # Without a snapshot every event of the last count's topic is folded; with it kept, none.
    assert takeover["empty_store"]["events_folded"] == runs[-1]["ledger"]["events"] > 0
    assert takeover["empty_store"]["restore_s"] > 0 and takeover["empty_store"]["restore_s_per_million_events"] > 0
    assert takeover["snapshot_kept"]["events_folded"] == 0
    assert takeover["snapshot_kept"]["restores"] == takeover["empty_store"]["restores"] == 1

    prefixes = tuple(run["topic_prefix"] for run in runs)
    assert [
        name for name in admin_client(kafka_bootstrap).list_topics(timeout=10).topics if name.startswith(prefixes)
    ] == []
