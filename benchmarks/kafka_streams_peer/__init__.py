"""The Kafka Streams peer: the wallet's transfer saga in Java (Processor API, persistent RocksDB
store, exactly_once_v2, 2 stream threads, commit interval 1,000 ms), built here with the
machine's Maven and run by `wallet bench` on the same input and broker as ours: a commands
topic of its own that the bench fills with the same records on the same partitions, since the
saga sends its legs back into it, as ours does into its own.

Sources are in src/main/java/streamwallet/peer (SagaPeer: configuration and topology;
SagaProcessor: the saga; FlatJson: the project's JSON messages; Money: amounts). `build()`
runs `mvn -q -o package` when the local Maven repository (under the project's git-ignored
cache, `<cache>/maven`) already holds every artifact, else the same build online once, which
fills it; `java_argv()` is the command line that runs the peer.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

PEER_DIR = Path(__file__).resolve().parent
JAR_PATH = PEER_DIR / "target" / "kafka-streams-peer.jar"
LIB_DIR = PEER_DIR / "target" / "lib"
MAIN_CLASS = "streamwallet.peer.SagaPeer"
FIRST_RECORD_MARKER = "kafka-streams-peer: first record"
# Topics of the peer's own, under the bench's prefix.
COMMANDS_TOPIC = "kstreams.commands"
EVENTS_TOPIC = "kstreams.events"
OUTCOMES_TOPIC = "kstreams.outcomes"
BUILD_TIMEOUT_OFFLINE_S = 300.0
BUILD_TIMEOUT_ONLINE_S = 900.0  # the first build downloads kafka-streams, RocksDB's JNI jar and Maven's plugins
JAVA_HEAP = "-Xmx2g"


class PeerBuildError(RuntimeError):
    """The peer could not be built; the message holds Maven's last lines."""


def missing_tools() -> list[str]:
    """The tools the peer needs that this machine lacks (javac, mvn, java)."""
    return [tool for tool in ("javac", "mvn", "java") if shutil.which(tool) is None]


def _sources_newer_than_jar() -> bool:
    if not JAR_PATH.exists() or not LIB_DIR.is_dir():
        return True
    built_s = JAR_PATH.stat().st_mtime
    sources = [PEER_DIR / "pom.xml", *PEER_DIR.joinpath("src").rglob("*.java")]
    return any(source.stat().st_mtime > built_s for source in sources)


def build(cache_dir: Path, say=print) -> Path:
    """Builds the peer unless its jar is newer than every source; returns the jar's path."""
    if not _sources_newer_than_jar():
        return JAR_PATH
    missing = missing_tools()
    if missing:
        raise PeerBuildError(f"the Kafka Streams peer needs {', '.join(missing)} on PATH")
    repository = cache_dir / "maven"
    base = ["mvn", "-q", "-B", f"-Dmaven.repo.local={repository}", "-f", str(PEER_DIR / "pom.xml"), "package"]
    offline = subprocess.run(
        [*base[:1], "-o", *base[1:]], capture_output=True, text=True, timeout=BUILD_TIMEOUT_OFFLINE_S
    )
    if offline.returncode != 0:
        say(f"building the Kafka Streams peer online once (Maven repository {repository})")
        online = subprocess.run(base, capture_output=True, text=True, timeout=BUILD_TIMEOUT_ONLINE_S)
        if online.returncode != 0:
            tail = "\n    ".join((online.stdout + online.stderr).strip().splitlines()[-25:])
            raise PeerBuildError(f"mvn package failed (exit code {online.returncode}):\n    {tail}")
    if not JAR_PATH.exists():
        raise PeerBuildError(f"mvn package succeeded but {JAR_PATH} is missing")
    return JAR_PATH


def java_argv(
    *,
    bootstrap: str,
    application_id: str,
    commands_topic: str,
    events_topic: str,
    outcomes_topic: str,
    state_dir: Path,
    leg_key: str,
    partitions: int,
    threads: int = 2,
    commit_interval_ms: int = 1000,
) -> list[str]:
    return [
        "java",
        JAVA_HEAP,
        "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
        "-cp",
        f"{JAR_PATH}:{LIB_DIR}/*",
        MAIN_CLASS,
        "--bootstrap",
        bootstrap,
        "--application-id",
        application_id,
        "--commands-topic",
        commands_topic,
        "--events-topic",
        events_topic,
        "--outcomes-topic",
        outcomes_topic,
        "--state-dir",
        str(state_dir),
        "--leg-key",
        leg_key,
        "--partitions",
        str(partitions),
        "--threads",
        str(threads),
        "--commit-interval-ms",
        str(commit_interval_ms),
    ]
