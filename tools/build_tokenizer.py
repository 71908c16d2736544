"""Rebuild the embedded model's tokenizer offline (no downloads).

A byte-level BPE without merges: every UTF-8 byte is one token, plus the
special tokens for the chat template (``kvflow.model.SPECIAL_TOKENS``, after
the bytes; ``config.json``'s ``vocab_size`` counts both). Run from the repository root:
``python tools/build_tokenizer.py``; it rewrites ``kvflow/model/tokenizer.json``.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from kvflow.model import SPECIAL_TOKENS


def build() -> Tokenizer:
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "kvflow" / "model" / "tokenizer.json"
    tok = build()
    tok.save(str(out))
    print(f"wrote {out} ({tok.get_vocab_size()} tokens)")
