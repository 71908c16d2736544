"""kvflow: workflow-aware KV caching (KVFlow, arXiv 2507.07400) for SGLang."""

__version__ = "0.1.0"

NAME = "kvflow"
"""kvflow's one name in SGLang and on the wire: its plugin entry point, the radix-cache backend,
tree core and eviction policy it registers, a hint's request field and ``custom_params`` key,
its ``kv_hints`` action type, and the first segment of its HTTP routes."""

WORKFLOWS_ROUTE = f"/{NAME}/workflows"
STATS_ROUTE = f"/{NAME}/stats"
