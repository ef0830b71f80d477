"""The official Apache Kafka broker, run locally in KRaft mode without Docker.

Jars come from Maven Central through Maven (pom.xml beside this file) into a git-ignored cache;
one combined broker+controller listens on 127.0.0.1 with its data under the state directory."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from deploy.process import process_alive, terminate
from streams.config import PROJECT_ROOT, Settings

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
CACHE_ROOT = Path(os.environ.get("CRM_KAFKA_CACHE", PROJECT_ROOT / ".cache" / "kafka"))
# A 2-core, 24 GiB machine: the broker needs little heap (the page cache does the work), and a
# fixed heap avoids resizing pauses. Override with CRM_KAFKA_HEAP.
DEFAULT_HEAP = "1g"
# A local broker shares two cores with the Python processes. The serial collector and the C1 JIT
# alone run fewer background threads than G1 and tiered C2: measured here, an idle broker went
# from about a third of a core to about a fifth; its throughput is never the bottleneck.
JVM_FLAGS = ["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:CICompilerCount=1", "-XX:-UsePerfData"]


class BrokerError(RuntimeError):
    """Something a user must fix (missing Java, port in use); the message says what."""


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    detail: str


def libs_dir() -> Path:
    # Keyed by the pom's content so that changing the pinned version fetches afresh.
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    return CACHE_ROOT / digest / "libs"


def fetch_jars(verbose: bool = True) -> Path:
    """Resolve the broker's jars with Maven, reusing the cache when it is complete."""
    target = libs_dir()
    done = target / ".complete"
    if done.exists():
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("Maven (mvn) is not installed; it fetches the Kafka jars. Install it, e.g. `apt-get install maven`.")
    _require_java()
    if verbose:
        print(f"Fetching the Kafka broker jars from Maven Central into {target} (once) ...", flush=True)
    tmp = target.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    command = [mvn, "-B", "-q", "-f", str(POM), "dependency:copy-dependencies",
               f"-DoutputDirectory={tmp}", "-DincludeScope=runtime"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise BrokerError(f"Maven could not fetch the Kafka jars:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    done.touch()
    return target


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise BrokerError("Java is not installed; the Kafka broker needs Java 17 or newer (e.g. `apt-get install openjdk-17-jre-headless`).")
    return java


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class LocalBroker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.home = settings.kafka_dir
        self.data_dir = self.home / "data"
        self.pid_file = self.home / "broker.pid"
        self.log_file = self.home / "broker.log"
        self.config_file = self.home / "server.properties"

    @property
    def bootstrap(self) -> str:
        return self.settings.kafka_bootstrap

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> BrokerStatus:
        """Start the broker unless it already runs; return once it answers requests."""
        if self._pid_alive():
            self.wait_until_ready(timeout)
            return self.status()
        for port in (self.settings.kafka_port, self.settings.kafka_controller_port):
            if _port_open(port):
                raise BrokerError(
                    f"Port {port} on 127.0.0.1 is taken by another process. Stop it, or choose other ports "
                    "with CRM_KAFKA_PORT / CRM_KAFKA_CONTROLLER_PORT, or use CRM_KAFKA_BOOTSTRAP for an existing cluster."
                )
        java = _require_java()
        libs = fetch_jars()
        self.home.mkdir(parents=True, exist_ok=True)
        self._write_config()
        if not (self.data_dir / "meta.properties").exists():
            self._format_storage(java, libs)
        heap = os.environ.get("CRM_KAFKA_HEAP", DEFAULT_HEAP)
        command = [
            java, f"-Xms{heap}", f"-Xmx{heap}", *JVM_FLAGS,
            "-Djava.awt.headless=true", f"-Dlog4j.configuration=file:{HERE / 'log4j.properties'}",
            "-cp", f"{libs}/*", "kafka.Kafka", str(self.config_file),
        ]
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid_file.write_text(str(process.pid))
        try:
            self.wait_until_ready(timeout, process)
        except BrokerError:
            self.stop()
            raise
        return self.status()

    def stop(self, timeout: float = 30.0) -> None:
        pid = self._read_pid()
        if pid is not None:
            terminate(pid, timeout)
        self.pid_file.unlink(missing_ok=True)

    def status(self) -> BrokerStatus:
        pid = self._read_pid()
        if pid is None or not process_alive(pid):
            return BrokerStatus(False, None, self.bootstrap, "not running")
        answering = self._answers()
        return BrokerStatus(answering, pid, self.bootstrap, "running" if answering else "starting")

    def wait_until_ready(self, timeout: float, process: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise BrokerError(f"The Kafka broker exited with code {process.returncode}; see {self.log_file}:\n{self._log_tail()}")
            if self._answers():
                return
            time.sleep(0.5)
        raise BrokerError(f"The Kafka broker did not answer within {timeout:.0f}s; see {self.log_file}:\n{self._log_tail()}")

    # --- internals -------------------------------------------------------------------------------------

    def _answers(self) -> bool:
        from kafka import KafkaAdminClient  # imported late: kafka-python logs noisily at import-time errors

        if not _port_open(self.settings.kafka_port):
            return False
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
        except Exception:
            return False
        try:
            admin.describe_cluster()
            return True
        except Exception:
            return False
        finally:
            admin.close()

    def _write_config(self) -> None:
        s = self.settings
        self.config_file.write_text("\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{s.kafka_controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{s.kafka_port},CONTROLLER://127.0.0.1:{s.kafka_controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{s.kafka_port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={self.data_dir}",
            # Topics are created explicitly (deploy/topics.py) with their own settings.
            "auto.create.topics.enable=false",
            "num.partitions=1",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=6",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            # Two cores: fewer threads than Kafka's defaults, which assume a server.
            "num.network.threads=2",
            "num.io.threads=2",
            "background.threads=2",
            "num.recovery.threads.per.data.dir=1",
            "log.cleaner.threads=1",
            # Extra `name=value` settings separated by `;`, after the defaults above (tests shorten the
            # retention check and file deletion delays to see the privacy bounds pass in seconds).
            *[line.strip() for line in os.environ.get("CRM_KAFKA_EXTRA_CONFIG", "").split(";") if line.strip()],
            "",
        ]))

    def _format_storage(self, java: str, libs: Path) -> None:
        cluster_id = _kafka_uuid()
        command = [java, "-cp", f"{libs}/*", f"-Dlog4j.configuration=file:{HERE / 'log4j.properties'}",
                   "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(self.config_file)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise BrokerError(f"Formatting Kafka storage failed:\n{result.stdout}\n{result.stderr}")

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _pid_alive(self) -> bool:
        pid = self._read_pid()
        return pid is not None and process_alive(pid)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _kafka_uuid() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (as `kafka-storage random-uuid`)."""
    import base64

    while True:
        candidate = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not candidate.startswith("-"):  # Kafka's own ids never start with '-': it reads as a flag
            return candidate
