"""The embedded model: a 4-layer Llama (``config.json``) with an offline byte-level tokenizer.

``python -m kvflow.launch_server`` serves it, with dummy weights, when no ``--model-path`` is
given; the demo, tests and benchmarks draw their prompts' token ids from its vocabulary.

- ``VOCAB_SIZE`` is ``config.json``'s ``vocab_size``, the one place the vocabulary is written.
- Ids ``0 .. BYTE_TOKENS - 1`` are the byte tokens, the rest the ``SPECIAL_TOKENS`` in order
  (``tools/build_tokenizer.py`` builds ``tokenizer.json`` so); ``tests/test_embedded_model.py``
  checks that the tokenizer and config agree with both.
"""

from __future__ import annotations

import json
from pathlib import Path

EMBEDDED_MODEL_PATH = str(Path(__file__).resolve().parent)
SPECIAL_TOKENS = ("<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
VOCAB_SIZE: int = json.loads((Path(EMBEDDED_MODEL_PATH) / "config.json").read_text())["vocab_size"]
BYTE_TOKENS = VOCAB_SIZE - len(SPECIAL_TOKENS)
