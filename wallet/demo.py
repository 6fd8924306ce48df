"""`wallet demo`: the main job. `wallet up` (unless a stack runs), a sample workload with progress,
a summary (throughput, outcome mix, conservation, balances from the ledger and the read model),
holds placed, captured, voided and expired through the HTTP API (`wallet/demo_holds.py`), the
audit, then `wallet down` of what it started.
"""

from __future__ import annotations

import argparse
import time

from infra.settings import Settings, settings_from_args
from wallet.demo_holds import run_holds
from wallet.stack import (
    API_PROBE_TIMEOUT_S,
    StackState,
    add_up_options,
    down,
    get_json,
    is_alive,
    logs_dir,
    print_auth,
    reporting_errors,
    state_path,
    up,
)

# The workload: skewed enough that some accounts run dry (insufficient_funds), with a few
# transfers to frozen and to missing accounts (refunded), so every path shows up.
DEMO_ZIPF_S = 0.5
DEMO_FUNDING = "2000.00"
DEMO_TRANSFER_MAX = "20.00"
DEMO_MISSING_RECEIVER_SHARE = 0.01
DEMO_FROZEN_ACCOUNTS = 3
DEMO_SAMPLE_ACCOUNTS = 5
READMODEL_CATCH_UP_TIMEOUT_S = 30.0


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="start the stack (unless up), run a sample workload, print a summary, stop what it started"
    )
    add_up_options(demo)
    demo.add_argument("--accounts", type=int, default=300, help="accounts to open and fund (default 300)")
    demo.add_argument("--transfers", type=int, default=20_000, help="transfers to publish (default 20000)")
    demo.add_argument("--tps", type=float, help="offered transfers per second (default: as fast as possible)")
    demo.add_argument("--keep-running", action="store_true", help="leave the stack running afterwards")
    demo.set_defaults(handler=reporting_errors(_demo))


def _demo(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    state, started_here = _stack_for_the_demo(settings, args)
    try:
        missing, passed = _run_workload(settings, state, args, settled=started_here)
    finally:
        if started_here and not args.keep_running:
            print("\n== stopping what the demo started ==")
            for process in down(settings):
                print(f"stopped {process.name} (pid {process.pid})")
    return 0 if missing == 0 and passed else 1


def _stack_for_the_demo(settings: Settings, args: argparse.Namespace) -> tuple[StackState, bool]:
    """The running stack, or one started now; and whether it was started now."""
    state = StackState.load(state_path(settings))
    if state is not None and any(p.role == "api" and is_alive(p) for p in state.processes):
        print(f"== using the running stack ({state.api_url}) ==")
        return state, False
    print("== starting the local stack ==")
    state = up(
        settings,
        port=args.port,
        processors=args.processors,
        readmodel=args.readmodel,
        timeout_s=args.timeout_s,
        auth=args.auth == "on",
        standby=args.standby,
        readmodel_db=args.readmodel_db,
        readmodels=args.readmodels,
    )
    print(f"API at {state.api_url}; logs in {logs_dir(settings)}")
    print_auth(args.auth == "on")
    return state, True


def _run_workload(settings: Settings, state: StackState, args: argparse.Namespace, settled: bool) -> tuple[int, bool]:
    """The workloads and their summary; returns (transfers without an outcome, whether the holds
    ended as planned and the audit passed)."""
    # The workload's imports (the client library, tqdm) are only needed here.
    from producers.load import LoadSpec, ledger_balances, run_load

    spec = LoadSpec(
        accounts=args.accounts,
        count=args.transfers,
        rate_per_s=args.tps,
        zipf_s=DEMO_ZIPF_S,
        funding_amount=DEMO_FUNDING,
        transfer_amount_max=DEMO_TRANSFER_MAX,
        missing_receiver_share=DEMO_MISSING_RECEIVER_SHARE,
        frozen_accounts=DEMO_FROZEN_ACCOUNTS,
    )
    print(
        f"\n== workload: {spec.accounts} accounts funded with {spec.funding_amount} {spec.currency} each "
        f"({spec.frozen_accounts} then frozen), {spec.count:,} transfers of up to {spec.transfer_amount_max}, "
        f"Zipf-skewed, {spec.missing_receiver_share:.0%} to accounts that do not exist =="
    )
    report = run_load(settings, spec)
    print("\n== summary ==")
    print("\n".join(report.lines(args.tps)))
    _print_balances(settings, state, spec, ledger_balances(settings, spec.account_ids()))
    holds_as_planned = run_holds(settings, state)
    return report.missing, _print_audit(settings, state, settled=settled) and holds_as_planned


def _print_balances(settings: Settings, state: StackState, spec, balances: dict[str, str | None]) -> None:
    from streams.core.money import canonical_balance_minor, format_amount, parse_amount_minor

    account_ids = spec.account_ids()
    total_minor = sum(canonical_balance_minor(b, spec.currency) for b in balances.values() if b is not None)
    funded_minor = parse_amount_minor(spec.funding_amount, spec.currency) * len(account_ids)
    verdict = "conserved" if total_minor == funded_minor else "NOT conserved"
    print(
        f"money: the {len(account_ids)} accounts hold {format_amount(total_minor, spec.currency)} {spec.currency}, "
        f"deposited {format_amount(funded_minor, spec.currency)}: {verdict}"
    )
    sample = account_ids[: DEMO_SAMPLE_ACCOUNTS - 1] + account_ids[-1:]
    readmodel = _readmodel_balances(settings, state, sample)
    print("balances (ledger = fold of wallet.events" + (", read model = the query API)" if readmodel else ")"))
    for account in sample:
        frozen = " (frozen)" if account in account_ids[len(account_ids) - spec.frozen_accounts :] else ""
        shown = f"  {account + frozen:32} ledger {balances[account]:>10} {spec.currency}"
        if readmodel:
            shown += f"   read model {readmodel.get(account) or '?':>10}"
        print(shown)


def _readmodel_balances(settings: Settings, state: StackState, account_ids: list[str]) -> dict[str, str]:
    """Balances from the read model once it has caught up with the topics; {} without a read model."""
    from infra.secrets import jwt_secret
    from producers.auth import SCOPE_AUDIT, issue_token

    # The demo reads as an auditor, with a short-lived token of the run folder's key.
    token = issue_token(jwt_secret(settings), "wallet-demo", SCOPE_AUDIT, ttl_s=300)
    try:
        if not get_json(f"{state.api_url}/healthz", API_PROBE_TIMEOUT_S)[1].get("readmodel"):
            return {}
        deadline_s = time.monotonic() + READMODEL_CATCH_UP_TIMEOUT_S
        while (
            get_json(f"{state.api_url}/v1/readmodel/lag", READMODEL_CATCH_UP_TIMEOUT_S, token)[1].get("total_lag") != 0
        ):
            if time.monotonic() > deadline_s:
                return {}
            time.sleep(0.2)
        replies = {
            a: get_json(f"{state.api_url}/v1/accounts/{a}", READMODEL_CATCH_UP_TIMEOUT_S, token) for a in account_ids
        }
    except (OSError, ValueError):
        return {}
    return {a: body["balance"] for a, (status, body) in replies.items() if status == 200}


def _print_audit(settings: Settings, state: StackState, settled: bool) -> bool:
    """Runs the audit; returns whether it passed."""
    from consumers.audit import run_audit
    from streams.cli import state_dump

    # Snapshots first: a state taken before the log is read is always within it.
    stores = [settings.run_dir / p.name for p in state.processes if p.role == "processor"]
    dumps = [state_dump(store) for store in stores if store.exists()]
    readmodel_db = state.readmodel_db()
    print("\n== audit: replaying the topics from the first offset ==")
    report = run_audit(settings, dumps, readmodel_db=readmodel_db, settled=settled, progress=True)
    print(report.render_text())
    return report.passed
