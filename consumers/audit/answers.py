"""Answers: every decision in the log has exactly one answer on wallet.outcomes, and every answer its decision.

A request is its owning account and its transaction id. The audit keys requests by (transaction
id, digest): the digest covers the command and so its owning account, and a `duplicate_conflict`
answer to a request that reused an id with another payload is never confused with the
transaction's own. An answer that names its account (contract v2) must name the account whose
events decide it. The ledger replay indexes every answer
first (`AnswerEntry`), marks the entries its events decide as it folds, and files each decision
whose answer is not the first one given (or is missing) as an `UnansweredDecision`;
`check_answers` then names what does not pair up.
"""

from __future__ import annotations

from collections.abc import Callable

from consumers.audit.transfers import DEBITED, REFUSED, Report, TransferRecord
from consumers.audit.violations import Answer, Kind, Location, RequestKey, answers_text
from schemas.events import (
    AccountClosed,
    AccountFrozen,
    AccountOpened,
    AccountUnfrozen,
    CommandRejected,
    Deposited,
    TransferCredited,
    TransferDebited,
    TransferRefunded,
    Withdrawn,
)

ANY_EVENT = (
    AccountOpened,
    Deposited,
    Withdrawn,
    TransferDebited,
    TransferCredited,
    TransferRefunded,
    AccountFrozen,
    AccountUnfrozen,
    AccountClosed,
    CommandRejected,
)


class AnswerEntry:
    """A request answered on wallet.outcomes."""

    __slots__ = ("answer", "location", "account_id", "decided", "others", "settled")

    def __init__(self, answer: Answer, location: Location, account_id: str) -> None:
        self.answer = answer  # the first answer given
        self.location = location  # where it was given
        self.account_id = account_id  # the owning account it names
        self.decided = False  # an event of the request decides this answer
        self.others: dict[Answer, Location] | None = None  # different answers given later, each where first
        self.settled = False  # a transfer whose debit and legs have all been seen and agree

    def add_other(self, answer: Answer, location: Location) -> None:
        if self.others is None:
            self.others = {}
        self.others.setdefault(answer, location)

    @property
    def given(self) -> dict[Answer, Location]:
        return {self.answer: self.location, **(self.others or {})}


class UnansweredDecision:
    """A request whose events decide an answer that is not the first one on wallet.outcomes (or
    that has none there): where its first such event is, and every answer its events decide."""

    __slots__ = ("partition", "offset", "account_id", "answers")

    def __init__(self, partition: int, offset: int, account_id: str, answers: set[Answer]) -> None:
        self.partition = partition
        self.offset = offset
        self.account_id = account_id
        self.answers = answers

    @property
    def location(self) -> Location:
        return (self.partition, self.offset)

    def merge(self, other: UnansweredDecision) -> None:
        """Adds what another replay (of other partitions) found for the same request."""
        self.answers |= other.answers
        if other.location < self.location:
            self.partition, self.offset, self.account_id = other.partition, other.offset, other.account_id


def check_answers(
    answered: dict[RequestKey, AnswerEntry],
    unanswered: dict[RequestKey, UnansweredDecision],
    open_transfers: dict[RequestKey, list[TransferRecord]],
    later_event: Callable[..., object],
    report: Report,
    events_topic: str,
    outcomes_topic: str,
) -> None:
    """Every decision has exactly one answer on wallet.outcomes, and every answer its decision.

    Read order makes this exact on a live log: the outcomes are read after the events, and
    an answer is committed in the same transaction as its decision, so every decision in
    the snapshot has its answer in what was read; an answer may be newer than the snapshot,
    and only then can its decision be missing from it.
    """
    for key, entry in answered.items():
        if entry.decided and entry.others is None and key not in unanswered:
            continue  # the common case: one answer, and the request's events decide it
        transaction_id, digest = key
        given = entry.given
        first = min(given.values())
        decided_answers = ({entry.answer} if entry.decided else set()) | (
            unanswered[key].answers if key in unanswered else set()
        )
        if not decided_answers:
            _check_undecided(key, given, open_transfers.get(key, ()), later_event, report, events_topic, outcomes_topic)
        elif set(given) != decided_answers:
            undecided = [location for answer, location in given.items() if answer not in decided_answers]
            report(
                Kind.OUTCOME_MISMATCH,
                f"answered {answers_text(given)} but the log's events decide {answers_text(decided_answers)}",
                *min(undecided or [first]),
                topic=outcomes_topic,
                transaction_id=transaction_id,
            )
        elif len(given) > 1:
            report(
                Kind.OUTCOME_CONFLICT,
                f"{len(given)} different answers to one request: {answers_text(given)}",
                *first,
                topic=outcomes_topic,
                transaction_id=transaction_id,
            )
    for key, decision in unanswered.items():
        if key not in answered:
            transaction_id, digest = key
            report(
                Kind.DECISION_WITHOUT_OUTCOME,
                f"decided {answers_text(decision.answers)} but {outcomes_topic} has no answer with digest {digest}",
                *decision.location,
                account_id=decision.account_id,
                transaction_id=transaction_id,
            )


def _check_undecided(
    key: RequestKey,
    given: dict[Answer, Location],
    records,
    later_event: Callable[..., object],
    report: Report,
    events_topic: str,
    outcomes_topic: str,
) -> None:
    """An answer that no event of the snapshot decides: an unsettled transfer, or no decision at all."""
    transaction_id, digest = key
    first = min(given.values())
    debit = next((record for record in records if record.kind == DEBITED), None)
    if debit is not None:
        if later_event(key, TransferCredited, TransferRefunded) is None:
            missing = "refund" if any(record.kind == REFUSED for record in records) else "credit or refund"
            report(
                Kind.OUTCOME_BEFORE_SETTLEMENT,
                f"answer {answers_text(given)} for a transfer whose debit at "
                f"partition {debit.partition} offset {debit.offset} has no {missing} in the log",
                *first,
                topic=outcomes_topic,
                account_id=debit.account_id,
                transaction_id=transaction_id,
            )
    elif later_event(key, *ANY_EVENT) is None:
        report(
            Kind.OUTCOME_WITHOUT_DECISION,
            f"answer {answers_text(given)} (digest {digest}) has no decision event in {events_topic}",
            *first,
            topic=outcomes_topic,
            transaction_id=transaction_id,
        )
