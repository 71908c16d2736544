"""Conversations: one agent's growing chat, re-sent so that every turn resumes the last one.

``wf.conversation(agent_id, system=...)`` returns a :class:`Conversation` (an
:class:`AsyncConversation` from an :class:`~kvflow.client.AsyncWorkflow`): the message list a
multi-turn, tool-calling agent re-sends each turn. :meth:`Conversation.send` appends the new user
or tool messages, calls the workflow's ``chat`` as the agent and appends the reply exactly as the
server returned it (content and ``tool_calls``), so the next prompt, rendered by the chat
template, starts with the prompt + output the server cached for this turn (docs/design.md,
"Resumed contexts").

- A reply that ends in tool calls is a pause: answer them with :meth:`tool_result`, then
  :meth:`send`; the server learns the pause from the agent's turns, nothing else is sent.
- ``send(..., last_turn=True)`` marks the last turn (``keep_context: false``): the server keeps
  its context as plain LRU at once. Ending the workflow releases it too.
- ``send(..., expected_pause_s=12.0)`` (any ``chat`` argument passes through) says when the next
  turn comes, e.g. the typical latency of the tools the reply calls.
- The list changes only when a call succeeds, so a failed ``send`` can be retried as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvflow.client import AsyncWorkflow, Workflow

Message = dict[str, Any]


def reply_message(message: Any) -> Message:
    """An ``openai`` reply message as the next turn sends it back: the fields the server set."""
    return message.model_dump(exclude_none=True) if hasattr(message, "model_dump") else dict(message)


def _as_message(message: str | Mapping[str, Any]) -> Message:
    return {"role": "user", "content": message} if isinstance(message, str) else dict(message)


class _ConversationBase:
    """The message list and what a turn appends to it, shared by both conversation kinds."""

    def __init__(
        self,
        agent_id: str,
        system: str | None = None,
        messages: Sequence[Mapping[str, Any]] = (),
        **defaults: Any,
    ) -> None:
        self.agent_id = agent_id
        self.messages: list[Message] = [{"role": "system", "content": system}] if system is not None else []
        self.messages.extend(dict(message) for message in messages)
        self.defaults = defaults  # chat keyword arguments of every turn (tools, max_tokens, ...)

    @property
    def pending_tool_calls(self) -> list[dict[str, Any]]:
        """The last reply's tool calls that no ``tool`` message answers yet."""
        answered: set[str] = set()
        for message in reversed(self.messages):
            if message.get("role") == "tool":
                answered.add(message.get("tool_call_id"))
            elif message.get("role") == "assistant":
                return [call for call in message.get("tool_calls") or [] if call["id"] not in answered]
        return []

    def tool_result(self, tool_call_id: str, content: str) -> None:
        """Append a tool's result for the next :meth:`send`."""
        self.messages.append({"role": "tool", "tool_call_id": tool_call_id, "content": content})

    def _request(self, messages: Sequence[str | Mapping[str, Any]], kwargs: dict[str, Any]) -> tuple:
        sent = [*self.messages, *map(_as_message, messages)]
        return sent, {**self.defaults, **kwargs}

    def _record(self, sent: list[Message], response: Any) -> Any:
        self.messages = [*sent, reply_message(response.choices[0].message)]
        return response


class Conversation(_ConversationBase):
    """A growing chat of one agent of a :class:`~kvflow.client.Workflow` (blocking calls)."""

    def __init__(self, workflow: Workflow, agent_id: str, **options: Any) -> None:
        super().__init__(agent_id, **options)
        self.workflow = workflow

    def send(self, *messages: str | Mapping[str, Any], last_turn: bool = False, **kwargs: Any) -> Any:
        """One turn: append ``messages`` (a string is a user message), chat, append the reply.

        Returns the ``openai`` response; ``kwargs`` (over the conversation's defaults) go to
        :meth:`~kvflow.client.Workflow.chat`.
        """
        sent, options = self._request(messages, kwargs)
        return self._record(sent, self.workflow.chat(self.agent_id, sent, last_turn=last_turn, **options))


class AsyncConversation(_ConversationBase):
    """:class:`Conversation` of an :class:`~kvflow.client.AsyncWorkflow`: ``send`` is awaitable."""

    def __init__(self, workflow: AsyncWorkflow, agent_id: str, **options: Any) -> None:
        super().__init__(agent_id, **options)
        self.workflow = workflow

    async def send(self, *messages: str | Mapping[str, Any], last_turn: bool = False, **kwargs: Any) -> Any:
        """One turn, as :meth:`Conversation.send`."""
        sent, options = self._request(messages, kwargs)
        response = await self.workflow.chat(self.agent_id, sent, last_turn=last_turn, **options)
        return self._record(sent, response)
