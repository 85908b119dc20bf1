"""A legacy SOAP service simulator for tests and the benchmark: spyne services that speak the
contracts of deploy/examples/calculator.wsdl and deploy/examples/orders.wsdl, served over real
HTTP (uvicorn + a2wsgi) on 127.0.0.1. Run it by hand with ``python -m tests.legacy``."""
