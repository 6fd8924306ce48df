"""The producer library: publish wallet commands to Kafka and wait for their outcomes.

Usable from any Python program; it needs only a bootstrap address and topic names (or a
`infra.settings.Settings`), never the project's other services.

- `CommandPublisher` publishes commands to `wallet.commands` with an idempotent producer
  (`acks=all`), keyed by `owner_account(command)` and placed by the project's one
  partitioner, so a command always meets its account's partition. Each delivery report
  becomes a result (`send`, or the future of `submit`) or a `PublishError`; a full local
  queue makes the caller wait, with a bound, and never drops a command.
- `OutcomeWaiter` is the one consumer of `wallet.outcomes` a process needs: it starts at the
  end of the topic and resolves every waiting request by (owning account, transaction id,
  digest), so the answer to a retried or conflicting request is never mistaken for another's.
- `WalletClient` joins the two into request-reply: publish, then wait a bounded time for
  the outcome; `None` means the answer is not known yet (the request is `pending`).

Every client command goes the same way, holds included: for example
`client.request(client_command(PlaceHold, transaction_id=hold_id, account_id=payer, to_account=shop,
amount="12.00", currency="USD", expires_in_ms=60_000), wait_s)`, then `CaptureHold` (with
`hold_id`, `amount` or None for all, `final`) or `VoidHold`, each with its own transaction id
and the payer as `account_id` (on Kafka there is no read model to find the hold's account).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from infra.kafka_clients import FAILOVER_TUNING, kafka_security
from infra.produce import QueueFullTimeout, produce_with_room
from schemas.codec import SchemaError, command_digest, decode_outcome, encode
from schemas.commands import (
    ACCOUNT_ID_LENGTH_MAX,
    CLIENT_COMMANDS,
    LEG_COMMANDS,
    TRANSACTION_ID_LENGTH_MAX,
    ClientCommand,
    Command,
    Role,
    is_valid_id,
    local_credentials,
    owner_account,
)
from schemas.outcomes import FOREIGN_REFUSALS, Outcome, Reason
from schemas.partitioning import KAFKA_PARTITIONER
from streams.core.money import format_amount, parse_amount_minor

if TYPE_CHECKING:
    from infra.settings import Settings

_LOG = logging.getLogger("wallet.producers.client")
_LOG.addHandler(logging.NullHandler())
# librdkafka reports every refused connection; during an outage that is one line per retry,
# so its log goes to Python logging (silent unless the application configures it).
_KAFKA_LOG = logging.getLogger("wallet.producers.kafka")
_KAFKA_LOG.addHandler(logging.NullHandler())

# How long the broker has to acknowledge a command before its delivery fails. Bounds how long
# a caller can wait on a publish during an outage.
MESSAGE_TIMEOUT_MS_DEFAULT = 10_000
# How long a caller waits for room in a full local queue before BackPressureTimeout.
ENQUEUE_TIMEOUT_S_DEFAULT = 30.0
# The local queue: enough for a burst of the load generator, small enough to bound memory.
QUEUE_MESSAGES_MAX = 500_000
QUEUE_KBYTES_MAX = 512 * 1024
DELIVERY_POLL_INTERVAL_S = 0.05
# librdkafka scans for expired messages about once a second, so a delivery report may come
# a little after `message.timeout.ms`; a wait on one allows this much more before giving up.
DELIVERY_REPORT_GRACE_S = 5.0
METADATA_TIMEOUT_S_DEFAULT = 1.0

PUBLISH_BATCH_SIZE_MAX = 10_000

# How long a request-reply waits for an outcome by default before calling the request pending.
REQUEST_WAIT_MS_DEFAULT = 5000

OUTCOME_CACHE_SIZE_DEFAULT = 100_000
WAITS_MAX_DEFAULT = 100_000
OUTCOME_BATCH_SIZE_MAX = 1000
# librdkafka's batch consume waits this long for a full batch before returning what it has,
# so it is added to every answer's latency: keep it short (an idle waiter wakes 100 times/s).
OUTCOME_POLL_TIMEOUT_S = 0.01
CONNECT_RETRY_INTERVAL_S = 0.5


# A hold's capture and void are requests of their own: without an id of the caller's, the HTTP
# API and the CLI give them the hold id with these suffixes (so a retry is the same request).
CAPTURE_ID_SUFFIX, VOID_ID_SUFFIX = ".capture", ".void"


def new_transaction_id(prefix: str = "tx-") -> str:
    """A fresh, unique transaction id. Reuse it (never make a new one) when retrying a request."""
    return f"{prefix}{uuid.uuid4().hex}"


def wall_clock_ms() -> int:
    """The wall clock in epoch milliseconds (for reports; commands carry no time: the broker stamps them)."""
    return time.time_ns() // 1_000_000


_ACCOUNT_FIELDS = ("account_id", "from_account", "to_account")
_TRANSACTION_ID_FIELDS = ("transaction_id", "hold_id")


def _refuse_processor_commands(commands: Iterable[Command]) -> None:
    for command in commands:
        if type(command) in LEG_COMMANDS:
            raise ValueError(f"{type(command).__name__} is a saga leg: only a processor may originate one")
        if type(command) not in CLIENT_COMMANDS:
            raise ValueError(f"{type(command).__name__} is not a client command: only a processor may write one")


def local_command(command_class: type[ClientCommand], **fields: Any) -> Command:
    """`command_class(**fields)` with the `local_credentials` actor and role where not given; ids not
    checked (for bulk generators that make their ids themselves)."""
    actor, role = local_credentials(command_class, fields.get(command_class.owner_field, ""))
    fields.setdefault("actor", actor)
    fields.setdefault("role", role)
    return command_class(**fields)


def client_command(command_class: type, *, actor: str | None = None, role: Role | None = None, **fields) -> Command:
    """A client command with `actor` and `role` (from `local_credentials` where not given), ids checked."""
    if command_class not in CLIENT_COMMANDS:
        raise ValueError(f"{command_class.__name__} is not a client command: only a processor may originate a saga leg")
    owner = fields.get(command_class.owner_field, "")
    local_actor, local_role = local_credentials(command_class, owner)
    # local_credentials only ever answers "bank", "operator" or "user": a Role.
    command = command_class(
        actor=local_actor if actor is None else actor, role=cast(Role, local_role) if role is None else role, **fields
    )
    check_ids(command)
    return command


def check_ids(command: Command) -> None:
    """Raises ValueError naming the field unless every id of the command follows the contract
    (`schemas.commands.is_valid_id`), or if the command is not a client's (a saga leg or a tick),
    which clients may never publish.

    The Kafka decoder checks only the ids' lengths (schemas.commands); their characters are
    the producers' to enforce.
    """
    _refuse_processor_commands([command])
    fields = [(name, TRANSACTION_ID_LENGTH_MAX) for name in _TRANSACTION_ID_FIELDS if hasattr(command, name)]
    fields += [(name, ACCOUNT_ID_LENGTH_MAX) for name in _ACCOUNT_FIELDS if hasattr(command, name)]
    for name, length_max in fields:
        value = getattr(command, name)
        if not is_valid_id(value, length_max):
            raise ValueError(
                f"{name} {value!r} must be 1 to {length_max} characters, start with a letter or digit "
                "and contain only letters, digits and . _ : @ -"
            )


def canonical_amount(amount: str, currency: str) -> str:
    """The amount as the core writes it ('5' USD -> '5.00'); raises AmountError where the core would refuse it.

    Producers send canonical amounts so that two spellings of one sum are one request (one digest).
    """
    return format_amount(parse_amount_minor(amount, currency), currency)


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where the broker stored a command."""

    topic: str
    partition: int
    offset: int


class PublishError(Exception):
    """A command the broker did not acknowledge.

    `possibly_persisted` is True when the command may still have been written (a timeout
    after sending): retrying with the same transaction id is safe either way, since the
    processor applies a transaction id once.
    """

    def __init__(self, message: str, *, code: str, possibly_persisted: bool) -> None:
        super().__init__(message)
        self.code = code
        self.possibly_persisted = possibly_persisted


class BackPressureTimeout(PublishError):
    """The local queue stayed full for the whole enqueue bound; the command was not queued."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="back_pressure_timeout", possibly_persisted=False)


class OutcomesUnavailableError(RuntimeError):
    """The outcome consumer is not connected to Kafka (yet), or too many requests are waiting."""


class CommandPublisher:
    """An idempotent producer of commands onto `wallet.commands`.

    Thread-safe. A background thread serves delivery reports, so futures complete without the
    caller polling. `report_successes=False` is for bulk publishers (`publish_batch` only):
    librdkafka then reports failed deliveries alone, which saves a Python call per command.
    """

    def __init__(
        self,
        bootstrap: str,
        commands_topic: str,
        *,
        message_timeout_ms: int = MESSAGE_TIMEOUT_MS_DEFAULT,
        linger_ms: float = 5,
        enqueue_timeout_s: float = ENQUEUE_TIMEOUT_S_DEFAULT,
        report_successes: bool = True,
        queue_messages_max: int = QUEUE_MESSAGES_MAX,
        client_id: str = "wallet-producer",
    ) -> None:
        self.commands_topic = commands_topic
        self.message_timeout_ms = message_timeout_ms
        self._enqueue_timeout_s = enqueue_timeout_s
        self._report_successes = report_successes
        self._queue_messages_max = queue_messages_max
        self._config = {
            **kafka_security("api"),
            **FAILOVER_TUNING,
            "bootstrap.servers": bootstrap,
            "client.id": client_id,
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": KAFKA_PARTITIONER,
            "message.timeout.ms": message_timeout_ms,
            "linger.ms": linger_ms,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": queue_messages_max,
            "queue.buffering.max.kbytes": QUEUE_KBYTES_MAX,
            "delivery.report.only.error": not report_successes,
            "logger": _KAFKA_LOG,
            "error_cb": self._on_client_error,
        }
        self._producer = Producer(self._config)
        self._replace_lock = threading.Lock()
        self._fatal_error: KafkaError | None = None
        # Set by librdkafka's "all brokers down"; cleared by the next acknowledged delivery.
        self.brokers_down = False
        # Failures of `publish_batch` commands, which have no future to carry them: the first
        # one (its reason) and how many.
        self._first_batch_failure: PublishError | None = None
        self.batch_failure_count = 0
        self._closed = threading.Event()
        self._poller = threading.Thread(
            target=self._serve_delivery_reports, name="wallet-delivery-reports", daemon=True
        )
        self._poller.start()

    @classmethod
    def from_settings(cls, settings: Settings, **options) -> CommandPublisher:
        return cls(settings.bootstrap, settings.commands_topic, **options)

    # -- publishing ------------------------------------------------------------------------

    def submit(self, command: Command) -> concurrent.futures.Future[Delivery]:
        """Queue one command; the future gives its Delivery or raises PublishError.

        Raises ValueError for an id the contract does not allow (`check_ids`).
        """
        if not self._report_successes:
            raise ValueError("this publisher reports failures only; use publish_batch, or report_successes=True")
        check_ids(command)
        future: concurrent.futures.Future[Delivery] = concurrent.futures.Future()
        key = owner_account(command)
        value = encode(command)

        def on_delivery(error: KafkaError | None, message) -> None:
            if error is None:
                self.brokers_down = False
                future.set_result(Delivery(message.topic(), message.partition(), message.offset()))
            else:
                future.set_exception(_publish_error(error, message))

        self._replace_if_fatal()
        try:
            produce_with_room(
                self._producer,
                self.commands_topic,
                value,
                key,
                on_delivery=on_delivery,
                queue_full_wait_ms=int(self._enqueue_timeout_s * 1000),
            )
        except QueueFullTimeout as error:
            raise BackPressureTimeout(f"{error} ({self._queue_messages_max} commands)") from None
        return future

    def send(self, command: Command, timeout_s: float | None = None) -> Delivery:
        """Publish one command and return once the broker acknowledged it (all in-sync replicas).

        The wait is bounded by `message.timeout.ms`; `timeout_s` may bound it further.
        """
        bound_s = self.delivery_bound_s if timeout_s is None else timeout_s
        future = self.submit(command)
        try:
            return future.result(timeout=bound_s)
        except concurrent.futures.TimeoutError:
            raise PublishError(
                f"the broker did not acknowledge {command.transaction_id!r} within {bound_s:.1f} s",
                code="publish_timeout",
                possibly_persisted=True,
            ) from None

    @property
    def delivery_bound_s(self) -> float:
        """The longest a delivery report can take: `message.timeout.ms` and librdkafka's scan."""
        return self.message_timeout_ms / 1000 + DELIVERY_REPORT_GRACE_S

    def publish_batch(self, commands: Sequence[Command]) -> None:
        """Queue many commands at once; failures are counted and raised by `flush`.

        Order within the batch is kept for a single publishing thread: each slice waits for
        room for all of it before it is queued. The bulk path leaves `check_ids` to the caller,
        but never publishes a saga leg or a tick.
        """
        _refuse_processor_commands(commands)
        messages = [{"key": owner_account(command), "value": encode(command)} for command in commands]
        slice_size = min(PUBLISH_BATCH_SIZE_MAX, self._queue_messages_max)
        for start in range(0, len(messages), slice_size):
            self._queue_slice(messages[start : start + slice_size])

    def _queue_slice(self, messages: list[dict]) -> None:
        self._wait_for_room(len(messages))
        deadline_s = time.monotonic() + self._enqueue_timeout_s
        while messages:
            queued = self._producer.produce_batch(self.commands_topic, messages, on_delivery=self._on_batch_delivery)
            if queued == len(messages):
                return
            failed = [message for message in messages if "_error" in message]
            for message in failed:
                error = message.pop("_error")
                if error.code() != KafkaError._QUEUE_FULL:
                    raise PublishError(
                        f"queueing a command failed: {error.str()}", code=error.name(), possibly_persisted=False
                    )
            messages = failed
            if messages:
                # Another thread filled the queue between our look and our produce.
                if time.monotonic() >= deadline_s:
                    raise BackPressureTimeout(
                        f"the local queue stayed full for {self._enqueue_timeout_s:.0f} s "
                        f"({len(messages)} commands not queued)"
                    )
                self._producer.poll(DELIVERY_POLL_INTERVAL_S)

    def flush(self, timeout_s: float) -> None:
        """Wait until every queued command is acknowledged; raise if any was not.

        Raises PublishError for the first failure of a `publish_batch` command, naming the count.
        """
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise PublishError(
                f"{remaining} commands were not acknowledged within {timeout_s:.0f} s",
                code="flush_timeout",
                possibly_persisted=True,
            )
        first = self._first_batch_failure
        if first is not None:
            raise PublishError(
                f"{self.batch_failure_count} batched commands failed; first: {first}",
                code=first.code,
                possibly_persisted=first.possibly_persisted,
            )

    def broker_reachable(self, timeout_s: float = METADATA_TIMEOUT_S_DEFAULT) -> bool:
        """A quick metadata round trip: can a publish succeed at all right now?"""
        try:
            metadata = self._producer.list_topics(self.commands_topic, timeout=timeout_s)
        except KafkaException:
            return False
        topic = metadata.topics.get(self.commands_topic)
        return bool(metadata.brokers) and topic is not None and topic.error is None

    def close(self, timeout_s: float = 10) -> None:
        """Deliver what is queued (up to `timeout_s`), then stop the delivery-report thread."""
        if self._closed.is_set():
            return
        try:
            self._producer.flush(timeout_s)
        finally:
            self._closed.set()
            self._poller.join(timeout=DELIVERY_POLL_INTERVAL_S * 10)

    def __enter__(self) -> CommandPublisher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _wait_for_room(self, message_count: int) -> None:
        self._replace_if_fatal()
        deadline_s = time.monotonic() + self._enqueue_timeout_s
        while len(self._producer) + message_count > self._queue_messages_max:
            if time.monotonic() >= deadline_s:
                raise BackPressureTimeout(
                    f"no room for {message_count} commands in the local queue within {self._enqueue_timeout_s:.0f} s "
                    f"({len(self._producer)} queued); the broker is not keeping up or is unreachable"
                )
            self._producer.poll(DELIVERY_POLL_INTERVAL_S)

    def _on_batch_delivery(self, error: KafkaError | None, message) -> None:
        if error is None:
            self.brokers_down = False
            return
        self.batch_failure_count += 1
        if self._first_batch_failure is None:
            self._first_batch_failure = _publish_error(error, message)

    def _on_client_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal_error = error
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            if not self.brokers_down:
                _LOG.warning("producer: %s", error.str())
            self.brokers_down = True
        else:
            _LOG.debug("producer: %s", error.str())

    def _replace_if_fatal(self) -> None:
        # An idempotent producer that hit a fatal error (for example an out-of-order sequence
        # after broker data loss) refuses every later produce; a fresh one starts a new
        # producer id. Commands queued on the old one fail with their futures.
        if self._fatal_error is None:
            return
        with self._replace_lock:
            if self._fatal_error is None:
                return
            _LOG.error("producer fatal error %s: starting a new producer", self._fatal_error.str())
            old, self._producer = self._producer, Producer(self._config)
            self._fatal_error = None
        old.purge()
        old.flush(0)

    def _serve_delivery_reports(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(DELIVERY_POLL_INTERVAL_S)


def _kafka_error_text(error: KafkaException) -> str:
    first = error.args[0] if error.args else None
    return first.str() if isinstance(first, KafkaError) else str(error)


def _publish_error(error: KafkaError, message) -> PublishError:
    # A timeout after the request may have reached the broker leaves the record's fate unknown.
    possibly_persisted = error.code() in (
        KafkaError._MSG_TIMED_OUT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._TIMED_OUT,
    )
    key = message.key().decode() if message is not None and message.key() is not None else "?"
    return PublishError(
        f"command for account {key!r} not delivered: {error.str()}",
        code=error.name(),
        possibly_persisted=possibly_persisted,
    )


@dataclass(frozen=True, slots=True)
class TransactionStatus:
    """What this process knows of a transaction: `pending` after it published it, then final."""

    transaction_id: str
    status: str  # pending | success | failure
    reason: str | None
    digest: str
    account_id: str = ""  # the account that owns the request
    actor: str = ""  # who asked for it


class OutcomeExpectation:
    """A registered wait for one request's outcome. Register before publishing, then wait."""

    def __init__(self, waiter: OutcomeWaiter, key: tuple[str, str, str]) -> None:
        self._waiter = waiter
        self.key = key
        self.future: concurrent.futures.Future[Outcome] = concurrent.futures.Future()

    def wait(self, timeout_s: float) -> Outcome | None:
        """The outcome, or None if it did not arrive within `timeout_s` (the request is pending)."""
        try:
            return self.future.result(timeout=max(0.0, timeout_s))
        except concurrent.futures.TimeoutError:
            return None

    async def wait_async(self, timeout_s: float) -> Outcome | None:
        wrapped = asyncio.wrap_future(self.future)
        # asyncio.wait, unlike wait_for, does not cancel the future when time runs out.
        done, _ = await asyncio.wait({wrapped}, timeout=max(0.0, timeout_s))
        return wrapped.result() if done else None

    def close(self) -> None:
        self._waiter._forget(self)

    def __enter__(self) -> OutcomeExpectation:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


OutcomeListener = Callable[[list[Outcome]], None]


class OutcomeWaiter:
    """The process's one consumer of `wallet.outcomes`.

    It reads committed records only, from the end of every partition as it was when the
    consumer connected (so it never replays history), commits nothing, and hands each outcome
    to the requests waiting for exactly that (transaction id, digest), to the listeners, and
    to a bounded cache of recent transaction statuses.
    """

    def __init__(
        self,
        bootstrap: str,
        outcomes_topic: str,
        *,
        cache_size_max: int = OUTCOME_CACHE_SIZE_DEFAULT,
        waits_max: int = WAITS_MAX_DEFAULT,
    ) -> None:
        self.outcomes_topic = outcomes_topic
        self._cache_size_max = cache_size_max
        self._waits_max = waits_max
        self._consumer = Consumer(
            {
                **kafka_security("api"),
                **FAILOVER_TUNING,
                "bootstrap.servers": bootstrap,
                # librdkafka wants a group id even for assign(); nothing is ever committed under it.
                "group.id": f"wallet-outcome-waiter-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                # A request must never be answered by an outcome of an aborted transaction.
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 10,
                "logger": _KAFKA_LOG,
                "error_cb": self._on_client_error,
            }
        )
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, str, str], list[OutcomeExpectation]] = {}
        self._waiting_count = 0
        self._statuses: collections.OrderedDict[str, TransactionStatus] = collections.OrderedDict()
        self._listeners: list[OutcomeListener] = []
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self.last_error: str | None = None
        self.outcomes_seen = 0
        self._thread = threading.Thread(target=self._run, name="wallet-outcome-waiter", daemon=True)

    @classmethod
    def from_settings(cls, settings: Settings, **options) -> OutcomeWaiter:
        return cls(settings.bootstrap, settings.outcomes_topic, **options)

    def start(self, ready_timeout_s: float | None = None) -> OutcomeWaiter:
        """Start consuming; with `ready_timeout_s`, also wait until positioned (else raise)."""
        self._thread.start()
        if ready_timeout_s is not None and not self.wait_ready(ready_timeout_s):
            raise OutcomesUnavailableError(self.unavailable_reason(ready_timeout_s))
        return self

    def wait_ready(self, timeout_s: float) -> bool:
        """True once the consumer is positioned at the end of every partition."""
        return self._ready.wait(timeout_s)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def waiting_count(self) -> int:
        """Requests waiting for their outcome now."""
        return self._waiting_count

    def unavailable_reason(self, waited_s: float) -> str:
        return (
            f"not connected to Kafka: the outcome consumer of {self.outcomes_topic} was not ready within "
            f"{waited_s:.1f} s (last error: {self.last_error or 'none reported'})"
        )

    def expect(self, transaction_id: str, digest: str, account_id: str = "") -> OutcomeExpectation:
        """Register interest in the outcome of the request (account_id, transaction_id, digest).

        A request is identified by its owning account and its transaction id: two callers who
        pick the same id for different accounts never get each other's answers. An empty
        `account_id` matches the outcome of any account (for callers that know only the id).
        """
        expectation = OutcomeExpectation(self, (account_id, transaction_id, digest))
        with self._lock:
            if self._waiting_count >= self._waits_max:
                raise OutcomesUnavailableError(f"{self._waits_max} requests are already waiting for outcomes")
            self._waiting.setdefault(expectation.key, []).append(expectation)
            self._waiting_count += 1
        return expectation

    def note_published(self, transaction_id: str, digest: str, account_id: str = "", actor: str = "") -> None:
        """Record that this process published a request whose outcome is not known yet."""
        with self._lock:
            if transaction_id not in self._statuses:
                self._remember(TransactionStatus(transaction_id, "pending", None, digest, account_id, actor))

    def status(self, transaction_id: str) -> TransactionStatus | None:
        """The status of a transaction this process published or saw an outcome of recently."""
        with self._lock:
            return self._statuses.get(transaction_id)

    def add_listener(self, listener: OutcomeListener) -> None:
        """Call `listener(outcomes)` on the consumer thread for every batch of outcomes read."""
        with self._lock:
            self._listeners.append(listener)

    def close(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=OUTCOME_POLL_TIMEOUT_S * 50)
        self._consumer.close()

    def __enter__(self) -> OutcomeWaiter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- consumer thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set() and not self._position_at_end():
            self._stopping.wait(CONNECT_RETRY_INTERVAL_S)
        while not self._stopping.is_set():
            try:
                messages = self._consumer.consume(OUTCOME_BATCH_SIZE_MAX, OUTCOME_POLL_TIMEOUT_S)
            except KafkaException as error:
                self.last_error = _kafka_error_text(error)
                continue
            outcomes = []
            for message in messages:
                record_error = message.error()
                if record_error is not None:
                    self.last_error = record_error.str()
                    continue
                value = message.value()
                assert value is not None  # a record without an error carries a value
                try:
                    outcomes.append(decode_outcome(value))
                except SchemaError as error:
                    _LOG.warning(
                        "skipping an undecodable record at %s[%d]@%d: %s",
                        message.topic(),
                        message.partition(),
                        message.offset(),
                        error,
                    )
            if outcomes:
                self._deliver(outcomes)

    def _position_at_end(self) -> bool:
        # Explicit offsets read now, rather than OFFSET_END resolved lazily on the first fetch:
        # once ready, every outcome appended later is seen, so a request registered and
        # published after start() can never miss its answer.
        try:
            metadata = self._consumer.list_topics(self.outcomes_topic, timeout=METADATA_TIMEOUT_S_DEFAULT)
            topic = metadata.topics.get(self.outcomes_topic)
            if topic is None or topic.error is not None or not topic.partitions:
                self.last_error = f"topic {self.outcomes_topic} not found ({topic.error if topic else 'no metadata'})"
                return False
            assignment = []
            for partition in sorted(topic.partitions):
                _, high = self._consumer.get_watermark_offsets(
                    TopicPartition(self.outcomes_topic, partition), timeout=METADATA_TIMEOUT_S_DEFAULT * 5, cached=False
                )
                assignment.append(TopicPartition(self.outcomes_topic, partition, high))
            self._consumer.assign(assignment)
        except KafkaException as error:
            self.last_error = _kafka_error_text(error)
            return False
        self._ready.set()
        return True

    def _on_client_error(self, error: KafkaError) -> None:
        self.last_error = error.str()

    def _deliver(self, outcomes: list[Outcome]) -> None:
        resolved: list[tuple[OutcomeExpectation, Outcome]] = []
        with self._lock:
            self.outcomes_seen += len(outcomes)
            for outcome in outcomes:
                self._record(outcome)
                # account_id "" in `expect` is "any account": for callers that know only the id.
                exact = self._waiting.pop((outcome.account_id, outcome.transaction_id, outcome.digest), [])
                for expectation in exact + self._waiting.pop(("", outcome.transaction_id, outcome.digest), []):
                    self._waiting_count -= 1
                    resolved.append((expectation, outcome))
            listeners = list(self._listeners)
        for expectation, outcome in resolved:
            if not expectation.future.done():
                expectation.future.set_result(outcome)
        for listener in listeners:
            listener(outcomes)

    def _record(self, outcome: Outcome) -> None:
        known = self._statuses.get(outcome.transaction_id)
        if outcome.reason == Reason.DUPLICATE_CONFLICT:
            # It answers a conflicting request, not the transaction; the transaction's own
            # answer is whatever the first request got, which this process may not know.
            if known is not None and known.status == "pending" and known.digest == outcome.digest:
                del self._statuses[outcome.transaction_id]
            return
        if known is None or (
            known.status == "pending" and (outcome.reason not in FOREIGN_REFUSALS or known.digest == outcome.digest)
        ):  # a stranger's refusal under the id of a request in flight answers the stranger only
            self._remember(
                TransactionStatus(
                    outcome.transaction_id,
                    outcome.status,
                    outcome.reason,
                    outcome.digest,
                    outcome.account_id,
                    outcome.actor,
                )
            )

    def _remember(self, status: TransactionStatus) -> None:
        self._statuses[status.transaction_id] = status
        self._statuses.move_to_end(status.transaction_id)
        while len(self._statuses) > self._cache_size_max:
            self._statuses.popitem(last=False)

    def _forget(self, expectation: OutcomeExpectation) -> None:
        with self._lock:
            waiting = self._waiting.get(expectation.key)
            if waiting is not None and expectation in waiting:
                waiting.remove(expectation)
                self._waiting_count -= 1
                if not waiting:
                    del self._waiting[expectation.key]


class WalletClient:
    """Request-reply over Kafka: publish a command, wait a bounded time for its outcome."""

    def __init__(self, publisher: CommandPublisher, waiter: OutcomeWaiter) -> None:
        self.publisher = publisher
        self.waiter = waiter

    @classmethod
    def connect(cls, settings: Settings, *, ready_timeout_s: float = 15, **publisher_options) -> WalletClient:
        """Start a publisher and an outcome waiter for `settings`; raises if Kafka does not answer."""
        waiter = OutcomeWaiter.from_settings(settings)
        try:
            waiter.start(ready_timeout_s=ready_timeout_s)
        except OutcomesUnavailableError:
            waiter.close()
            raise
        return cls(CommandPublisher.from_settings(settings, **publisher_options), waiter)

    def request(self, command: Command, wait_s: float, publish_timeout_s: float | None = None) -> Outcome | None:
        """Publish `command` and return its outcome, or None if not known within `wait_s`.

        Raises PublishError if the broker did not take the command.
        """
        digest = command_digest(command)
        with self.waiter.expect(command.transaction_id, digest, owner_account(command)) as expectation:
            self.publisher.send(command, publish_timeout_s)
            self.waiter.note_published(command.transaction_id, digest, owner_account(command), command.actor)
            return expectation.wait(wait_s)

    async def request_async(self, command: Command, wait_s: float) -> Outcome | None:
        """`request` for an event loop: neither the publish nor the wait blocks the loop."""
        digest = command_digest(command)
        with self.waiter.expect(command.transaction_id, digest, owner_account(command)) as expectation:
            delivery = asyncio.wrap_future(self.publisher.submit(command))
            bound_s = self.publisher.delivery_bound_s
            done, _ = await asyncio.wait({delivery}, timeout=bound_s)
            if not done:
                raise PublishError(
                    f"the broker did not acknowledge {command.transaction_id!r} within {bound_s:.1f} s",
                    code="publish_timeout",
                    possibly_persisted=True,
                )
            delivery.result()  # raises the PublishError of a failed delivery
            self.waiter.note_published(command.transaction_id, digest, owner_account(command), command.actor)
            return await expectation.wait_async(wait_s)

    def request_many(self, commands: Iterable[Command], wait_s: float) -> dict[str, Outcome]:
        """Publish many commands at once and wait (`wait_s` in all) for their outcomes.

        Returns the outcomes that arrived, by transaction id; each command needs its own id.
        """
        commands = list(commands)
        expectations = [
            self.waiter.expect(command.transaction_id, command_digest(command), owner_account(command))
            for command in commands
        ]
        try:
            self.publisher.publish_batch(commands)
            deadline_s = time.monotonic() + wait_s
            self.publisher.flush(wait_s)
            outcomes = {}
            for expectation in expectations:
                outcome = expectation.wait(deadline_s - time.monotonic())
                if outcome is not None:
                    outcomes[outcome.transaction_id] = outcome
            return outcomes
        finally:
            for expectation in expectations:
                expectation.close()

    def close(self) -> None:
        self.publisher.close()
        self.waiter.close()

    def __enter__(self) -> WalletClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
