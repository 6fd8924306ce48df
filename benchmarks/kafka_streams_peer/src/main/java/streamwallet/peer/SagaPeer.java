package streamwallet.peer;

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.Map;
import java.util.Optional;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicBoolean;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.utils.Utils;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.processor.StreamPartitioner;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.StoreBuilder;
import org.apache.kafka.streams.state.Stores;

/**
 * The Kafka Streams peer of `wallet bench`: the project's transfer saga (SagaProcessor) on the
 * Processor API with a persistent RocksDB store, exactly_once_v2, 2 stream threads and a 1,000 ms
 * commit interval (issue 14's set-up).
 *
 * <p>It reads its commands topic (the bench writes it the same records, on the same partitions,
 * as the wallet processor's) and sends its saga legs back into it, as ours does: a leg queues
 * behind everything already on its partition, so a credit never overtakes its receiver's
 * opening (with a topic of legs of its own, a task could take a leg before the opening on its
 * other partition). It writes events, legs and outcomes in the project's JSON. Every record it writes is placed by
 * murmur2(UTF-8 key) like schemas/partitioning.py, through an explicit partitioner rather than
 * the client's default, so the placement is visibly the project's.
 *
 * <p>Prints FIRST_RECORD_MARKER on stdout when it takes its first record (the harness's clock
 * starts there); stops cleanly on SIGTERM.
 */
public final class SagaPeer {
    static final String FIRST_RECORD_MARKER = "kafka-streams-peer: first record";
    static final String RUNNING_MARKER = "kafka-streams-peer: running";

    private SagaPeer() {}

    /** schemas/partitioning.py's partition_for: (murmur2(key) & 0x7fffffff) % partitions. */
    static int partitionFor(String key, int partitions) {
        return Utils.toPositive(Utils.murmur2(key.getBytes(StandardCharsets.UTF_8))) % partitions;
    }

    static final class ProjectPartitioner implements StreamPartitioner<String, byte[]> {
        @Override
        public Optional<Set<Integer>> partitions(String topic, String key, byte[] value, int partitions) {
            return Optional.of(Set.of(partitionFor(key, partitions)));
        }
    }

    public static void main(String[] argv) throws InterruptedException {
        Map<String, String> args = parseArgs(argv);
        String commandsTopic = required(args, "commands-topic");
        String eventsTopic = required(args, "events-topic");
        String outcomesTopic = required(args, "outcomes-topic");
        String[] legKey = required(args, "leg-key").split(":", 2);  // kid:hex, as WALLET_LEG_KEYS spells one key
        int partitions = Integer.parseInt(required(args, "partitions"));  // of the commands topic

        Properties config = new Properties();
        config.put(StreamsConfig.APPLICATION_ID_CONFIG, required(args, "application-id"));
        config.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, required(args, "bootstrap"));
        config.put(StreamsConfig.STATE_DIR_CONFIG, required(args, "state-dir"));
        config.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        config.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, Integer.parseInt(args.getOrDefault("threads", "2")));
        config.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, Long.parseLong(args.getOrDefault("commit-interval-ms",
                "1000")));
        config.put(StreamsConfig.REPLICATION_FACTOR_CONFIG, Integer.parseInt(args.getOrDefault("replication-factor",
                "1")));
        config.put(StreamsConfig.consumerPrefix("auto.offset.reset"), "earliest");

        AtomicBoolean firstSeen = new AtomicBoolean();
        Runnable onFirstRecord = () -> {
            if (!firstSeen.get() && firstSeen.compareAndSet(false, true)) {
                System.out.println(FIRST_RECORD_MARKER);
                System.out.flush();
            }
        };
        byte[] key = HexFormat.of().parseHex(legKey[1]);
        StoreBuilder<KeyValueStore<String, byte[]>> store = Stores.keyValueStoreBuilder(
                Stores.persistentKeyValueStore(SagaProcessor.STORE), Serdes.String(), Serdes.ByteArray());
        ProjectPartitioner partitioner = new ProjectPartitioner();
        Topology topology = new Topology()
                .addSource("commands", Serdes.String().deserializer(), Serdes.ByteArray().deserializer(), commandsTopic)
                .addProcessor("saga", () -> new SagaProcessor(legKey[0], key, partitions, onFirstRecord), "commands")
                .addStateStore(store, "saga")
                .addSink(SagaProcessor.TO_EVENTS, eventsTopic, Serdes.String().serializer(),
                        Serdes.ByteArray().serializer(), partitioner, "saga")
                .addSink(SagaProcessor.TO_LEGS, commandsTopic, Serdes.String().serializer(),
                        Serdes.ByteArray().serializer(), partitioner, "saga")
                .addSink(SagaProcessor.TO_OUTCOMES, outcomesTopic, Serdes.String().serializer(),
                        Serdes.ByteArray().serializer(), partitioner, "saga");

        KafkaStreams streams = new KafkaStreams(topology, config);
        CountDownLatch stopped = new CountDownLatch(1);
        int[] exitCode = {0};
        streams.setUncaughtExceptionHandler(error -> {
            System.err.println("kafka-streams-peer: " + error);
            error.printStackTrace();
            exitCode[0] = 1;
            stopped.countDown();
            return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        streams.setStateListener((now, before) -> {
            if (now == KafkaStreams.State.RUNNING) {
                System.out.println(RUNNING_MARKER);
                System.out.flush();
            }
            if (now == KafkaStreams.State.ERROR || now == KafkaStreams.State.NOT_RUNNING) {
                stopped.countDown();
            }
        });
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            streams.close(Duration.ofSeconds(20));
            stopped.countDown();
        }, "kafka-streams-peer-stop"));
        streams.start();
        stopped.await();
        streams.close(Duration.ofSeconds(20));
        System.exit(exitCode[0]);
    }

    private static Map<String, String> parseArgs(String[] argv) {
        Map<String, String> args = new HashMap<>();
        for (int i = 0; i < argv.length; i++) {
            if (!argv[i].startsWith("--") || i + 1 >= argv.length) {
                throw new IllegalArgumentException("arguments are --name value pairs; got " + argv[i]);
            }
            args.put(argv[i].substring(2), argv[++i]);
        }
        return args;
    }

    private static String required(Map<String, String> args, String name) {
        String value = args.get(name);
        if (value == null) {
            throw new IllegalArgumentException("--" + name + " is required");
        }
        return value;
    }
}
