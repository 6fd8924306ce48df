"""`wallet bench` end to end on a tiny input, against the real broker and a real processor.

The figures of a run this small mean nothing; what is checked is that every stage ran,
measured something, saw every outcome it should, and left no topic behind.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

import pytest

from benchmarks import pipeline_bench
from schemas.codec import decode_command
from schemas.commands import Transfer
from schemas.outcomes import Reason
from infra.admin import admin_client

TRANSFERS = 2_000
ACCOUNTS = 200
SEED = 7


def _bench_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    # The global flags of `wallet`, which the harness reads through wallet.cli.settings_from_args.
    parser.add_argument("--bootstrap")
    parser.add_argument("--topic-prefix")
    pipeline_bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_generated_transfers_have_a_known_outcome_and_decode_as_commands() -> None:
    expected = Counter()
    records = list(pipeline_bench.transfer_records(ACCOUNTS, TRANSFERS, SEED, "t", expected, ts_ms=1))
    assert sum(expected.values()) == TRANSFERS
    # The failing shares are fixed by construction (2 % each), so both must be present.
    assert expected[Reason.INSUFFICIENT_FUNDS] > 0 and expected[Reason.ACCOUNT_NOT_FOUND] > 0
    assert expected["success"] > 0.9 * TRANSFERS
    for key, value in records:
        command = decode_command(value)
        assert type(command) is Transfer and command.from_account == key != command.to_account
    again = Counter()
    assert list(pipeline_bench.transfer_records(ACCOUNTS, TRANSFERS, SEED, "t", again, ts_ms=1)) == records
    assert again == expected


@pytest.mark.timeout(60)
def test_bench_measures_every_stage_sees_every_outcome_and_deletes_its_topics(kafka_bootstrap: str, capsys) -> None:
    args = _bench_args(["--bootstrap", kafka_bootstrap, "--transfers", str(TRANSFERS), "--accounts", str(ACCOUNTS),
                        "--partitions", "4", "--seed", str(SEED), "--skip-faust", "--latency-seconds", "1", "--json"])

    exit_code = pipeline_bench.run(args)

    report = json.loads(capsys.readouterr().out)
    assert exit_code == 0 and report["ok"], report["problems"]

    assert report["ceiling"]["outcomes"]["records"] == 2 * ACCOUNTS + TRANSFERS
    assert report["ceiling"]["messages"] == 2 * (2 * ACCOUNTS + TRANSFERS)
    assert report["ceiling"]["messages_per_s"] > 0

    ours = report["ours"]
    expected = Counter()
    for _ in pipeline_bench.transfer_records(ACCOUNTS, TRANSFERS, SEED, "t", expected, ts_ms=1):
        pass
    assert ours["outcomes"] == dict(expected)
    costs = pipeline_bench.MESSAGES_OURS
    assert ours["messages"] == 2 * ACCOUNTS * costs["setup"] + sum(costs[result] * count
                                                                   for result, count in expected.items())
    assert ours["transfers_per_s"] > 0 and ours["messages_per_s"] > 0
    ceiling_messages_per_s = report["ceiling"]["messages_per_s"]
    assert ours["messages_ratio_to_ceiling"] == pytest.approx(ours["messages_per_s"] / ceiling_messages_per_s, rel=1e-2)
    assert ours["window_start"] == "first consume after assignment"

    latency = report["latency"]
    assert latency["sent"] > 0 and latency["answered"] == latency["sent"]
    assert 0 < latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"] <= latency["max_ms"]

    left = [name for name in admin_client(kafka_bootstrap).list_topics(timeout=10).topics
            if name.startswith(report["topic_prefix"])]
    assert left == []


@pytest.mark.timeout(60)
def test_faust_peer_runs_the_same_saga_to_the_same_outcomes(kafka_bootstrap: str, capsys) -> None:
    faust_transfers = 200
    args = _bench_args(["--bootstrap", kafka_bootstrap, "--transfers", str(TRANSFERS), "--accounts", str(ACCOUNTS),
                        "--partitions", "4", "--seed", str(SEED), "--faust-transfers", str(faust_transfers),
                        "--latency-seconds", "0", "--json"])

    exit_code = pipeline_bench.run(args)

    report = json.loads(capsys.readouterr().out)
    assert exit_code == 0 and report["ok"], report["problems"]
    faust = report["faust"]["exactly_once"]
    # The sample keeps the main run's accounts-to-transfers ratio.
    assert faust["accounts"] == ACCOUNTS * faust_transfers // TRANSFERS
    expected = Counter()
    for _ in pipeline_bench.transfer_records(faust["accounts"], faust_transfers, SEED, "t", expected, ts_ms=1):
        pass
    assert faust["outcomes"] == dict(expected)
    assert faust["transfers_per_s"] > 0 and faust["window_start"] == "first record"
    assert report["ours_over_faust"]["exactly_once"] == pytest.approx(
        report["ours"]["transfers_per_s"] / faust["transfers_per_s"], rel=1e-2)
