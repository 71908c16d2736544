"""The scheduler side: kvflow's radix cache and everything it evicts and loads by.

Runs in SGLang's scheduler process (one per rank), on the scheduler thread:
``radix_cache`` (the cache class SGLang builds, SGLang's overrides only),
``workflow_cache`` (kvflow's core, which those overrides and the patches call),
``workflow_table`` (what the hints say about each workflow: steps merged here),
``budget`` (each workflow's protected share of the pool), ``ownership`` (each
node's most urgent owner below it), ``eviction`` (the order SGLang evicts in),
``tree_core`` (the radix tree's own bookkeeping), ``prefetch`` (what is loaded
from the host tier next), ``stats`` (the ``/kvflow/stats`` summary) and
``integrity`` (the invariants all of them keep).
"""
