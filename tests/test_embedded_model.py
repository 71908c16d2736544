"""The embedded model's vocabulary is written once (``config.json``) and its tokenizer agrees.

- ``kvflow.model.VOCAB_SIZE`` is ``config.json``'s ``vocab_size`` and the tokenizer's size, as
  both the ``tokenizers`` library and ``transformers`` (what SGLang loads) count it.
- Ids below ``BYTE_TOKENS`` are the 256 byte tokens; the special tokens follow in order, and the
  config's ``bos``/``eos`` ids are ``<s>``/``</s>``.
- ``tools/build_tokenizer.py`` rebuilds exactly the committed ``tokenizer.json``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tokenizers import Tokenizer, pre_tokenizers

from kvflow.model import BYTE_TOKENS, EMBEDDED_MODEL_PATH, SPECIAL_TOKENS, VOCAB_SIZE

MODEL = Path(EMBEDDED_MODEL_PATH)
TOOL = Path(__file__).resolve().parents[1] / "tools" / "build_tokenizer.py"


def _committed() -> Tokenizer:
    return Tokenizer.from_file(str(MODEL / "tokenizer.json"))


def test_the_tokenizer_has_the_configs_vocabulary_bytes_first():
    tokenizer = _committed()
    assert tokenizer.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE == 262
    assert BYTE_TOKENS == len(pre_tokenizers.ByteLevel.alphabet()) == 256
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == list(range(BYTE_TOKENS, VOCAB_SIZE))
    config = json.loads((MODEL / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (
        tokenizer.token_to_id("<s>"),
        tokenizer.token_to_id("</s>"),
    )


def test_transformers_loads_the_same_vocabulary():
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(EMBEDDED_MODEL_PATH)) == VOCAB_SIZE


def test_the_build_tool_reproduces_the_committed_tokenizer():
    spec = importlib.util.spec_from_file_location("build_tokenizer", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert json.loads(tool.build().to_str()) == json.loads(_committed().to_str())
