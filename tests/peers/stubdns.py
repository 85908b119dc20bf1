"""A stub DNS server to try mail authentication by hand (the README's mail authenticity section, "Try it by hand").

    .venv/bin/python -m tests.peers.stubdns /tmp/mailauth-demo [PORT]

Serves, on 127.0.0.1:PORT (a free port when omitted), the records of a sender domain ``example.test``: SPF that
allows only 192.0.2.1 (``-all``), DMARC ``p=reject``, and a DKIM key for selector ``sel``
whose private key is written to ``<dir>/dkim.pem`` (PKCS#1, as ``dkimsign`` reads it). Prints
the address to put in ``auth_check.resolver``; Ctrl-C stops it.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from tests.mailauth_support import StubDns, dkim_txt, pem, rsa_key


def serve(directory: Path, port: int = 0) -> StubDns:
    directory.mkdir(parents=True, exist_ok=True)
    dns = StubDns(port)
    sender = rsa_key()
    (directory / "dkim.pem").write_text(pem(sender, "pkcs1"))
    dns.txt("example.test", "v=spf1 ip4:192.0.2.1 -all")
    dns.txt("_dmarc.example.test", "v=DMARC1; p=reject")
    dns.txt("sel._domainkey.example.test", dkim_txt(sender))
    return dns.start()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    where = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mailauth-demo").resolve()
    server = serve(where, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(f"stub DNS on {server.address} for example.test (SPF -all, DMARC p=reject, DKIM sel: {where}/dkim.pem)",
          flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
