package streamwallet.peer;

import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.security.MessageDigest;
import java.util.HexFormat;
import java.util.Map;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueStore;

/**
 * The wallet's transfer saga, one record at a time, as the project's processor decides it
 * (streams/core), reduced to what the bench's input exercises: open, deposit, transfer, and the
 * credit and refund legs.
 *
 * <p>A transfer debits the sender on the sender's partition (event transfer_debited) and sends a
 * credit leg keyed by the receiver back into the commands topic; the receiver's task credits it (event
 * transfer_credited, outcome success) or, if the receiver does not exist, refuses it (event
 * command_rejected) and sends a refund leg keyed by the sender, whose task refunds (event
 * transfer_refunded, outcome failure). A leg keyed by an account of the partition that made it is
 * decided there at once and never written, as ours does (streams/core/admission.py). A refused
 * command writes a command_rejected event and a failure outcome, as ours does, so every kind of
 * transfer moves as many messages here as there.
 * Every account change takes the account's next seq, with no gap.
 *
 * <p>What the peer leaves out, against ours: the idempotency memory (the bench sends no retries),
 * freeze/close/withdraw/merchant rules, and the dead-letter path (bad input stops the peer).
 * The digest is SHA-256 of the client command's bytes cut to 12 bytes (the JDK has no BLAKE2);
 * same size, same place in every message.
 */
final class SagaProcessor implements Processor<String, byte[], String, byte[]> {
    static final String STORE = "accounts";
    static final String TO_EVENTS = "events";
    static final String TO_LEGS = "legs-out";
    static final String TO_OUTCOMES = "outcomes";

    static final String ACCOUNT_NOT_FOUND = "account_not_found";
    static final String ACCOUNT_EXISTS = "account_exists";
    static final String INSUFFICIENT_FUNDS = "insufficient_funds";
    static final String INVALID_AMOUNT = "invalid_amount";
    static final String NOT_AUTHORIZED = "not_authorized";
    static final String SAME_ACCOUNT = "same_account";

    private static final int DIGEST_BYTES = 12;
    private static final int MAC_BYTES = 16;
    private static final HexFormat HEX = HexFormat.of();
    private static final byte[] MAC_FIELD = "\"mac\":\"".getBytes(StandardCharsets.US_ASCII);

    private final String legKeyId;
    private final byte[] legKey;
    private final int partitions;
    private final Runnable onFirstRecord;
    private ProcessorContext<String, byte[]> context;
    private KeyValueStore<String, byte[]> accounts;
    private MessageDigest sha256;
    private Mac hmac;

    SagaProcessor(String legKeyId, byte[] legKey, int partitions, Runnable onFirstRecord) {
        this.legKeyId = legKeyId;
        this.legKey = legKey;
        this.partitions = partitions;
        this.onFirstRecord = onFirstRecord;
    }

    @Override
    public void init(ProcessorContext<String, byte[]> context) {
        this.context = context;
        this.accounts = context.getStateStore(STORE);
        try {
            sha256 = MessageDigest.getInstance("SHA-256");
            hmac = Mac.getInstance("HmacSHA256");
            hmac.init(new SecretKeySpec(legKey, "HmacSHA256"));
        } catch (GeneralSecurityException error) {
            throw new IllegalStateException("the JDK lacks SHA-256 or HmacSHA256", error);
        }
    }

    /** An account as the store keeps it: balance and seq, 8 bytes each, then the owner in UTF-8. */
    private static final class Account {
        long balanceMinor;
        long seq;
        String owner;

        static Account decode(byte[] stored) {
            if (stored == null) {
                return null;
            }
            ByteBuffer buffer = ByteBuffer.wrap(stored);
            Account account = new Account();
            account.balanceMinor = buffer.getLong();
            account.seq = buffer.getLong();
            account.owner = new String(stored, 16, stored.length - 16, StandardCharsets.UTF_8);
            return account;
        }

        byte[] encode() {
            assert balanceMinor >= 0 : "balance below zero";
            byte[] ownerBytes = owner.getBytes(StandardCharsets.UTF_8);
            return ByteBuffer.allocate(16 + ownerBytes.length).putLong(balanceMinor).putLong(seq).put(ownerBytes)
                    .array();
        }
    }

    /** What every message about one request repeats. */
    private record Request(int version, String type, String transactionId, String owningAccount, String actor,
                           String digest, long timeMs) {
        boolean v2() {
            return version >= 2;
        }
    }

    @Override
    public void process(Record<String, byte[]> record) {
        if (onFirstRecord != null) {
            onFirstRecord.run();
        }
        Map<String, Object> command = FlatJson.parse(record.value());
        String type = (String) command.get("type");
        switch (type) {
            case "open_account" -> openAccount(command, record);
            case "deposit" -> deposit(command, record);
            case "transfer" -> transfer(command, record);
            case "credit_leg", "refund_leg" -> {
                verifyLeg(record.value(), command);
                if (type.equals("credit_leg")) {
                    creditLeg(command, record);
                } else {
                    refundLeg(command, record);
                }
            }
            default -> throw new IllegalArgumentException("the Kafka Streams peer implements transfers only, not "
                    + type);
        }
    }

    // -- the steps ------------------------------------------------------------------------------

    private void openAccount(Map<String, Object> command, Record<String, byte[]> record) {
        String accountId = (String) command.get("account_id");
        Request request = clientRequest(command, record, accountId);
        if (accounts.get(accountId) != null) {
            reject(request, accountId, ACCOUNT_EXISTS);
            return;
        }
        Account account = new Account();
        account.seq = 1;
        account.owner = request.actor() == null ? "" : request.actor();
        accounts.put(accountId, account.encode());
        FlatJson.Writer event = eventHead("account_opened", request, accountId).num("seq", account.seq);
        if (request.v2()) {
            event.str("owner", account.owner);
        }
        event.str("currency", (String) command.get("currency")).str("kind", (String) command.getOrDefault("kind", "user"))
                .str("balance", Money.format(0));
        emitEvent(accountId, event, record);
        answer(request, null);
    }

    private void deposit(Map<String, Object> command, Record<String, byte[]> record) {
        String accountId = (String) command.get("account_id");
        Request request = clientRequest(command, record, accountId);
        Account account = Account.decode(accounts.get(accountId));
        long amountMinor = Money.parseMinor((String) command.get("amount"));
        if (account == null) {
            reject(request, accountId, ACCOUNT_NOT_FOUND);
        } else if (request.v2() && !"bank".equals(command.get("role"))) {
            reject(request, accountId, NOT_AUTHORIZED);
        } else if (amountMinor < 0) {
            reject(request, accountId, INVALID_AMOUNT);
        } else {
            account.balanceMinor = Math.addExact(account.balanceMinor, amountMinor);
            account.seq++;
            accounts.put(accountId, account.encode());
            emitEvent(accountId, moneyEvent("deposited", request, accountId, account, command), record);
            answer(request, null);
        }
    }

    private void transfer(Map<String, Object> command, Record<String, byte[]> record) {
        String from = (String) command.get("from_account");
        String to = (String) command.get("to_account");
        Request request = clientRequest(command, record, from);
        Account sender = Account.decode(accounts.get(from));
        long amountMinor = Money.parseMinor((String) command.get("amount"));
        if (sender == null) {
            reject(request, from, ACCOUNT_NOT_FOUND);
        } else if (request.v2() && !sender.owner.equals(request.actor())) {
            reject(request, from, NOT_AUTHORIZED);
        } else if (from.equals(to)) {
            reject(request, from, SAME_ACCOUNT);
        } else if (amountMinor < 0) {
            reject(request, from, INVALID_AMOUNT);
        } else if (sender.balanceMinor < amountMinor) {
            reject(request, from, INSUFFICIENT_FUNDS);
        } else {
            sender.balanceMinor -= amountMinor;
            sender.seq++;
            accounts.put(from, sender.encode());
            FlatJson.Writer event = moneyEvent("transfer_debited", request, from, sender, command)
                    .str("to_account", to).bool("merchant_only", false);
            emitEvent(from, event, record);
            FlatJson.Writer leg = legHead("credit_leg", request).str("from_account", from).str("to_account", to)
                    .str("amount", (String) command.get("amount")).str("currency", (String) command.get("currency"))
                    .str("digest", request.digest()).bool("merchant_only", false).bool("resend", false);
            emitLeg(to, leg, record);
        }
    }

    private void creditLeg(Map<String, Object> leg, Record<String, byte[]> record) {
        String from = (String) leg.get("from_account");
        String to = (String) leg.get("to_account");
        Request request = legRequest(leg, record, from);
        Account receiver = Account.decode(accounts.get(to));
        long issuedMs = (Long) leg.get("issued_ms");
        if (receiver == null) {
            refuseLeg(request, to, from, issuedMs);  // the receiver's side refuses (the refund answers) ...
            FlatJson.Writer refund = legHead("refund_leg", request).str("from_account", from).str("to_account", to)
                    .str("amount", (String) leg.get("amount")).str("currency", (String) leg.get("currency"))
                    .str("digest", request.digest()).str("reason", ACCOUNT_NOT_FOUND).num("debit_ms", issuedMs);
            emitLeg(from, refund, record);  // ... and the sender's side gives the money back
            return;
        }
        receiver.balanceMinor = Math.addExact(receiver.balanceMinor, Money.parseMinor((String) leg.get("amount")));
        receiver.seq++;
        accounts.put(to, receiver.encode());
        FlatJson.Writer event = moneyEvent("transfer_credited", request, to, receiver, leg).str("from_account", from);
        if (request.v2()) {
            event.num("issued_ms", issuedMs);
        }
        emitEvent(to, event, record);
        answer(request, null);
    }

    private void refundLeg(Map<String, Object> leg, Record<String, byte[]> record) {
        String from = (String) leg.get("from_account");
        String reason = (String) leg.get("reason");
        Request request = legRequest(leg, record, from);
        Account sender = Account.decode(accounts.get(from));
        if (sender == null) {
            throw new IllegalStateException("a refund to " + from + ", which this peer never debited");
        }
        sender.balanceMinor = Math.addExact(sender.balanceMinor, Money.parseMinor((String) leg.get("amount")));
        sender.seq++;
        accounts.put(from, sender.encode());
        FlatJson.Writer event = moneyEvent("transfer_refunded", request, from, sender, leg)
                .str("to_account", (String) leg.get("to_account")).str("reason", reason);
        emitEvent(from, event, record);
        answer(request, reason);
    }

    // -- messages --------------------------------------------------------------------------------

    private Request clientRequest(Map<String, Object> command, Record<String, byte[]> record, String owningAccount) {
        Object version = command.get("v");
        sha256.reset();
        byte[] hash = sha256.digest(record.value());
        String digest = HEX.formatHex(hash, 0, DIGEST_BYTES);
        return new Request(version == null ? 1 : ((Long) version).intValue(), (String) command.get("type"),
                (String) command.get("transaction_id"), owningAccount, (String) command.get("actor"), digest,
                record.timestamp());
    }

    /** A leg's events name the leg as their command, as the project's core does (command_type). */
    private static Request legRequest(Map<String, Object> leg, Record<String, byte[]> record, String owningAccount) {
        return new Request(((Long) leg.get("v")).intValue(), (String) leg.get("type"), (String) leg.get("transaction_id"),
                owningAccount, (String) leg.get("actor"), (String) leg.get("digest"), record.timestamp());
    }

    private static FlatJson.Writer eventHead(String eventType, Request request, String accountId) {
        FlatJson.Writer event = new FlatJson.Writer().str("type", eventType).num("v", request.version())
                .str("account_id", accountId).str("transaction_id", request.transactionId())
                .num("ts_ms", request.timeMs()).str("command", request.type()).str("digest", request.digest());
        if (request.v2()) {
            event.str("actor", request.actor());
        }
        return event;
    }

    private static FlatJson.Writer moneyEvent(String eventType, Request request, String accountId, Account account,
                                              Map<String, Object> command) {
        return eventHead(eventType, request, accountId).num("seq", account.seq)
                .str("amount", (String) command.get("amount")).str("currency", (String) command.get("currency"))
                .str("balance", Money.format(account.balanceMinor));
    }

    private FlatJson.Writer legHead(String legType, Request request) {
        return new FlatJson.Writer().str("type", legType).num("v", request.version())
                .str("transaction_id", request.transactionId()).str("actor", request.actor() == null ? "" : request.actor())
                .num("issued_ms", request.timeMs()).str("kid", legKeyId);
    }

    /** A refused client command: its decision event and its failure outcome. */
    private void reject(Request request, String accountId, String reason) {
        FlatJson.Writer event = eventHead("command_rejected", request, accountId).str("reason", reason);
        if (request.v2()) {
            event.nil("issued_ms").nil("from_account");
        }
        context.forward(new Record<>(accountId, event.bytes(), request.timeMs()), TO_EVENTS);
        answer(request, reason);
    }

    /** A credit leg refused by its receiver: the decision event only; the refund step answers. */
    private void refuseLeg(Request request, String accountId, String fromAccount, long issuedMs) {
        FlatJson.Writer event = eventHead("command_rejected", request, accountId).str("reason", ACCOUNT_NOT_FOUND);
        if (request.v2()) {
            event.num("issued_ms", issuedMs).str("from_account", fromAccount);
        }
        context.forward(new Record<>(accountId, event.bytes(), request.timeMs()), TO_EVENTS);
    }

    private void answer(Request request, String reason) {
        FlatJson.Writer outcome = new FlatJson.Writer().str("type", "outcome").num("v", request.version())
                .str("transaction_id", request.transactionId());
        if (request.v2()) {
            outcome.str("account_id", request.owningAccount()).str("actor", request.actor());
        }
        outcome.str("status", reason == null ? "success" : "failure").str("reason", reason)
                .str("digest", request.digest());
        context.forward(new Record<>(request.transactionId(), outcome.bytes(), request.timeMs()), TO_OUTCOMES);
    }

    private void emitEvent(String accountId, FlatJson.Writer event, Record<String, byte[]> cause) {
        context.forward(new Record<>(accountId, event.bytes(), cause.timestamp()), TO_EVENTS);
    }

    /**
     * Signs the leg as schemas/leg_auth.py does: HMAC-SHA256 over the leg with mac "", cut to 16 bytes, hex;
     * or decides it at once when its key is on the partition of the record that made it.
     */
    private void emitLeg(String key, FlatJson.Writer legWithoutMac, Record<String, byte[]> cause) {
        byte[] unsigned = legWithoutMac.str("mac", "").bytes();
        int here = context.recordMetadata().orElseThrow().partition();
        if (SagaPeer.partitionFor(key, partitions) == here) {
            Map<String, Object> leg = FlatJson.parse(unsigned);
            if ("credit_leg".equals(leg.get("type"))) {
                creditLeg(leg, cause);
            } else {
                refundLeg(leg, cause);
            }
            return;
        }
        String mac = HEX.formatHex(hmac.doFinal(unsigned), 0, MAC_BYTES);
        context.forward(new Record<>(key, withMac(unsigned, mac), cause.timestamp()), TO_LEGS);
    }

    /** The leg bytes with `"mac":""` replaced by `"mac":"<hex>"` (the peer writes mac last). */
    private static byte[] withMac(byte[] unsigned, String mac) {
        int at = lastIndexOf(unsigned, MAC_FIELD);
        byte[] macBytes = mac.getBytes(StandardCharsets.US_ASCII);
        int head = at + MAC_FIELD.length;
        byte[] signed = new byte[unsigned.length + macBytes.length];
        System.arraycopy(unsigned, 0, signed, 0, head);
        System.arraycopy(macBytes, 0, signed, head, macBytes.length);
        System.arraycopy(unsigned, head, signed, head + macBytes.length, unsigned.length - head);
        return signed;
    }

    /** A leg this peer did not sign (or that changed on the way) stops the peer: its commands topic is its own. */
    private void verifyLeg(byte[] signed, Map<String, Object> leg) {
        String mac = (String) leg.get("mac");
        int at = lastIndexOf(signed, MAC_FIELD);
        if (mac == null || at < 0 || !legKeyId.equals(leg.get("kid"))) {
            throw new IllegalStateException("an unsigned leg on the peer's own commands topic");
        }
        int head = at + MAC_FIELD.length;
        byte[] unsigned = new byte[signed.length - mac.length()];
        System.arraycopy(signed, 0, unsigned, 0, head);
        System.arraycopy(signed, head + mac.length(), unsigned, head, signed.length - head - mac.length());
        String expected = HEX.formatHex(hmac.doFinal(unsigned), 0, MAC_BYTES);
        if (!MessageDigest.isEqual(expected.getBytes(StandardCharsets.US_ASCII),
                mac.getBytes(StandardCharsets.US_ASCII))) {
            throw new IllegalStateException("a leg whose MAC does not verify: " + leg.get("transaction_id"));
        }
    }

    private static int lastIndexOf(byte[] data, byte[] part) {
        outer:
        for (int i = data.length - part.length; i >= 0; i--) {
            for (int j = 0; j < part.length; j++) {
                if (data[i + j] != part[j]) {
                    continue outer;
                }
            }
            return i;
        }
        return -1;
    }
}
