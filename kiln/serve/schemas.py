"""The OpenAI API's request and response bodies that ``kiln serve`` speaks (the fields it honours).

Requests accept the OpenAI fields plus vLLM's common extensions (``top_k``, ``stop_token_ids``,
``ignore_eos``); unknown fields are ignored, as OpenAI-compatible servers do. A field kiln cannot honour
(``n`` > 1, logprobs, echo, penalties, tools, ...) is refused with a 400 naming it, never silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def unsupported(self) -> str | None:
        """The first field set to something kiln cannot do, with why; None when every field can be
        honoured."""
        if self.n != 1:
            return f"n={self.n}: kiln serve returns one choice per prompt (n must be 1)"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty / frequency_penalty are not supported by the kiln engine (leave them 0)"
        if self.logit_bias:
            return "logit_bias is not supported by the kiln engine"
        return None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.logprobs is not None:
            return "logprobs is not supported by kiln serve"
        if self.echo:
            return "echo is not supported by kiln serve"
        if self.best_of not in (None, 1):
            return "best_of > 1 is not supported by kiln serve"
        if self.suffix:
            return "suffix (insertion) is not supported by kiln serve"
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list (a string, token ids, or a batch of either)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        other = [p.type for p in self.content if p.type != "text"]
        if other:
            raise ValueError(f"message content parts of type {other[0]!r} are not supported (text only)")
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        if self.logprobs or self.top_logprobs:
            return "logprobs is not supported by kiln serve"
        if self.tools:
            return "tools (function calling) are not supported by kiln serve"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return f"response_format {self.response_format.get('type')!r} is not supported (only text)"
        return super().unsupported()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI error object (``{"error": {...}}``) the openai client turns into its exceptions."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
