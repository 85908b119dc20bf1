"""`make bench`: every benchmark in this folder, one after another, each with its own baseline."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(p for p in HERE.glob("bench_*.py"))
    failed = []
    for script in scripts:
        print(f"\n=== {script.name} " + "=" * (60 - len(script.name)), flush=True)
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (0, None):
                failed.append(script.name)
                print(f"{script.name} stopped: {exc.code}")
        except Exception as exc:  # one broken benchmark does not hide the others
            failed.append(script.name)
            print(f"{script.name} failed: {type(exc).__name__}: {exc}")
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
