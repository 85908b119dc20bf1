"""Every registered connector kind runs the shared contract suite (tests/contract.py) in each
direction it supports: a kind added to the ``gateway.connectors`` entry points without its
contract-suite class fails here."""

from __future__ import annotations

import ast
from pathlib import Path

from gateway.registry import Registry

TESTS = Path(__file__).resolve().parents[1]
DIRECTIONS = {"OutboundContract": "outbound", "InboundContract": "inbound"}

#: Directions whose contract-suite class is still to be written. Shrink it, never grow it: the
#: test below fails when an entry is covered after all, so the list stays true.
NOT_YET = {("mqtt", "inbound"), ("imap", "inbound")}


def contract_classes() -> dict[tuple[str, str], list[str]]:
    """(kind, direction) → the test classes that run the suite for it, found in the test sources."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [b.id for b in node.bases if isinstance(b, ast.Name) and b.id in DIRECTIONS]
            kind = next((stmt.value.value for stmt in node.body
                         if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant)
                         and any(isinstance(t, ast.Name) and t.id == "kind" for t in stmt.targets)), None)
            for base in bases:
                if isinstance(kind, str) and node.name.startswith("Test"):
                    found.setdefault((kind, DIRECTIONS[base]), []).append(f"{path.relative_to(TESTS)}::{node.name}")
    return found


def test_every_registered_kind_runs_the_contract_suite_in_each_direction_it_supports() -> None:
    registry = Registry()
    covered = contract_classes()
    wanted = set()
    for kind in registry.kinds():
        cls = registry.get(kind)
        wanted |= {(kind, d) for d, on in (("outbound", cls.supports_outbound), ("inbound", cls.supports_inbound))
                   if on}
    assert {kind for kind, _ in covered} >= set(registry.kinds()), "a kind with no contract-suite class at all"
    missing = sorted(wanted - covered.keys() - NOT_YET)
    assert not missing, f"no contract-suite class for {missing}: subclass tests.contract's Outbound/InboundContract"
    assert not NOT_YET & covered.keys(), f"covered now, remove from NOT_YET: {sorted(NOT_YET & covered.keys())}"
    assert NOT_YET <= wanted
