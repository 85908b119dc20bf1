"""python -m tests.legacy [PORT]: run the legacy SOAP services until Ctrl-C."""

import sys
import time

from tests.legacy.server import legacy_service

with legacy_service(int(sys.argv[1]) if len(sys.argv) > 1 else 8000) as legacy:
    print(f"calculator (SOAP 1.1): {legacy.calculator11}?wsdl")
    print(f"calculator (SOAP 1.2): {legacy.calculator12}?wsdl")
    print(f"orders (SOAP 1.1):     {legacy.orders}?wsdl")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
