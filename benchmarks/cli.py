"""`wallet bench ...`: the benchmarks, one subcommand each; each benchmark's code lives in its own module."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from benchmarks import pipeline_bench

    bench = subparsers.add_parser(
        "bench",
        help="run a benchmark (default: the processor against the raw Kafka ceiling and the faust peer)",
        description="Without a subcommand: the pipeline benchmark of one processor process against the raw Kafka "
        "ceiling and the faust-streaming peer, with end-to-end latency. Benchmarks are not tests: "
        "they print figures.",
    )
    pipeline_bench.add_arguments(bench)
    bench.set_defaults(handler=pipeline_bench.run)
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")

    from benchmarks import api_latency, hot_bench

    hot = benchmarks.add_parser(
        "hot", help="transfers/s into one merchant from many payers, the merchant in 1 shard and in N (--shards 1,8)"
    )
    hot_bench.add_arguments(hot)
    hot.set_defaults(handler=hot_bench.run)

    api = benchmarks.add_parser("api", help="p50/p95/p99 of HTTP balance_transfer round trips at a fixed offered load")
    api_latency.add_arguments(api)
    api.set_defaults(handler=api_latency.run)

    from benchmarks import scale_bench

    scale = benchmarks.add_parser(
        "scale",
        help="transfers/s of 1, 2, 4 processor processes on 16 partitions, rebalance gaps, takeover restore time",
        description="For each process count, real `wallet processor` processes in one group on fresh topics and "
        "the same input: transfers/s and its ratio to the first count; then, under load, the gaps when one "
        "processor joins and one leaves, and the restore time of a processor without its snapshot.",
    )
    scale_bench.add_arguments(scale)
    scale.set_defaults(handler=scale_bench.run)

    core = benchmarks.add_parser(
        "core", help="µs per command of the pure core on a transfer's whole path (decode, apply, encode; no Kafka)"
    )
    core.add_argument("--transfers", type=int, default=200_000, help="transfers timed (default 200000)")
    core.add_argument(
        "--accounts", type=int, default=10_000, help="accounts the transfers move between (default 10000)"
    )
    core.add_argument("--seed", type=int, default=1, help="seed of the random transfers")
    core.add_argument("--profile", action="store_true", help="also print a cProfile of the whole path, by own time")
    core.add_argument("--json", action="store_true", help="print the result as one JSON line")
    core.set_defaults(handler=_run_core)


def _run_core(args: argparse.Namespace) -> int:
    from benchmarks import core_bench  # imported on use: `wallet --help` should not pay for it

    if args.transfers < 1 or args.accounts < 2:
        raise SystemExit("wallet bench core: needs --transfers >= 1 and --accounts >= 2")
    result = core_bench.run(args.transfers, args.accounts, args.seed)
    print(core_bench.to_json(result) if args.json else core_bench.format_result(result))
    if args.profile:
        print(core_bench.profile(args.transfers, args.accounts, args.seed))
    return 0
