"""What tests, benchmarks and the demo drive kvflow with; nothing here runs inside a server.

``offline`` (real SGLang caches without a model), ``server_process`` (a real
server as a subprocess), ``demo`` (the README's main command), the correctness
harnesses ``churn`` (kvflow and stock outputs equal under random traffic) and
``abuse`` (a plain request's latency under a hint flood), and ``provenance``
(the commit and machine every result JSON records).
"""
