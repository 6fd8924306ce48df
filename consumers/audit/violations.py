"""The audit's vocabulary: what a finding is called, where it is, and how answers are written.

Nothing here checks anything. Every check module names its findings with a `Kind` and reports
them as `Violation`s; the report and the JSON output read only these.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Where a record is: (partition, offset). A plain tuple because it is ordered: the first
# location of several is `min` of them.
Location = tuple[int, int]
# An answer to a request: (status, reason).
Answer = tuple[str, "str | None"]
# A request: (transaction id, digest). A plain tuple: it is made once per event in the
# replay's hot loop; readers unpack it by name (`transaction_id, digest = key`).
RequestKey = tuple[str, str]


class Kind:
    """Violation kinds: stable, machine-readable names (they appear in the JSON report)."""

    LOG_TRUNCATED = "log_truncated"
    PARTITION_COUNT = "partition_count_mismatch"
    UNDECODABLE_EVENT = "undecodable_event"
    MISROUTED_EVENT = "misrouted_event"
    EVENT_BEFORE_OPEN = "event_before_account_opened"
    ACCOUNT_REOPENED = "account_opened_twice"
    SEQ_REPEATED = "seq_repeated"
    SEQ_GAP = "seq_gap"
    BALANCE_MISMATCH = "balance_does_not_follow"
    CONSERVATION = "conservation"
    DEBITED_TWICE = "transfer_debited_twice"
    CREDIT_WITHOUT_DEBIT = "credit_without_debit"
    REFUND_WITHOUT_DEBIT = "refund_without_debit"
    REFUSAL_WITHOUT_DEBIT = "refusal_without_debit"
    REFUND_WITHOUT_REFUSAL = "refund_without_refusal"
    SETTLED_TWICE = "transfer_settled_twice"
    LEG_MISMATCH = "leg_does_not_match_debit"
    IN_FLIGHT_WHEN_SETTLED = "in_flight_when_settled"
    PENDING_WHEN_SETTLED = "command_pending_when_settled"
    UNDECODABLE_OUTCOME = "undecodable_outcome"
    MISKEYED_OUTCOME = "miskeyed_outcome"
    DECISION_WITHOUT_OUTCOME = "decision_without_outcome"
    OUTCOME_WITHOUT_DECISION = "outcome_without_decision"
    OUTCOME_BEFORE_SETTLEMENT = "outcome_before_settlement"
    OUTCOME_MISMATCH = "outcome_does_not_match_decision"
    OUTCOME_CONFLICT = "conflicting_outcomes"
    OUTCOME_WRONG_ACCOUNT = "outcome_names_another_account"
    SNAPSHOT_AHEAD = "snapshot_ahead_of_log"
    NONDETERMINISTIC = "event_not_reproduced"
    EXTRA_EVENT = "event_without_command"
    CORE_ERROR = "core_error_on_command"
    NOT_DEAD_LETTERED = "poison_command_not_dead_lettered"
    HOLD_PLACED_TWICE = "hold_placed_twice"
    HOLD_NOT_PLACED = "hold_event_without_hold_placed"
    HOLD_AFTER_END = "hold_changed_after_it_ended"  # captured, voided or expired after it ended or expired
    HOLD_OVERCAPTURED = "hold_captured_beyond_its_amount"
    HOLD_RELEASE_MISMATCH = "hold_release_does_not_match"

    @staticmethod
    def snapshot_mismatch(snapshot_kind: str) -> str:
        return f"{snapshot_kind}_mismatch"


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    message: str
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    account_id: str | None = None
    transaction_id: str | None = None

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "message": self.message,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "account_id": self.account_id,
            "transaction_id": self.transaction_id,
        }


def answer_text(answer: Answer) -> str:
    status, reason = answer
    return status if reason is None else f"{status}/{reason}"


def answers_text(answers: Iterable[Answer]) -> str:
    return ", ".join(sorted(answer_text(answer) for answer in answers))
