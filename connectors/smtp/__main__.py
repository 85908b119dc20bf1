"""``python -m connectors.smtp hash-password [name]``: print a users-file line for the smtp connector.

The password is read from the terminal (not echoed) or, when stdin is not a terminal, from its
first line, so it never appears in the process list or the shell history.
"""

from __future__ import annotations

import getpass
import sys

from connectors.smtp.users import DEFAULT_ROUNDS, hash_password


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[0] != "hash-password":
        print("usage: python -m connectors.smtp hash-password [name]", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("empty password refused", file=sys.stderr)
        return 1
    hashed = hash_password(password, DEFAULT_ROUNDS)
    print(f"{argv[1]}:{hashed}" if len(argv) == 2 else hashed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
