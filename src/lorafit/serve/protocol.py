"""The OpenAI wire format: request bodies, error bodies, and the two answer flavours.

Request bodies are pydantic models that check types only; ranges are checked by
`SamplingParams`, so the HTTP API and the Python API refuse the same values with the same words.
Fields that OpenAI defines but this server does not implement are refused when they would change
the answer (``logprobs``, ``echo``, penalties, ...) and ignored otherwise (``user``, ...).
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..errors import LorafitError
from .sampling import ParamError, SamplingParams

MAX_N = 8  # answers per prompt
MAX_CHOICES = 64  # answers per request: prompts x n

# field -> the values that mean "not used"; anything else is refused as unsupported
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


class ApiError(LorafitError):
    """An error answered as OpenAI's ``{"error": {...}}`` body with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationBody(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def check_supported(self) -> None:
        """Refuse OpenAI fields this server would otherwise silently ignore."""
        for name, neutral in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if value not in neutral:
                raise ApiError(400, f"{name} is not supported by this server", param=name,
                               code="unsupported_parameter")
        if not 1 <= self.n <= MAX_N:
            raise ParamError("n", f"must be between 1 and {MAX_N}, got {self.n}")

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling(self, max_tokens: int, choice: int) -> SamplingParams:
        """The sampling settings of answer number `choice` (each gets its own seed)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=stop,
            seed=None if self.seed is None else self.seed + choice,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionBody(GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict[str, str]:
        if isinstance(self.content, list):
            return {"role": self.role, "content": "".join(part.text for part in self.content)}
        return {"role": self.role, "content": self.content or ""}


class ChatBody(GenerationBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class AdapterBody(BaseModel):
    name: str
    path: str


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class Flavor(ABC):
    """How one endpoint spells its answers: whole (`choice`) or streamed (`chunk_choice`)."""

    object: str  # the answer's "object" field
    chunk_object: str  # a streamed chunk's "object" field
    id_prefix: str

    def new_id(self) -> str:
        return f"{self.id_prefix}-{uuid.uuid4().hex}"

    def envelope(self, id: str, model: str, chunk: bool, **fields) -> dict[str, Any]:
        return {"id": id, "object": self.chunk_object if chunk else self.object,
                "created": int(time.time()), "model": model, **fields}

    @abstractmethod
    def choice(self, index: int, text: str, reason: str | None) -> dict[str, Any]:
        """One whole answer in the ``choices`` list."""

    @abstractmethod
    def start_chunk(self, index: int) -> dict[str, Any] | None:
        """The streamed choice that opens answer `index`, if the format has one."""

    @abstractmethod
    def chunk_choice(self, index: int, text: str, reason: str | None) -> dict[str, Any]:
        """A streamed piece of answer `index` (`reason` set on its last piece)."""


class CompletionFlavor(Flavor):
    def choice(self, index: int, text: str, reason: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

    def start_chunk(self, index: int) -> dict[str, Any] | None:
        return None

    def chunk_choice(self, index: int, text: str, reason: str | None) -> dict[str, Any]:
        return self.choice(index, text, reason)


class ChatFlavor(Flavor):
    def choice(self, index: int, text: str, reason: str | None) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": reason}

    def start_chunk(self, index: int) -> dict[str, Any] | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}

    def chunk_choice(self, index: int, text: str, reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}


COMPLETION = CompletionFlavor("text_completion", "text_completion", "cmpl")
CHAT = ChatFlavor("chat.completion", "chat.completion.chunk", "chatcmpl")
