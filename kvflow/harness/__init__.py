"""What tests, benchmarks and the demo drive kvflow with; nothing here runs inside a server.

``offline`` (real SGLang caches without a model), ``server_process`` (a real
server as a subprocess) and ``demo`` (the README's main command).
"""
