"""`crm`: the one command line of the platform.

  crm start | stop | status     the local stack: Kafka broker, topics, worker, projection writer, alerts
  crm kafka start|stop|status   only the broker
  crm worker | crm writer       run one process in the foreground
  crm intake                    run the intake (direct producers' crm.intake -> sealed -> crm.events) in the foreground
  crm produce                   send simulated POS and app traffic to the events topic
  crm demo                      all of the above on a fresh local stack, then a summary
  crm sql "SELECT ..."          query the projections
  crm api                       run the ingestion HTTP API in the foreground
  crm keys create|list|rotate|revoke   API keys for POS terminals, apps, back offices (--role support|privacy_officer)
  crm privacy export|read|erase|rotate-master   personal data of one customer, erasure requests, audited (docs/privacy.md)
  crm alerts                    run the alert service (webhooks, live stream) in the foreground
  crm dashboard                 run the dashboard (charts, live alerts) in the foreground
  crm webhooks add|list|remove|dead|redeliver   webhook subscriptions for churn alerts (docs/webhooks.md)
  crm dlq list|show|resubmit    inspect dead letters and send them again after a fix
  crm import MAPPING            load a retailer's history from CSV, JSON Lines or Parquet (docs/import.md)
  crm replay | crm verify       rebuild every projection from the log and swap it in; compare
  crm backup [PATH] | crm restore PATH   the log, the wrapped data keys and the SQLite stores (docs/backup.md)
  crm spool status|send|rejected   a POS terminal's offline spool (docs/pos-spool.md)
  crm schemas export            write the JSON Schema files for producers in other languages
  crm schemas cluster           print the ClickHouse cluster DDL (replicated + distributed tables)
  crm test                      run the whole test suite
  crm bench                     the throughput benchmark behind BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from streams.config import PROJECT_ROOT, settings


def _broker():
    from deploy.kafka.broker import LocalBroker

    return LocalBroker(settings())


def cmd_kafka(args: argparse.Namespace) -> int:
    config = settings()
    if not config.uses_local_kafka:
        print(f"CRM_KAFKA_BOOTSTRAP={config.kafka_bootstrap}: using that cluster, no local broker to manage.")
        return 0
    broker = _broker()
    if args.action == "start":
        status = broker.start()
        from deploy.topics import ensure_topics

        created = ensure_topics(config)
        print(f"Kafka {status.detail} at {status.bootstrap} (pid {status.pid}); topics created: {created or 'none needed'}")
    elif args.action == "stop":
        broker.stop()
        print("Kafka stopped.")
    else:
        status = broker.status()
        print(f"Kafka {status.detail} at {status.bootstrap}" + (f" (pid {status.pid})" if status.pid else ""))
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from services import processes

    cmd_kafka(argparse.Namespace(action="start"))
    config = settings()
    for daemon in (processes.worker(config), processes.writer(config), processes.intake(config),
                   processes.alerts(config)):
        pid = daemon.start()
        print(f"{daemon.name} running (pid {pid}), log: {daemon.log_file}")
    from services.dashboard.server import off_reason, url

    reason = off_reason(config)
    if reason:
        print(f"dashboard off: {reason}")
    else:
        dashboard = processes.dashboard(config)
        print(f"dashboard running (pid {dashboard.start()}) at {url(config)}, log: {dashboard.log_file}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from services import processes

    config = settings()
    for daemon in (processes.dashboard(config), processes.alerts(config), processes.intake(config),
                   processes.worker(config), processes.writer(config)):
        daemon.stop()
        print(f"{daemon.name} stopped.")
    if config.uses_local_kafka:
        cmd_kafka(argparse.Namespace(action="stop"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from services import processes

    config = settings()
    if config.uses_local_kafka:
        cmd_kafka(argparse.Namespace(action="status"))
    from services.health import report

    # Each process's health, from its own /metrics (docs/operations.md); `crm api` runs in the
    # foreground, not under `crm start`, so only its metrics say whether it runs.
    for daemon in (processes.worker(config), processes.writer(config), processes.alerts(config)):
        pid = daemon.pid()
        print(f"{daemon.name}: " + (f"running (pid {pid})" if pid else "not running"))
        for line in report(config.state_dir, daemon.name) if pid else ():
            print(f"  {line}")
    from services.intake.run import status_lines

    for line in status_lines(config, processes.intake(config).pid()):
        print(line)
    print("api:", *report(config.state_dir, "api"), sep="\n  ")
    from services.sql_http import describe

    print(describe(config))
    from services.dashboard import server as dashboard

    pid = processes.dashboard(config).pid()
    print(dashboard.describe(config) + (f", pid {pid}" if pid else ", not running"))
    if _broker().status().running or not config.uses_local_kafka:
        from services.lag import LagProbe

        probe = LagProbe(config)
        lag = probe.lag()
        probe.close()
        unknown = "unknown (coordinator not ready)"
        print(f"lag: worker {unknown if lag.worker is None else lag.worker} events, "
              f"writer {unknown if lag.writer is None else lag.writer} records")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from deploy.topics import ensure_start_offsets
    from streams import topics
    from streams.runtime.app import app

    ensure_start_offsets(settings(), topics.WORKER_APP_ID, topics.EVENTS)
    # No Faust web server: nothing uses it, and it would bind 0.0.0.0:6066 (one worker per host).
    sys.argv = ["crm-worker", "worker", "--without-web", "--loglevel", args.loglevel]
    app.main()
    return 0


def cmd_writer(args: argparse.Namespace) -> int:
    from projections import metrics
    from projections.writer import ProjectionWriter

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    from services.sql_http import start_beside_writer

    writer = ProjectionWriter(settings())
    # This process owns the embedded ClickHouse: it also answers SQL over HTTP, for `crm sql` and analysts
    # (docs/sql-http.md).
    sql_endpoint = start_beside_writer(settings())
    metrics_endpoint = metrics.serve(settings())
    signal.signal(signal.SIGTERM, lambda *_: writer.stop())
    signal.signal(signal.SIGINT, lambda *_: writer.stop())
    logging.getLogger("crm.writer").info("projection writer started; metrics at %s", metrics_endpoint.url)
    try:
        writer.run()
    finally:
        metrics_endpoint.close()
        if sql_endpoint is not None:
            sql_endpoint.stop()
    return 0


def cmd_intake(args: argparse.Namespace) -> int:
    from services.intake.run import main as intake_main

    return intake_main(settings())


def cmd_produce(args: argparse.Namespace) -> int:
    from kafka import KafkaProducer

    from services.simulator import Simulator, Workload, produce
    from streams.topics import EVENT_PARTITIONS, EVENTS

    producer = KafkaProducer(bootstrap_servers=settings().kafka_bootstrap, acks="all", enable_idempotence=True,
                             linger_ms=20, batch_size=512 * 1024)
    workload = Workload(customers=args.customers, days=args.days, seed=args.seed)
    counts = produce(Simulator(workload).messages(EVENT_PARTITIONS), producer, EVENTS.name)
    producer.close()
    print("sent:", ", ".join(f"{kind}={n}" for kind, n in sorted(counts.items())))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from services.output import print_result
    from services.privacy.reader import NoReader, sql_client
    from services.sql_http import error_text

    # The engine when the stack is stopped, else the running writer's SQL endpoint as the local admin
    # (the same way `crm privacy export` reads).
    try:
        client, query_settings = sql_client(settings(), write=args.write)
    except NoReader as why:
        print(why, file=sys.stderr)
        return 2
    from clickhouse_connect.driver.exceptions import DatabaseError

    try:
        result = client.query(args.query, settings=query_settings)
    except DatabaseError as exc:
        print(f"error: {error_text(exc)}", file=sys.stderr)
        return 1
    print_result(result.column_names, result.result_rows, args.format)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from deploy.metrics_endpoint import announce, local_url
    from services.ingest.api import create_app
    from services.ingest.logs import configure_json_logs

    config = settings()
    configure_json_logs()
    host, port = args.host or config.api_host, args.port or config.api_port
    # /metrics is answered by the API itself; the address file lets `crm status` find it. uvicorn
    # raises the SIGTERM it stopped on again once it has shut down: as SystemExit, so that the
    # address file is withdrawn below instead of the process dying on the signal.
    endpoint = announce("api", config.state_dir, local_url(host, port))
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        uvicorn.run(create_app(config), host=host, port=port, log_config=None, access_log=False)
    finally:
        endpoint.close()
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    from services.alerts.service import AlertsBusy, run_forever

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    try:
        run_forever(settings(), args.host, args.port)
    except (AlertsBusy, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from services.dashboard.server import off_reason, serve, url

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    config = settings()
    reason = off_reason(config)
    if reason:
        print(f"error: nobody could log in to the dashboard: {reason}", file=sys.stderr)
        return 2
    print(f"dashboard on {url(config, args.port)} (docs/dashboard.md)", flush=True)
    serve(config, args.port)
    return 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    from services.alerts.filters import Filters
    from services.alerts.store import AlertStore, NotFound
    from services.output import print_result

    if args.action != "list" and not args.target:
        print("error: give the URL (add) or the webhook id (see `crm webhooks list`)", file=sys.stderr)
        return 2
    # The same SQLite file the running service uses: it picks changes up within a second.
    store = AlertStore(settings().alerts_db)
    try:
        if args.action == "add":
            if not args.target.startswith(("http://", "https://")):
                print("error: the URL must start with http:// or https://", file=sys.stderr)
                return 2
            subscription = store.create_subscription(
                args.target, Filters.build(args.type, args.min_severity, args.store, args.segment))
            print(f"webhook {subscription.id} -> {subscription.url}\nsecret: {subscription.secret}\n"
                  "The secret is shown once: receivers verify X-CRM-Signature with it (docs/webhooks.md).")
        elif args.action == "list":
            rows = []
            for s in store.subscriptions():
                counts = store.delivery_counts(s.id)
                f = s.filters
                rows.append([s.id, s.url, ",".join(sorted(f.types)) or "any", f.min_severity or "any",
                             ",".join(sorted(f.stores)) or "any", ",".join(sorted(f.segments)) or "any",
                             counts["pending"], counts["delivered"], counts["dead"]])
            print_result(["id", "url", "types", "min severity", "stores", "segments", "pending", "delivered", "dead"],
                         rows, args.format)
        elif args.action == "remove":
            store.remove_subscription(args.target)
            print(f"webhook {args.target} removed; nothing more is sent to it")
        elif args.action == "dead":
            print_result(["seq", "change_id", "customer", "attempts", "status", "last error"],
                         [[d.seq, d.change_id, d.customer_key, d.attempts, d.response_status or "",
                           (d.last_error or "")[:80]] for d in store.dead(args.target)], args.format)
        else:
            count = store.redeliver(args.target, args.seq)
            print(f"{count} dead deliver{'y' if count == 1 else 'ies'} of {args.target} will be sent again")
    except (NotFound, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from services.ingest.keys import ApiKeyStore, KeyProblem
    from services.output import print_result

    store = ApiKeyStore(settings().ingest_db)
    try:
        if args.action == "create":
            types = frozenset(t.strip() for t in args.types.split(",")) if args.types else None
            # A key with a role (docs/privacy.md) is a back-office key unless told otherwise.
            source = args.source or ("backoffice" if args.role else "app")
            key, secret = store.create(source, args.name or source, args.store, types, args.rate, args.burst,
                                       role=args.role or "")
            print(f"key {key.key_id} ({key.source.value}{', store ' + key.store_id if key.store_id else ''}"
                  f"{', role ' + key.role.value if key.role.value else ''}): "
                  f"{secret}\nThe secret is shown once; only its hash is kept.")
        elif args.action == "rotate":
            print(f"key {args.key_id}: {store.rotate(args.key_id)}\nThe old secret no longer works.")
        elif args.action == "revoke":
            store.revoke(args.key_id)
            print(f"key {args.key_id} revoked")
        else:
            print_result(["key_id", "source", "role", "name", "store", "rate/s", "burst", "types", "state"],
                         [[k.key_id, k.source.value, k.role.value, k.name, k.store_id or "", k.rate_per_second, k.burst,
                           len(k.event_types), "active" if k.active else "revoked"] for k in store.list()], args.format)
    except KeyProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def cmd_privacy(args: argparse.Namespace) -> int:
    from services.privacy import commands

    config = settings()
    if args.action == "rotate-master":
        return commands.rotate_master(config, args.reason)
    if not args.customer:
        print(f"error: give the customer key: crm privacy {args.action} CUSTOMER --reason ...", file=sys.stderr)
        return 2
    if args.action == "erase":
        if not args.request_id:
            print("error: give --request-id (the erasure request's id in your records)", file=sys.stderr)
            return 2
        return commands.erase(config, args.customer, args.reason, args.request_id)
    return commands.read(config, "export" if args.action == "export" else "read_personal", args.customer,
                         args.reason, args.out)


def cmd_dlq(args: argparse.Namespace) -> int:
    import orjson

    from schemas.codec import DecodeError
    from services import dlq
    from services.output import print_result

    config = settings()
    if args.action == "list":
        letters = dlq.read(config, reason=args.reason, limit=args.limit)
        print_result(["offset", "reason", "source", "detail"],
                     [[x.offset, x.reason, x.source, x.headers.get("crm.dlq.detail", "")[:80]] for x in letters],
                     args.format)
        return 0
    if args.offset is None:
        print("error: give the dead letter's offset (see `crm dlq list`)", file=sys.stderr)
        return 2
    found = dlq.read(config, offset=args.offset)
    if not found:
        print(f"error: no dead letter at offset {args.offset}", file=sys.stderr)
        return 1
    if args.action == "show":
        print(orjson.dumps(dlq.describe(found[0]), option=orjson.OPT_INDENT_2).decode())
        return 0
    sent = dlq.resubmit(config, found[0], Path(args.file) if args.file else None)
    if isinstance(sent, DecodeError):
        print(f"not sent, it still fails: {sent}", file=sys.stderr)
        return 1
    print(f"sent event {sent.event_id} ({sent.type}) to {sent.topic} for {sent.customer_key}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from services.importer.run import Options, command

    return command(Path(args.mapping), settings(), Options(dry_run=args.dry_run, resend=args.resend,
                                                           crash_after=args.crash_after))


def cmd_spool(args: argparse.Namespace) -> int:
    from datetime import datetime

    from services.output import print_result
    from services.pos_spool import Spool

    if not Path(args.path).is_file():
        print(f"error: no spool at {args.path}", file=sys.stderr)
        return 1
    config = settings()
    key = args.key or os.environ.get("CRM_API_KEY")
    if args.action == "send" and not key:
        print("error: sending needs the terminal's API key (--key, or env CRM_API_KEY)", file=sys.stderr)
        return 2
    code = 0
    with Spool(args.path, args.api or f"http://{config.api_host}:{config.api_port}", key) as spool:
        if args.action == "rejected":
            rows = [[r["seq"], r["event_id"], r["reason"],
                     "; ".join(f"{e['field']}: {e['message']}" for e in r["errors"]),
                     datetime.fromtimestamp(r["rejected_at"]).isoformat(timespec="seconds")]
                    for r in spool.rejected(args.limit)]
            print_result(["seq", "event_id", "reason", "errors", "rejected_at"], rows, args.format)
            return 0
        if args.action == "send":
            sent = spool.send_pending()
            print(f"accepted {sent.accepted}, duplicates {sent.duplicates}, rejected {sent.rejected}"
                  + (f"; stopped: {sent.error}" if sent.error else ""))
            code = 1 if sent.error else 0
        status = spool.status()
    when = lambda t: datetime.fromtimestamp(t).isoformat(timespec="seconds")  # noqa: E731
    print(f"waiting: {status.waiting}" + (f" (oldest {status.oldest_age_seconds:.0f} s)" if status.waiting else ""))
    print(f"rejected: {status.rejected}" + (" (crm spool rejected)" if status.rejected else ""))
    if status.last_error:
        print(f"last error: {status.last_error} (at {when(status.last_error_at)})")
    if status.next_attempt_at:
        print(f"next attempt: {when(status.next_attempt_at)}")
    return code


def cmd_replay(args: argparse.Namespace) -> int:
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from projections import replay
    from projections.clickhouse import EmbeddedDatabaseBusy, connect
    from streams.rulebooks import load_rulebooks

    config = settings()
    columns = (TextColumn("[bold]Rebuilding projections"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("left"), TimeRemainingColumn())
    try:
        client = connect(config)
    except EmbeddedDatabaseBusy:
        client = None
    with Progress(*columns) as progress:
        task = progress.add_task("rebuild", total=None)
        if client is not None:
            figures = replay.Rebuild(client, config, load_rulebooks(config),
                                     progress=lambda done, total: progress.update(task, completed=done, total=total)).run()
        else:
            # The running projection writer owns the embedded database: it does the rebuild.
            replay.write_status(config, state="requested")
            replay.request_path(config).parent.mkdir(parents=True, exist_ok=True)
            replay.request_path(config).touch()
            while True:
                status = replay.read_status(config) or {}
                if status.get("total"):
                    progress.update(task, completed=status["done"], total=status["total"])
                if status.get("state") in ("done", "failed"):
                    break
                time.sleep(1)
            if status["state"] == "failed":
                print(f"the rebuild failed: {status.get('error')}", file=sys.stderr)
                return 1
            figures = status
    print(f"rebuilt from {figures['records']:,} records in {figures['build_seconds']:.0f} s "
          f"({figures['records_per_second']:,.0f} records/s), swapped in; the previous tables are kept as "
          f"<table>{replay.REPLACED} until the next rebuild. Compare them: crm verify")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from projections import replay
    from projections.clickhouse import EmbeddedDatabaseBusy, connect
    from services.output import print_result

    config = settings()
    try:
        client = connect(config)
    except EmbeddedDatabaseBusy as exc:
        # The running writer owns the database; its SQL endpoint answers read-only queries.
        password = args.password or os.environ.get("CRM_SQL_PASSWORD")
        if not password:
            print(f"{exc}\nOr compare through the writer's SQL endpoint: crm verify --user NAME --password ... "
                  "(docs/sql-http.md)", file=sys.stderr)
            return 2
        import clickhouse_connect

        client = clickhouse_connect.get_client(host=config.sql_host, port=config.sql_port, username=args.user,
                                               password=password, database=config.clickhouse_database)
    against = replay.REBUILD if args.against == "rebuild" else replay.REPLACED
    comparisons = replay.verify(client, config.clickhouse_database, against)
    print_result(["table", "live rows", f"{args.against} rows", "live checksum", f"{args.against} checksum", "same"],
                 [[c.table, c.live_rows, c.other_rows, c.live_checksum, c.other_checksum,
                   "yes" if c.identical else "NO"] for c in comparisons], args.format)
    return 0 if all(c.identical for c in comparisons) else 1


def cmd_backup(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from services import backup

    config = settings()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    try:
        if config.uses_local_kafka and not _broker().status().running:
            print("error: the local broker is not running (crm kafka start)", file=sys.stderr)
            return 2
        if args.erasures_only:
            target = Path(args.path or f"crm-erasures-{stamp}.jsonl")
            count = backup.export_erasures(config, target)
            print(f"erasure register: {count} erasures -> {target} (keep it apart from the backups: docs/backup.md)")
            return 0
        target = Path(args.path or f"crm-backup-{stamp}")
        manifest = backup.take_backup(config, target)
    except (backup.BackupError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # A backup copies every customer's sealed data and wrapped keys: who took it, and where, is audited.
    from services.privacy import audit

    writer = audit.AuditWriter(config.kafka_bootstrap)
    try:
        writer.write(audit.build(audit.cli_actor(), "operator", "backup", "allowed", reason=f"crm backup {target}",
                                 detail=", ".join(f"{name} {info['records']}" for name, info in manifest["topics"].items())))
    finally:
        writer.close()
    print(f"backup in {target} ({manifest['seconds']:.1f} s). Not in it: the master keys and the identity secret "
          f"(keep them in your secret store) and the projections (a restore rebuilds them)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from services import backup

    config = settings()
    if args.force and not args.yes:
        if not sys.stdin.isatty():
            print("error: --force wipes the state directory; confirm with --yes", file=sys.stderr)
            return 2
        answer = input(f"--force deletes everything in {config.state_dir} but its secrets. Type 'wipe' to go on: ")
        if answer.strip() != "wipe":
            print("nothing done")
            return 1
    try:
        report = backup.restore(config, Path(args.path), [Path(f) for f in args.erasures], force=args.force,
                                reason=args.reason)
    except backup.BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    if args.no_start:
        print("projections: start the stack (crm start); its worker folds the restored log from offset 0")
    elif config.uses_local_kafka:
        cmd_start(args)
        print("projections: the worker folds the restored log from offset 0 and the writer fills ClickHouse; "
              "`crm status` shows how far behind they are")
    else:
        print("projections: start the workers and writers; with a ClickHouse server, run `crm replay` once they "
              "caught up (docs/backup.md)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from services.demo import run_demo

    return run_demo(customers=args.customers, days=args.days, seed=args.seed)


def cmd_schemas_cluster(args: argparse.Namespace) -> int:
    from projections.cluster import cluster_statements, render

    print(render(cluster_statements(settings().clickhouse_database, args.cluster)), end="")
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    if args.action == "cluster":
        return cmd_schemas_cluster(args)
    from schemas.export import export

    written = export(Path(args.out) if args.out else None)
    print(f"wrote {len(written)} JSON Schema files to {written[0].parent}")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    return subprocess.call([sys.executable, "-m", "pytest", *args.pytest_args], cwd=PROJECT_ROOT)


def cmd_bench(args: argparse.Namespace) -> int:
    return subprocess.call([sys.executable, "-m", "bench.pipeline_throughput", *args.bench_args], cwd=PROJECT_ROOT)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="crm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root.add_argument("--state-dir", help="where the local stack keeps its data (default .state; env CRM_STATE_DIR)")
    sub = root.add_subparsers(dest="command", required=True)

    sub.add_parser("start", help="start broker, topics, worker, writer, alert service and dashboard in the background"
                   ).set_defaults(func=cmd_start)
    sub.add_parser("stop", help="stop everything `crm start` started").set_defaults(func=cmd_stop)
    sub.add_parser("status", help="what runs, and how far behind it is").set_defaults(func=cmd_status)

    kafka = sub.add_parser("kafka", help="only the local Kafka broker")
    kafka.add_argument("action", choices=("start", "stop", "status"))
    kafka.set_defaults(func=cmd_kafka)

    worker = sub.add_parser("worker", help="run the stream worker in the foreground")
    worker.add_argument("--loglevel", default="info", choices=("crit", "error", "warn", "info", "debug"))
    worker.set_defaults(func=cmd_worker)
    sub.add_parser("writer", help="run the projection writer in the foreground").set_defaults(func=cmd_writer)
    sub.add_parser("intake", help="run the intake in the foreground: crm.intake checked, sealed, into crm.events "
                                  "(docs/intake.md)").set_defaults(func=cmd_intake)

    # The demo's history is six months up to now (services/demo.py), about 100,000 records.
    for name, func, text, customers, days in (
            ("produce", cmd_produce, "send simulated traffic", 3000, 45),
            ("demo", cmd_demo, "run the platform on simulated traffic and show the result", 2000, 180)):
        command = sub.add_parser(name, help=text)
        command.add_argument("--customers", type=int, default=customers)
        command.add_argument("--days", type=int, default=days, help="days of event time to simulate")
        command.add_argument("--seed", type=int, default=7)
        command.set_defaults(func=func)

    sql = sub.add_parser("sql", help="run SQL against the projections")
    sql.add_argument("query")
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sql.add_argument("--write", action="store_true", help="allow statements that change data")
    sql.set_defaults(func=cmd_sql)

    api = sub.add_parser("api", help="run the ingestion HTTP API in the foreground (docs/ingestion.md)")
    api.add_argument("--host", help="default 127.0.0.1 (CRM_API_HOST)")
    api.add_argument("--port", type=int, help="default 8080 (CRM_API_PORT)")
    api.set_defaults(func=cmd_api)

    alerts = sub.add_parser("alerts", help="run the alert service (webhooks, live stream) in the foreground "
                                           "(docs/webhooks.md)")
    alerts.add_argument("--host", help="default 127.0.0.1 (CRM_ALERTS_HOST)")
    alerts.add_argument("--port", type=int, help="default 8090 (CRM_ALERTS_PORT)")
    alerts.set_defaults(func=cmd_alerts)

    dashboard = sub.add_parser("dashboard", help="run the dashboard (charts, live alerts) in the foreground "
                                                 "(docs/dashboard.md)")
    dashboard.add_argument("--port", type=int, help="default 8200 (CRM_DASHBOARD_PORT); it listens on 127.0.0.1")
    dashboard.set_defaults(func=cmd_dashboard)

    hooks = sub.add_parser("webhooks", help="webhook subscriptions for churn alerts: add, list, remove, dead, redeliver")
    hooks.add_argument("action", choices=("add", "list", "remove", "dead", "redeliver"))
    hooks.add_argument("target", nargs="?", help="add: the URL; remove, dead, redeliver: the webhook id")
    hooks.add_argument("--type", action="append", default=[], help="add: only this alert type (repeatable)")
    hooks.add_argument("--min-severity", help="add: only this severity or higher (low, medium, high, critical)")
    hooks.add_argument("--store", action="append", default=[], help="add: only customers of this store (repeatable)")
    hooks.add_argument("--segment", action="append", default=[],
                       help="add: only customers in this segment, e.g. value_tier:high or champions (repeatable)")
    hooks.add_argument("--seq", type=int, help="redeliver: only this dead delivery (its seq in `crm webhooks dead`)")
    hooks.add_argument("--format", choices=("table", "csv", "json"), default="table")
    hooks.set_defaults(func=cmd_webhooks)

    keys = sub.add_parser("keys", help="API keys of the ingestion API")
    keys.add_argument("action", choices=("create", "list", "rotate", "revoke"))
    keys.add_argument("key_id", nargs="?", help="for rotate and revoke")
    keys.add_argument("--source", choices=("pos", "app", "backoffice"),
                      help="default app; backoffice for a key with --role")
    keys.add_argument("--role", choices=("support", "privacy_officer"),
                      help="support: read and export one customer's personal data; privacy_officer: also request "
                           "erasure (back-office keys only; docs/privacy.md)")
    keys.add_argument("--name", help="who uses it, for people reading `crm keys list`")
    keys.add_argument("--store", help="the store a POS key is bound to")
    keys.add_argument("--types", help="comma-separated event types (default: the source's usual ones)")
    keys.add_argument("--rate", type=float, default=200.0, help="events per second (default 200)")
    keys.add_argument("--burst", type=int, default=2000, help="events at once (default 2000)")
    keys.add_argument("--format", choices=("table", "csv", "json"), default="table")
    keys.set_defaults(func=cmd_keys)

    private = sub.add_parser("privacy", help="personal data: export or read one customer, request erasure, rotate "
                                             "the master key; audited (docs/privacy.md)")
    private.add_argument("action", choices=("export", "read", "erase", "rotate-master"))
    private.add_argument("customer", nargs="?", help="the customer key (export, read, erase)")
    private.add_argument("--reason", required=True, help="why: the data subject's request or ticket (audited)")
    private.add_argument("--out", help="export: write the JSON here (mode 0600) instead of stdout")
    private.add_argument("--request-id", help="erase: the erasure request's id in your records")
    private.set_defaults(func=cmd_privacy)

    dead = sub.add_parser("dlq", help="dead letters: list, show one, send one again after a fix")
    dead.add_argument("action", choices=("list", "show", "resubmit"))
    dead.add_argument("offset", nargs="?", type=int, help="for show and resubmit")
    dead.add_argument("--reason", help="list only this reason")
    dead.add_argument("--limit", type=int, default=100)
    dead.add_argument("--file", help="resubmit this corrected event instead of the original")
    dead.add_argument("--format", choices=("table", "csv", "json"), default="table")
    dead.set_defaults(func=cmd_dlq)

    history = sub.add_parser("import", help="load history (customers, purchases, refunds, points, other events) "
                                            "from CSV, JSON Lines or Parquet files (docs/import.md)")
    history.add_argument("mapping", help="the mapping file (TOML): files, columns, formats, the import's id")
    history.add_argument("--dry-run", action="store_true", help="read, check and report; send nothing")
    history.add_argument("--resend", action="store_true", help="send every event again, even if an earlier run "
                                                               "finished (the worker ignores the duplicates)")
    history.add_argument("--crash-after", type=int, metavar="N", help="for tests: die like a crash (SIGKILL) "
                                                                      "after handing N events to Kafka")
    history.set_defaults(func=cmd_import)

    spool = sub.add_parser("spool", help="a POS terminal's offline spool: what waits, send it, rejected events")
    spool.add_argument("action", choices=("status", "send", "rejected"))
    spool.add_argument("--path", required=True, help="the spool's SQLite file")
    spool.add_argument("--api", help="the ingestion API's URL (default http://CRM_API_HOST:CRM_API_PORT)")
    spool.add_argument("--key", help="the terminal's API key, for send (or env CRM_API_KEY)")
    spool.add_argument("--limit", type=int, default=100, help="rejected: at most this many")
    spool.add_argument("--format", choices=("table", "csv", "json"), default="table")
    spool.set_defaults(func=cmd_spool)

    sub.add_parser("replay", help="rebuild every projection from the log beside the live tables, then swap "
                                  "(docs/replay.md)").set_defaults(func=cmd_replay)
    verify = sub.add_parser("verify", help="compare the live projections with the ones a rebuild replaced")
    verify.add_argument("--against", choices=("replaced", "rebuild"), default="replaced")
    verify.add_argument("--user", default="analyst", help="SQL endpoint user, when the running writer owns the database")
    verify.add_argument("--password", help="its password (or env CRM_SQL_PASSWORD)")
    verify.add_argument("--format", choices=("table", "csv", "json"), default="table")
    verify.set_defaults(func=cmd_verify)

    saving = sub.add_parser("backup", help="back up the log, the wrapped data keys and the SQLite stores "
                                           "(docs/backup.md)")
    saving.add_argument("path", nargs="?", help="a new directory (default crm-backup-<UTC time>); with "
                                                "--erasures-only, the register file")
    saving.add_argument("--erasures-only", action="store_true",
                        help="only the erasure register (crm.erasures) into PATH, JSON Lines (.zst: compressed)")
    saving.set_defaults(func=cmd_backup)
    restoring = sub.add_parser("restore", help="restore a backup onto a stopped or fresh state directory, then "
                                               "start the stack (docs/backup.md)")
    restoring.add_argument("path", help="the backup directory")
    restoring.add_argument("--erasures", action="append", default=[], metavar="FILE",
                           help="an erasure register kept apart (crm backup --erasures-only); repeatable")
    restoring.add_argument("--force", action="store_true",
                           help="wipe the local state directory first (all but its secrets), after reading its erasures")
    restoring.add_argument("--yes", action="store_true", help="confirm --force without asking")
    restoring.add_argument("--no-start", action="store_true", help="do not start the stack afterwards")
    restoring.add_argument("--reason", help="for the audit record (a ticket id); default: the backup's name")
    restoring.set_defaults(func=cmd_restore)

    schemas = sub.add_parser("schemas", help="event catalog tools")
    schemas.add_argument("action", choices=("export", "cluster"))
    schemas.add_argument("--out", help="folder (default schemas/jsonschema)")
    schemas.add_argument("--cluster", default="{cluster}", help="cluster name for `cluster` (default: the {cluster} macro)")
    schemas.set_defaults(func=cmd_schemas)

    test = sub.add_parser("test", help="run the whole test suite (arguments go to pytest)")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    test.set_defaults(func=cmd_test)
    bench = sub.add_parser("bench", help="measure pipeline throughput against a plain consumer (see BENCHMARKS.md)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `crm bench --customers 300`: everything after `bench` belongs to the benchmark's own parser.
    bench_args: list[str] = []
    if "bench" in argv:
        at = argv.index("bench")
        argv, bench_args = argv[:at + 1], argv[at + 1:]
    args = parser().parse_args(argv)
    if bench_args:
        args.bench_args = bench_args
    if args.state_dir:
        os.environ["CRM_STATE_DIR"] = str(Path(args.state_dir).resolve())
    from deploy.kafka.broker import BrokerError

    try:
        return args.func(args) or 0
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
