"""Patch: check every request once its prompt is tokenized; HTTP 400 on error.

Target: ``TokenizerManager._validate_one_request`` (a BEFORE hook). It is the
first place that sees a request's final ``input_ids`` for every endpoint, text
and chat prompts included; a ``ValueError`` raised there becomes SGLang's
usual HTTP 400 and nothing reaches the scheduler. It rejects

* a ``fixed_prefix_len`` beyond the prompt;
* any ``custom_params.kvflow`` that kvflow's hint middleware did not write
  (:func:`kvflow.hints.check_transport`): a client-written transport, or one
  on an endpoint kvflow does not read hints on;
* token ids outside the vocabulary: SGLang 0.5.23 passes them on, and the
  embedding lookup then raises inside the scheduler, which kills the server.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from kvflow.hints import HintError, check_fixed_prefix_len, check_transport

TARGETS = ("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",)


def _check_request(manager, obj, input_ids, *args, **kwargs):
    if input_ids:
        vocab_size = manager.model_config.vocab_size
        if min(input_ids) < 0 or max(input_ids) >= vocab_size:
            bad = next(t for t in input_ids if not 0 <= t < vocab_size)
            raise ValueError(f"input_ids: token id {bad} is outside the vocabulary [0, {vocab_size})")
    sampling_params = getattr(obj, "sampling_params", None)
    if isinstance(sampling_params, dict):
        try:
            hint = check_transport(sampling_params.get("custom_params"))
            if hint is not None and input_ids is not None:
                check_fixed_prefix_len(hint.fixed_prefix_len, len(input_ids))
        except HintError as error:
            raise ValueError(str(error)) from None
    return None


def register_hooks() -> None:
    HookRegistry.register(TARGETS[0], _check_request, HookType.BEFORE)
