"""kvflow: workflow-aware KV caching (KVFlow, arXiv 2507.07400) for SGLang."""

__version__ = "0.1.0"
