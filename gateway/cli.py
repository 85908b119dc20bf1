"""The ``gateway`` command.

    gateway run [--config routes.yaml]
    gateway validate FILE [--json]
    gateway schema
    gateway routes test FILE (--message SAMPLE | --tests TESTS)
    gateway dead-letters list|show|replay|purge [--config FILE | --spool PATH]  (filters, --to, --all)
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
    logs.setup(config.model.gateway.log.level, config.model.gateway.log.format)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    return int(runner(serve(args.config, config=config)))  # not read twice: 10,000 routes take a second


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
                targets = await spool.replay(ids, selected, connector=args.to)
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


def _dead_letter_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--route")
    p.add_argument("--connector", help="the target connector the dead letter was for")
    p.add_argument("--reason", help="permanent, attempts, max_age, template, parse, unmatched, corrupt, ...")
    p.add_argument("--envelope-id", dest="envelope_id")
    p.add_argument("--since", type=_ago, help="dead-lettered in the last DURATION (3600, 30m, 1h, 2d)")
    p.add_argument("--until", type=_ago, help="dead-lettered more than DURATION ago")


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
