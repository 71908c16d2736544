"""The HTTP side: what kvflow knows about workflows before a request reaches a scheduler.

Runs in SGLang's HTTP server process (where the tokenizer manager lives):
``registry`` (registered workflow graphs and where each one stands: steps
computed here for registered workflows), ``graph_learning`` (steps
predicted from the transitions seen, for workflows sent without a graph),
``hint_rewrite`` (hints moved out of a request body into ``custom_params``)
and ``errors`` (the one error answer of every kvflow route).
"""
