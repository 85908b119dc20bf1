"""The ``gateway`` command.

    gateway run [--config routes.yaml]
    gateway validate FILE [--json]
    gateway schema
    gateway routes test FILE (--message SAMPLE | --tests TESTS)
    gateway dead-letters list|show|replay|purge [--config FILE | --spool PATH]
    gateway token hash            (reads a token on stdin, prints its sha256 for gateway.admin.tokens)

Exit codes: 0 success, 1 failure (invalid config, failed route tests), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import yaml

from gateway.config.loader import LoadedConfig, load_config
from gateway.config.yamlsrc import ConfigError
from gateway.registry import Registry


def _default_config() -> str:
    return os.environ.get("GATEWAY_CONFIG", "routes.yaml")


def _print_issues(exc: ConfigError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"valid": False, "errors": [i.as_dict() for i in exc.issues]}, indent=2))
    else:
        for issue in exc.issues:
            print(f"error: {issue}", file=sys.stderr)
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
    return int(runner(serve(args.config)))


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
        return yaml.safe_load(fh)


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
    except (OSError, yaml.YAMLError, SampleError) as exc:
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


def _spool_path(args: argparse.Namespace) -> str:
    if args.spool:
        return str(args.spool)
    try:
        cfg: LoadedConfig = load_config(args.config)
    except ConfigError as exc:
        _print_issues(exc, False)
        raise SystemExit(1) from None
    return cfg.model.gateway.spool.path


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from gateway.delivery.spool import Spool

    path = _spool_path(args)
    if not os.path.exists(path):
        print(f"error: no spool at {path}", file=sys.stderr)
        return 1

    async def go() -> int:
        spool = Spool(path, min_free_bytes=0)
        await spool.open()
        try:
            if args.action == "list":
                since = time.time() - args.since if args.since else None
                items = await spool.dead_letters(route=args.route, connector=args.connector, reason=args.reason,
                                                 since=since, limit=args.limit)
                if args.json:
                    print(json.dumps([_dl_summary(d.as_dict()) for d in items], indent=2))
                else:
                    for d in items:
                        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.dead_at))
                        print(f"{d.id:>6}  {when}  {d.route or '-':<24} {d.connector or '-':<14} "
                              f"{d.reason:<16} {d.envelope_id}  {d.last_error[:80]}")
                    print(f"{len(items)} dead letter(s)")
            elif args.action == "show":
                item = await spool.dead_letter_by_id(args.id)
                if item is None:
                    print(f"error: no dead letter {args.id}", file=sys.stderr)
                    return 1
                print(json.dumps(item.as_dict(), indent=2, ensure_ascii=False))
            elif args.action == "replay":
                n = await spool.replay(args.ids, connector=args.to)
                print(f"replayed {n} dead letter(s)")
            elif args.action == "purge":
                if not args.ids and not args.all and not (args.route or args.reason):
                    print("error: give ids, --route/--reason, or --all", file=sys.stderr)
                    return 2
                filters = {k: v for k, v in (("route", args.route), ("reason", args.reason)) if v}
                n = await spool.purge(args.ids or None, **filters)
                print(f"purged {n} dead letter(s)")
            return 0
        finally:
            await spool.close()

    return asyncio.run(go())


def _dl_summary(d: dict[str, Any]) -> dict[str, Any]:
    env = d.pop("envelope")
    d.pop("options", None)
    d["subject"] = env.get("subject")
    return d


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
    ls = dsub.add_parser("list")
    ls.add_argument("--route")
    ls.add_argument("--connector")
    ls.add_argument("--reason")
    ls.add_argument("--since", type=float, help="only the last N seconds")
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--json", action="store_true")
    sh = dsub.add_parser("show")
    sh.add_argument("id", type=int)
    rp = dsub.add_parser("replay")
    rp.add_argument("ids", type=int, nargs="+")
    rp.add_argument("--to", help="send to this connector instead of the original one")
    pg = dsub.add_parser("purge")
    pg.add_argument("ids", type=int, nargs="*")
    pg.add_argument("--route")
    pg.add_argument("--reason")
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
