"""`wallet bench` end to end on a tiny input, against the real broker and a real processor.

The figures of a run this small mean nothing; what is checked is that every stage ran,
measured something, saw every outcome it should, passed its checks, and left no topic behind.
The Kafka Streams peer needs javac, mvn and java; its test is skipped, saying so, without them.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import psycopg
import pytest

from benchmarks import kafka_streams_peer, pipeline_bench
from benchmarks.support.local_broker import broker_for
from infra.admin import admin_client
from infra.settings import Settings
from schemas.codec import decode_command
from schemas.commands import Transfer
from schemas.outcomes import Reason

pytest_plugins = ["tests.readmodel_fixtures"]

TRANSFERS = 2_000
ACCOUNTS = 200
SEED = 7
HOLDS = 300
READMODEL_SHARDS = 2


@pytest.fixture
def db_kind() -> str:
    return "postgresql"  # the read-model stage's shards share one database


def _bench_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    # The global flags of `wallet`, which the harness reads through wallet.cli.settings_from_args.
    parser.add_argument("--bootstrap")
    parser.add_argument("--topic-prefix")
    pipeline_bench.add_arguments(parser)
    return parser.parse_args(argv)


def _report(capsys: pytest.CaptureFixture[str]) -> dict:
    """The JSON report on stdout; a bench that printed none failed, and its stderr says why."""
    captured = capsys.readouterr()
    assert captured.out.startswith("{"), captured.err[-3000:]
    return json.loads(captured.out)


def test_generated_transfers_have_a_known_outcome_and_decode_as_commands() -> None:
    expected: Counter[str] = Counter()
    records = list(pipeline_bench.transfer_records(ACCOUNTS, TRANSFERS, SEED, "t", expected, ts_ms=1))
    assert sum(expected.values()) == TRANSFERS
    # The failing shares are fixed by construction (2 % each), so both must be present.
    assert expected[Reason.INSUFFICIENT_FUNDS] > 0 and expected[Reason.ACCOUNT_NOT_FOUND] > 0
    assert expected["success"] > 0.9 * TRANSFERS
    for key, value in records:
        command = decode_command(value)
        assert type(command) is Transfer and command.from_account == key != command.to_account
    again: Counter[str] = Counter()
    assert list(pipeline_bench.transfer_records(ACCOUNTS, TRANSFERS, SEED, "t", again, ts_ms=1)) == records
    assert again == expected


@pytest.mark.timeout(300)
def test_bench_measures_every_stage_sees_every_outcome_and_deletes_its_topics(
    kafka_bootstrap: str, db_url: str, capsys
) -> None:
    args = _bench_args(
        [
            "--bootstrap",
            kafka_bootstrap,
            "--transfers",
            str(TRANSFERS),
            "--accounts",
            str(ACCOUNTS),
            "--partitions",
            "4",
            "--seed",
            str(SEED),
            "--skip-faust",
            "--skip-kafka-streams",
            "--latency-seconds",
            "1",
            "--holds",
            str(HOLDS),
            "--readmodel-db",
            db_url,
            "--readmodel-shards",
            str(READMODEL_SHARDS),
            "--json",
        ]
    )

    exit_code = pipeline_bench.run(args)

    report = _report(capsys)
    assert exit_code == 0 and report["ok"], report["problems"]

    assert report["copy"]["outcomes"]["records"] == 2 * ACCOUNTS + TRANSFERS
    assert report["copy"]["messages"] == 2 * (2 * ACCOUNTS + TRANSFERS)
    assert report["copy"]["messages_per_s"] > 0
    assert report["peers"]["kafka_streams"] == {"skipped": "--skip-kafka-streams"}

    ours = report["ours"]
    expected: Counter[str] = Counter()
    in_place: Counter[str] = Counter()  # transfers between two accounts of one partition: no leg written
    for _ in pipeline_bench.transfer_records(
        ACCOUNTS, TRANSFERS, SEED, "t", expected, ts_ms=1, in_place=in_place, partitions=4
    ):
        pass
    assert ours["outcomes"] == dict(expected)
    assert 0 < in_place.total() < expected.total()
    costs, saved = pipeline_bench.MESSAGES_OURS, pipeline_bench.MESSAGES_SETTLED_IN_PLACE
    assert ours["messages"] == 2 * ACCOUNTS * costs["setup"] + sum(
        costs[result] * count for result, count in expected.items()
    ) + sum(saved[result] * count for result, count in in_place.items())
    assert ours["transfers_per_s"] > 0 and ours["messages_per_s"] > 0
    assert ours["checks_ok"] and ours["ledger"]["problems"] == []
    assert ours["ledger"]["balances_minor"] == ours["ledger"]["money_in_minor"] > 0
    ceiling = report["ceiling"]
    assert ceiling["checks_ok"] and ceiling["outcomes"] == dict(expected) and ceiling["transfers_per_s"] > 0
    assert ceiling["ledger"]["events"] == ours["ledger"]["events"]  # the same saga writes the same events
    assert ours["ratio_to_ceiling"] == pytest.approx(
        ours["transfers_per_s"] / ceiling["transfers_per_s"], rel=1e-2, abs=5e-4
    )
    ceiling_messages_per_s = report["ceiling"]["messages_per_s"]
    assert ours["messages_ratio_to_ceiling"] == pytest.approx(ours["messages_per_s"] / ceiling_messages_per_s, rel=1e-2)
    assert ours["window_start"] == "first consume after assignment"

    machine = report["machine"]  # two processes of one group on their own copy of the input
    assert machine["processors"] == pipeline_bench.MACHINE_PROCESSORS_DEFAULT == 2
    assert machine["checks_ok"] and machine["outcomes"] == dict(expected)
    assert machine["ledger"]["events"] == ours["ledger"]["events"]
    money_in_minor = ours["ledger"]["money_in_minor"]
    assert machine["ledger"]["balances_minor"] == machine["ledger"]["money_in_minor"] == money_in_minor
    assert machine["scaling_from_one"] == pytest.approx(
        machine["transfers_per_s"] / ours["transfers_per_s"], rel=1e-2, abs=5e-4
    )
    assert machine["window_start"].startswith("first consume after assignment, of processor-machine-")

    assert [latency["load_share"] for latency in report["latency"]] == [0.5, 0.8]
    for latency in report["latency"]:
        assert latency["sent"] > 0 and latency["answered"] == latency["sent"]
        assert 0 < latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"] <= latency["max_ms"]
        assert latency["offered_transfers_per_s"] == pytest.approx(
            ours["transfers_per_s"] * latency["load_share"], rel=1e-2
        )

    holds = report["holds"]
    assert holds["checks_ok"], holds["problems"]
    assert holds["outcomes"] == {"hp": {"success": HOLDS}, "hc": {"success": HOLDS}}
    assert holds["holds_captured_per_s"] > 0
    assert holds["messages_per_s"] == pytest.approx(
        HOLDS * pipeline_bench.MESSAGES_PER_CAPTURED_HOLD / holds["elapsed_s"], rel=1e-2
    )
    # Every capture was credited: the whole ledger, transfers and holds, still conserves money.
    assert holds["ledger"]["balances_minor"] == holds["ledger"]["money_in_minor"] == ours["ledger"]["money_in_minor"]
    assert holds["ledger"]["events"] >= ours["ledger"]["events"] + 3 * HOLDS

    readmodel = report["readmodel"]["shards"][str(READMODEL_SHARDS)]
    assert readmodel["checks_ok"], readmodel["problems"]
    assert readmodel["shards"] == READMODEL_SHARDS and readmodel["processor_transfers_per_s"] > 0
    assert readmodel["processor_transfers_per_s_without_readmodel"] == ours["transfers_per_s"]
    assert readmodel["records"] > ours["ledger"]["events"]  # the events, the outcomes and the commit markers
    assert readmodel["max_lag_records"] >= readmodel["lag_at_processor_end_records"] >= 0
    assert readmodel["catch_up_s"] >= 0 and readmodel["readmodel_records_per_s"] > 0
    # Caught up means everything stored: the shards' tables hold the balances the ledger check summed.
    with psycopg.connect(db_url) as connection:
        ((stored_minor,),) = connection.execute("SELECT sum(balance_minor) FROM accounts").fetchall()
    assert stored_minor == ours["ledger"]["balances_minor"]

    left = [
        name
        for name in admin_client(kafka_bootstrap).list_topics(timeout=10).topics
        if name.startswith(report["topic_prefix"])
    ]
    assert left == []


@pytest.mark.timeout(180)
def test_faust_peer_runs_the_same_saga_to_the_same_outcomes(kafka_bootstrap: str, capsys) -> None:
    faust_transfers = 200
    args = _bench_args(
        [
            "--bootstrap",
            kafka_bootstrap,
            "--transfers",
            str(TRANSFERS),
            "--accounts",
            str(ACCOUNTS),
            "--partitions",
            "4",
            "--seed",
            str(SEED),
            "--faust-transfers",
            str(faust_transfers),
            "--skip-kafka-streams",
            "--latency-seconds",
            "0",
            "--holds",
            "0",
            "--machine-processors",
            "0",
            "--json",
        ]
    )

    exit_code = pipeline_bench.run(args)

    report = _report(capsys)
    assert exit_code == 0 and report["ok"], report["problems"]
    faust = report["faust"]["exactly_once"]
    assert report["peers"]["faust"]["transfers_per_s"] == faust["transfers_per_s"] > 0
    assert report["peers"]["faust"]["checks_ok"]
    # The sample keeps the main run's accounts-to-transfers ratio.
    assert faust["accounts"] == ACCOUNTS * faust_transfers // TRANSFERS
    expected: Counter[str] = Counter()
    for _ in pipeline_bench.transfer_records(faust["accounts"], faust_transfers, SEED, "t", expected, ts_ms=1):
        pass
    assert faust["outcomes"] == dict(expected)
    assert faust["transfers_per_s"] > 0 and faust["window_start"] == "first record"
    assert report["ours_over_faust"]["exactly_once"] == pytest.approx(
        report["ours"]["transfers_per_s"] / faust["transfers_per_s"], rel=1e-2
    )


@pytest.mark.timeout(600)
def test_kafka_streams_peer_and_ceiling_decide_the_same_saga_and_report_every_figure(
    kafka_bootstrap: str, capsys
) -> None:
    missing = kafka_streams_peer.missing_tools()
    if missing:
        pytest.skip(f"the Kafka Streams peer needs {', '.join(missing)}, not on PATH here")
    transfers, accounts = 500, 50
    args = _bench_args(
        [
            "--bootstrap",
            kafka_bootstrap,
            "--transfers",
            str(transfers),
            "--accounts",
            str(accounts),
            "--partitions",
            "4",
            "--seed",
            str(SEED),
            "--skip-faust",
            "--latency-seconds",
            "0",
            "--holds",
            "0",
            "--machine-processors",
            "0",
            "--json",
        ]
    )

    exit_code = pipeline_bench.run(args)

    report = _report(capsys)
    assert exit_code == 0 and report["ok"], report["problems"]
    expected: Counter[str] = Counter()
    for _ in pipeline_bench.transfer_records(accounts, transfers, SEED, "t", expected, ts_ms=1):
        pass
    ours, kafka_streams, ceiling = report["ours"], report["peers"]["kafka_streams"], report["ceiling"]
    for stage in (ours, kafka_streams, ceiling):
        assert stage["transfers_per_s"] > 0 and stage["checks_ok"] and stage["outcomes"] == dict(expected)
        assert stage["ledger"]["balances_minor"] == stage["ledger"]["money_in_minor"] > 0
        # Ratios are reported to 3 decimals: a small one (a peer slowed down by a loaded machine)
        # is off by up to 0.0005, more than 1 % of it.
        assert stage["ratio_to_kafka_streams"] == pytest.approx(
            stage["transfers_per_s"] / kafka_streams["transfers_per_s"], rel=1e-2, abs=5e-4
        )
        assert stage["ratio_to_ceiling"] == pytest.approx(
            stage["transfers_per_s"] / ceiling["transfers_per_s"], rel=1e-2, abs=5e-4
        )
    # The peer writes, event for event, what ours writes for the same input.
    assert kafka_streams["ledger"]["events"] == ours["ledger"]["events"]
    assert kafka_streams["messages"] == ours["messages"]
    assert kafka_streams["window_start"] == "first record"
    assert report["peers"]["faust"] == {"skipped": "--skip-faust"}


def test_a_configured_broker_is_used_as_it_is_and_nothing_is_started() -> None:
    configured = Settings().with_overrides(kafka_bootstrap="127.0.0.1:1")
    with broker_for(configured, say=lambda text: pytest.fail(f"started a broker: {text}")) as settings:
        assert settings is configured
