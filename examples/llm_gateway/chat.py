"""A chat completion request as the gateway reads it, and its token estimate.

The estimate is what the gateway takes from the `tpm` buckets before the model runs: it cannot
know the real count yet. It is deliberately cheap (no tokenizer): about four characters per
prompt token, plus the most the model may answer (`max_tokens`). The model's usage replaces it
once the response has been sent (`gateway.Meter.reconcile`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from zae_limiter import ValidationError

MODELS: Final = ("sim-1",)
ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool"})
# A completion without `max_tokens` is estimated (and capped) at this many tokens.
DEFAULT_MAX_TOKENS: Final = 256
MAX_COMPLETION_TOKENS: Final = 32_768
CHARS_PER_TOKEN: Final = 4
# Role and separators: what a chat template adds around each message.
MESSAGE_OVERHEAD_TOKENS: Final = 4


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    max_tokens: int
    stream: bool

    @classmethod
    def parse(cls, body: bytes) -> ChatRequest:
        """The request in an OpenAI-shaped JSON body; `ValidationError` names the bad field
        (an unknown `model` included: the gateway answers that one 404)."""
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValidationError("body", None, "is not JSON") from exc
        if not isinstance(data, dict):
            raise ValidationError("body", None, "must be a JSON object")
        model = data.get("model")
        if not isinstance(model, str):
            raise ValidationError("model", model, "must be a string")
        if model not in MODELS:
            raise ValidationError("model", model, f"unknown model (served: {', '.join(MODELS)})")
        return cls(
            model=model,
            messages=_messages(data.get("messages")),
            max_tokens=_max_tokens(data),
            stream=_stream(data),
        )

    @property
    def estimate(self) -> int:
        """Tokens taken up front: the prompt at ~4 characters a token, plus `max_tokens`."""
        prompt = sum(
            -(-len(m.content) // CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS for m in self.messages
        )
        return prompt + self.max_tokens


def _messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise ValidationError("messages", None, "must be a non-empty list")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValidationError(f"messages[{i}]", None, "must be an object")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise ValidationError(
                f"messages[{i}].role", role, f"must be one of {', '.join(sorted(ROLES))}"
            )
        if not isinstance(content, str):
            raise ValidationError(f"messages[{i}].content", None, "must be a string")
        messages.append(Message(role, content))
    return tuple(messages)


def _max_tokens(data: dict[str, Any]) -> int:
    # `max_completion_tokens` is the newer name; both mean the same here.
    for name in ("max_completion_tokens", "max_tokens"):
        if data.get(name) is None:
            continue
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(name, value, "must be an integer")
        if not 1 <= value <= MAX_COMPLETION_TOKENS:
            raise ValidationError(name, value, f"must be between 1 and {MAX_COMPLETION_TOKENS}")
        return value
    return DEFAULT_MAX_TOKENS


def _stream(data: dict[str, Any]) -> bool:
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise ValidationError("stream", stream, "must be a boolean")
    options = data.get("stream_options")
    if options is not None:
        if not stream:
            raise ValidationError("stream_options", None, "is only allowed with stream: true")
        if not isinstance(options, dict) or not isinstance(
            options.get("include_usage", False), bool
        ):
            raise ValidationError("stream_options.include_usage", None, "must be a boolean")
    return bool(stream)
