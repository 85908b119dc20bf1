"""The ``gateway`` command.

    gateway run [--config routes.yaml] [--workers N|auto]
    gateway validate FILE [--json]
    gateway schema
    gateway routes test FILE (--message SAMPLE | --tests TESTS)
    gateway dead-letters list|show|replay|purge [--config FILE | --spool PATH]  (filters, --to, --all)
    gateway trace ID [--config FILE | --db PATH | --url URL] [--json]  (what happened to a message)
    gateway token hash            (reads a token on stdin, prints its sha256 for gateway.admin.tokens)

Exit codes: 0 success, 1 failure (invalid config, failed route tests), 2 usage error.
An invalid config prints one ``file:line: path: message`` line per problem on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from gateway.config.loader import LoadedConfig, load_config
from gateway.config.yamlsrc import ConfigError, load_data
from gateway.registry import Registry
from gateway.workers import EXIT_START_FAILED, WorkerIdentity, resolve_count


def _default_config() -> str:
    return os.environ.get("GATEWAY_CONFIG", "routes.yaml")


def _print_issues(exc: ConfigError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"valid": False, "errors": [i.as_dict() for i in exc.issues]}, indent=2))
    else:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{len(exc.issues)} problem(s) found", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.runtime import serve

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _print_issues(exc, False)
        return 1
    worker = WorkerIdentity.from_env()
    logs.setup(config.model.gateway.log.level, config.model.gateway.log.format,
               worker=worker.index if worker is not None else None)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    if worker is not None:  # started by a parent: one of its workers
        code = int(runner(serve(args.config, worker=worker, config=config)))
        return EXIT_START_FAILED if code == 1 else code
    count = resolve_count(args.workers if args.workers is not None else config.model.gateway.workers)
    if count > 1:
        from gateway.workers.parent import run_parent

        return int(runner(run_parent(args.config, config, count)))
    return int(runner(serve(args.config, config=config)))  # not read twice: 10,000 routes take a second


def _workers_arg(value: str) -> int | str:
    if value == "auto":
        return value
    if value.isdigit() and 1 <= int(value) <= 256:
        return int(value)
    raise argparse.ArgumentTypeError("a number of worker processes (1-256) or auto")


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        _print_issues(exc, args.json)
        return 1
    if args.json:
        print(json.dumps({"valid": True, "version": cfg.version, "routes": len(cfg.router),
                          "connectors": sorted(cfg.connectors)}))
    else:
        print(f"{args.file}: valid ({len(cfg.connectors)} connectors, {len(cfg.router)} routes, "
              f"version {cfg.version})")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from gateway.schema import build_schema

    print(json.dumps(build_schema(Registry()), indent=2))
    return 0


def _load_yaml_file(path: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        return load_data(fh.read(), path)


def cmd_routes_test(args: argparse.Namespace) -> int:
    from gateway.dryrun import SampleError, dry_run, run_tests, sample_envelope

    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        _print_issues(exc, False)
        return 1
    try:
        if args.message:
            env = sample_envelope(_load_yaml_file(args.message), cfg)
            print(json.dumps(dry_run(cfg, env), indent=2, ensure_ascii=False))
            return 0
        results = run_tests(cfg, _load_yaml_file(args.tests))
    except (OSError, UnicodeDecodeError, ConfigError, SampleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = 0
    for r in results:
        print(f"{'PASS' if r.ok else 'FAIL'}  {r.name}")
        for f in r.failures:
            print(f"      {f}")
        failed += not r.ok
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _ago(value: str) -> float:
    """``--since 1h`` → the epoch time one hour ago (a number alone is seconds)."""
    from gateway.config.models import parse_duration

    try:
        return time.time() - parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from gateway.delivery import deadletters as dl
    from gateway.delivery.provenance import replayed_ids
    from gateway.delivery.spool import Spool
    from gateway.delivery.spools import make_spool
    from gateway.delivery.store import DeadLetterFilter, SpoolBackend, SpoolError

    cfg: LoadedConfig | None = None
    if not args.spool:
        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            _print_issues(exc, False)
            return 1
    spool: SpoolBackend
    if cfg is not None and getattr(cfg.model.gateway.spool, "type", "sqlite") != "sqlite":
        spool = make_spool(cfg.model.gateway.spool)
    else:
        path = str(args.spool) if args.spool else cfg.model.gateway.spool.path if cfg else ""
        if not os.path.exists(path):
            print(f"error: no spool at {path}", file=sys.stderr)
            return 1
        spool = Spool(path, min_free_bytes=0)  # purging must work on a full disk too
    flt = DeadLetterFilter(route=getattr(args, "route", None), connector=getattr(args, "connector", None),
                           reason=getattr(args, "reason", None), envelope_id=getattr(args, "envelope_id", None),
                           since=getattr(args, "since", None), until=getattr(args, "until", None))
    if args.action in ("replay", "purge"):
        if not args.ids and flt.empty and not args.all:
            print("error: give ids, a filter (--route, --connector, --reason, --envelope-id, --since, --until) "
                  "or --all", file=sys.stderr)
            return 2
        ids = args.ids or None
        selected = None if ids else flt
    if args.action == "replay" and args.to and cfg is not None:
        kind = cfg.kinds.get(args.to)
        if kind is None or not kind.supports_outbound:
            print(f"error: {args.to!r} is not an outbound connector in {args.config}", file=sys.stderr)
            return 1

    trail = ""  # the provenance store, when the config names one (not with --spool alone)
    if cfg is not None and cfg.model.gateway.provenance.enabled:
        trail = cfg.model.gateway.provenance_path()

    async def go() -> int:
        await spool.open()
        try:
            if args.action == "list":
                items = await spool.dead_letters(flt, args.limit)
                total = await spool.count_dead_letters(flt)
                if args.json:
                    print(json.dumps([dl.summary(d) for d in items], indent=2, ensure_ascii=False))
                    return 0
                for d in items:
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.dead_at))
                    print(f"{d.id:>6}  {when}  {d.route or '-':<24} {d.connector or '-':<14} "
                          f"{d.reason:<17} {d.attempts:>3}  {d.envelope_id}  {d.last_error[:80]}")
                print(f"{len(items)} of {total} dead letter(s)")
            elif args.action == "show":
                item = await spool.dead_letter_by_id(args.id)
                if item is None:
                    print(f"error: no dead letter {args.id}", file=sys.stderr)
                    return 1
                print(json.dumps(item.as_dict(), indent=2, ensure_ascii=False))
            elif args.action == "replay":
                # which messages these are, for their provenance (read before they leave the dead letters)
                known = await replayed_ids(spool, ids, selected, args.to) if trail else []
                targets = await spool.replay(ids, selected, connector=args.to)
                if trail:
                    _record_replay(trail, known, args.to)
                print(f"replayed {len(targets)} dead letter(s)"
                      + ("" if args.to else " (unmatched ones need --to CONNECTOR)"))
            elif args.action == "purge":
                print(f"purged {await spool.purge(ids, selected)} dead letter(s)")
            return 0
        except SpoolError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            await spool.close()

    return asyncio.run(go())


def _record_replay(path: str, envelope_ids: list[str], to: str | None) -> None:
    """The replay in the messages' provenance, as ``cli:<user>``; best-effort, as in the gateway."""
    import getpass
    import sqlite3

    from gateway.delivery.provenance import record_replay

    try:
        record_replay(path, envelope_ids, by=f"cli:{getpass.getuser()}", connector=to)
    except (sqlite3.Error, OSError, KeyError) as exc:
        print(f"warning: the replay is not in the messages' provenance: {exc}", file=sys.stderr)


def _dead_letter_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--route")
    p.add_argument("--connector", help="the target connector the dead letter was for")
    p.add_argument("--reason", help="permanent, attempts, max_age, template, parse, unmatched, corrupt, ...")
    p.add_argument("--envelope-id", dest="envelope_id")
    p.add_argument("--since", type=_ago, help="dead-lettered in the last DURATION (3600, 30m, 1h, 2d)")
    p.add_argument("--until", type=_ago, help="dead-lettered more than DURATION ago")


def cmd_trace(args: argparse.Namespace) -> int:
    """What happened to a message: its provenance, read from the store file (``--config`` or
    ``--db``; works while the gateway runs, and when it is down) or asked of a running gateway's
    admin API (``--url``, with ``--token`` or ``$GATEWAY_TOKEN``)."""
    from gateway.delivery import provenance

    if args.url:
        records = _trace_from_api(args.url, args.id, args.token or os.environ.get("GATEWAY_TOKEN", ""))
        if isinstance(records, str):
            print(f"error: {records}", file=sys.stderr)
            return 1
    else:
        path = args.db
        if not path:
            try:
                cfg = load_config(args.config)
            except ConfigError as exc:
                _print_issues(exc, False)
                return 1
            if not cfg.model.gateway.provenance.enabled:
                print(f"error: provenance is off in {args.config} (gateway.provenance.enabled: false)", file=sys.stderr)
                return 1
            path = cfg.model.gateway.provenance_path()
        if not os.path.exists(path):
            print(f"error: no provenance store at {path}", file=sys.stderr)
            return 1
        records = provenance.read(path, args.id)
    if args.json:
        print(json.dumps(records, indent=2, ensure_ascii=False))
    elif records:
        print(provenance.timeline(records))
    if not records:
        print(f"no message known by {args.id!r}", file=sys.stderr)
        return 1
    return 0


def _trace_from_api(url: str, key: str, token: str) -> list[dict[str, Any]] | str:
    """The records from ``GET {url}/api/messages/{key}``, or why not."""
    import urllib.error
    import urllib.parse
    import urllib.request

    if not url.startswith(("http://", "https://")):
        return f"--url must be http:// or https://, not {url!r}"
    full = url.rstrip("/") + "/api/messages/" + urllib.parse.quote(key, safe="")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(full, headers=headers)  # noqa: S310 - the scheme is checked above
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - the scheme is checked above
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        try:
            detail = json.loads(exc.read()).get("detail", "")
        except ValueError:
            detail = ""
        return f"{url} answered {exc.code}" + (f": {detail}" if detail else "")
    except (OSError, ValueError) as exc:
        return f"cannot ask {url}: {exc}"
    messages = body.get("messages") if isinstance(body, dict) else None
    return messages if isinstance(messages, list) else f"{url} gave an unexpected answer"


def cmd_token_hash(args: argparse.Namespace) -> int:
    from gateway.admin import hash_token

    token = sys.stdin.readline().strip()
    if not token:
        print("error: give the token on stdin", file=sys.stderr)
        return 2
    print(hash_token(token))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="A multi-protocol message gateway.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("--config", "-c", default=_default_config(), help="routes.yaml (default: $GATEWAY_CONFIG "
                     "or ./routes.yaml)")
    run.add_argument("--workers", "-w", type=_workers_arg, default=None,
                     help="worker processes: a number, or auto for the usable cores (default: gateway.workers, 1)")
    run.set_defaults(fn=cmd_run)

    val = sub.add_parser("validate", help="check a routes.yaml; exit 1 with every problem and its line")
    val.add_argument("file")
    val.add_argument("--json", action="store_true", help="machine-readable output")
    val.set_defaults(fn=cmd_validate)

    sch = sub.add_parser("schema", help="print the JSON Schema of routes.yaml (for editors)")
    sch.set_defaults(fn=cmd_schema)

    routes = sub.add_parser("routes", help="route tools")
    rsub = routes.add_subparsers(dest="routes_command", required=True)
    rt = rsub.add_parser("test", help="dry-run a sample message, or check a route test file")
    rt.add_argument("file", help="routes.yaml")
    group = rt.add_mutually_exclusive_group(required=True)
    group.add_argument("--message", "-m", help="a sample message (YAML/JSON)")
    group.add_argument("--tests", "-t", help="a route test file (tests: [...])")
    rt.set_defaults(fn=cmd_routes_test)

    dl = sub.add_parser("dead-letters", help="list, show, replay or purge dead letters")
    dl.add_argument("--config", "-c", default=_default_config())
    dl.add_argument("--spool", help="the spool file (default: from the config)")
    dsub = dl.add_subparsers(dest="action", required=True)
    ls = dsub.add_parser("list", help="newest first")
    _dead_letter_filters(ls)
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--json", action="store_true")
    sh = dsub.add_parser("show", help="one dead letter with its envelope and options")
    sh.add_argument("id", type=int)
    rp = dsub.add_parser("replay", help="put dead letters back for delivery (the same envelope id)")
    rp.add_argument("ids", type=int, nargs="*")
    _dead_letter_filters(rp)
    rp.add_argument("--all", action="store_true")
    rp.add_argument("--to", help="send to this connector (its default options) instead of the original target")
    pg = dsub.add_parser("purge", help="delete dead letters for good")
    pg.add_argument("ids", type=int, nargs="*")
    _dead_letter_filters(pg)
    pg.add_argument("--all", action="store_true")
    dl.set_defaults(fn=cmd_dead_letters)

    tr = sub.add_parser("trace", help="what happened to a message: received, routes, attempts, dead letter, replay")
    tr.add_argument("id", help="envelope id, trace id (or traceparent), Message-ID, correlation id or Idempotency-Key")
    tr.add_argument("--config", "-c", default=_default_config(), help="read the store this config names")
    tr.add_argument("--db", help="the provenance file itself (default: from the config)")
    tr.add_argument("--url", help="ask a running gateway's admin API instead (http://host:8081)")
    tr.add_argument("--token", help="admin token for --url (default: $GATEWAY_TOKEN)")
    tr.add_argument("--json", action="store_true", help="the records as JSON")
    tr.set_defaults(fn=cmd_trace)

    tok = sub.add_parser("token", help="admin token helpers")
    tsub = tok.add_subparsers(dest="token_command", required=True)
    th = tsub.add_parser("hash", help="sha256 of a token read on stdin")
    th.set_defaults(fn=cmd_token_hash)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.fn(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
