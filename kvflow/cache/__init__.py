"""The scheduler side: kvflow's radix cache and everything it evicts and loads by.

Runs in SGLang's scheduler process (one per rank), on the scheduler thread. Each module:

- ``radix_cache``: the cache class SGLang builds (SGLang's overrides only, each delegating)
- ``workflow_cache``: kvflow's core, which those overrides and the patches call
- ``request_state``: kvflow's one slot on a request (``req.kvflow``)
- ``workflow_table``: what the hints say about each workflow (steps merged here)
- ``urgency``: steps turned into expected time on a logical clock
- ``stamped_clock``: time for TTLs, as the HTTP process stamped it
- ``budget``: each workflow's protected share of the pool
- ``node_state``: kvflow's one slot on a tree node (``node.kvflow``)
- ``ownership``: each node's most urgent owner below it
- ``contexts``: which agents resume their latest context (prompt + output), so own it
- ``pauses``: each agent's gaps between requests: when its context is next used
- ``lazy_heap``: the staleness and compaction rule of the lazy-deletion heaps
- ``eviction``: the order SGLang evicts in, both tiers
- ``victims``: device victims from one heap kept across evictions
- ``tree_core``: the radix tree's own bookkeeping (ownership through splits and removals)
- ``prefetch``: what is loaded from the host tier next
- ``stats``: the ``/kvflow/stats`` summary
- ``integrity``: the invariants all of them keep
"""
