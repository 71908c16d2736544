"""kvflow's one error answer over HTTP: the hint middleware's 400s, ``/kvflow/workflows``, ``/kvflow/stats``.

Built as SGLang's own OpenAI-style errors are (``OpenAIServingBase.create_error_response``):

- the body is ``{"object": "error", "message", "type", "param", "code"}``, SGLang's
  ``ErrorResponse`` fields in its order, ``code`` being the HTTP status;
- ``type`` names the error class (``BadRequestError`` for a malformed hint or query, a registry
  error's class name, ``NotFoundError``), ``param`` the offending field or None;
- client text it quotes (``message``, ``param``) has lone surrogates escaped, since orjson
  refuses them and error messages quote client input.
"""

from __future__ import annotations

from fastapi.responses import ORJSONResponse

from kvflow.frontend.registry import RegistryError
from kvflow.hints import HintError
from kvflow.stats_query import QueryError


def _printable(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, param: str | None, kind: str) -> ORJSONResponse:
    """The error answer with HTTP ``status``; an ASGI app too (``await response(scope, receive, send)``)."""
    content = {
        "object": "error",
        "message": _printable(message),
        "type": kind,
        "param": _printable(param),
        "code": status,
    }
    return ORJSONResponse(status_code=status, content=content)


def refusal(error: HintError | QueryError | RegistryError) -> ORJSONResponse:
    """The answer to a refused request: a registry error keeps its status and names its class; a
    malformed hint or stats query is a 400 ``BadRequestError``."""
    if isinstance(error, RegistryError):
        return error_response(error.status, str(error), error.param, type(error).__name__)
    param = error.field if isinstance(error, HintError) else error.param
    return error_response(400, str(error), param, "BadRequestError")
