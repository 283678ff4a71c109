"""The simulated model behind the gateway: deterministic, OpenAI-shaped answers.

It counts one token per word (plus a few per message, as a chat template adds), answers with
`VERBOSITY` tokens per prompt token up to `max_tokens`, and picks its words from a fixed
vocabulary starting at a place the prompt decides: the same request always gets the same answer
and the same usage. Streams are Server-Sent Events in the `chat.completion.chunk` shape; the
usage chunk is always sent (a gateway asks its upstream for `include_usage` to reconcile).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

from .chat import ChatRequest

VERBOSITY: Final = 3
# A chat template's tokens around each message, and the ones priming the answer.
MESSAGE_TOKENS: Final = 3
REPLY_PRIMING_TOKENS: Final = 3
VOCABULARY: Final = (
    "tokens", "refill", "at", "a", "steady", "rate", "while", "each", "bucket", "keeps", "its",
    "burst", "and", "the", "project", "shares", "one", "budget", "across", "keys",
)  # fmt: skip
DONE: Final = b"data: [DONE]\n\n"


def prompt_tokens(request: ChatRequest) -> int:
    words = sum(len(m.content.split()) + MESSAGE_TOKENS for m in request.messages)
    return words + REPLY_PRIMING_TOKENS


@dataclass
class Generation:
    """What the model has produced for one request so far: a stream cut short is billed for
    the tokens generated until then."""

    request: ChatRequest
    id: str
    created: int
    prompt_tokens: int
    completion_tokens: int = 0

    @classmethod
    def start(cls, request: ChatRequest) -> Generation:
        return cls(
            request, f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), prompt_tokens(request)
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def length(self) -> int:
        """The answer's length in tokens."""
        return min(self.request.max_tokens, VERBOSITY * self.prompt_tokens)

    @property
    def finish_reason(self) -> str:
        return "length" if self.length == self.request.max_tokens else "stop"

    def words(self) -> list[str]:
        digest = hashlib.sha256(self.request.messages[-1].content.encode()).digest()
        start = int.from_bytes(digest[:4], "big")
        return [VOCABULARY[(start + i) % len(VOCABULARY)] for i in range(self.length)]

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.request.model}

    async def complete(self, token_delay: float) -> dict[str, Any]:
        """The whole answer as a `chat.completion` object, after the time it takes to write."""
        words = self.words()
        if token_delay:
            await asyncio.sleep(token_delay * len(words))
        self.completion_tokens = len(words)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": " ".join(words)},
            "logprobs": None,
            "finish_reason": self.finish_reason,
        }
        return {**self._envelope("chat.completion"), "choices": [choice], "usage": self.usage()}

    async def stream(self, token_delay: float) -> AsyncIterator[bytes]:
        """The answer as SSE events: the role, one chunk per token, the finish reason, the usage
        (with empty `choices`, as OpenAI sends it), then `[DONE]`."""
        yield self._event({"role": "assistant", "content": ""}, None)
        for i, word in enumerate(self.words()):
            if token_delay:
                await asyncio.sleep(token_delay)
            self.completion_tokens += 1
            yield self._event({"content": word if i == 0 else f" {word}"}, None)
        yield self._event({}, self.finish_reason)
        yield _sse(
            {**self._envelope("chat.completion.chunk"), "choices": [], "usage": self.usage()}
        )
        yield DONE

    def _event(self, delta: dict[str, str], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**self._envelope("chat.completion.chunk"), "choices": [choice], "usage": None})


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
