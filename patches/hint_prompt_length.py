"""Patch: reject ``fixed_prefix_len`` beyond the tokenized prompt with HTTP 400.

Target: ``TokenizerManager._validate_one_request`` (a BEFORE hook). It is the
first place that sees a request's final ``input_ids`` for every endpoint, text
and chat prompts included; a ``ValueError`` raised there becomes SGLang's
usual HTTP 400 and nothing reaches the scheduler.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from kvflow.hints import TRANSPORT_KEY, HintError, check_fixed_prefix_len, decode_transport

TARGETS = ("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",)


def _check_fixed_prefix_len(manager, obj, input_ids, *args, **kwargs):
    sampling_params = getattr(obj, "sampling_params", None)
    if isinstance(sampling_params, dict) and input_ids is not None:
        custom_params = sampling_params.get("custom_params")
        if isinstance(custom_params, dict) and TRANSPORT_KEY in custom_params:
            hint = decode_transport(custom_params)
            try:
                check_fixed_prefix_len(hint.fixed_prefix_len, len(input_ids))
            except HintError as error:
                raise ValueError(str(error)) from None
    return None


def register_hooks() -> None:
    HookRegistry.register(TARGETS[0], _check_fixed_prefix_len, HookType.BEFORE)
