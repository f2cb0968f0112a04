"""The OpenAI request and response bodies the server speaks (pydantic; no torch).

Only what the runtime does is accepted. A field OpenAI defines that the runtime does not
implement (``n`` > 1, ``logprobs``, penalties, tools, a chat message's ``name``, ...) is refused
with a 400 naming it, and so is a field OpenAI does not define: nothing is silently ignored.
``user`` is accepted (it is metadata and changes no output); ``top_k`` is accepted as vLLM
accepts it. Types are strict, as OpenAI's are: ``max_tokens: true`` or ``"2"``, ``stream:
"yes"`` and ``prompt: [true]`` are refused, not coerced. ``stop`` takes at most
``MAX_STOP_STRINGS`` strings of at most ``MAX_STOP_CHARS`` characters (OpenAI allows 4).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from magicpig.core.sampling_params import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TEMPERATURE

# Fields OpenAI defines whose only supported value is "off": name -> what "off" is.
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
    "echo": (None, False), "suffix": (None, ""), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0),  # 0.0 == 0: also off
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None, False),
}


def _off(name: str) -> Any:
    """A field supported only when off: its schema lists the off values, so that clients and
    fuzzers see what is accepted (any other value is a 400 naming the field, not a parse error)."""
    return Field(None, json_schema_extra={"enum": list(_OFF_VALUES[name])})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """What both routes share. Extra fields are kept so that they can be named in the 400."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # vLLM's extension; 0 and -1 mean off
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # Defined by OpenAI, supported only when off (see _OFF_VALUES).
    n: Optional[int] = _off("n")
    best_of: Optional[int] = _off("best_of")
    logprobs: Optional[Union[bool, int]] = _off("logprobs")
    top_logprobs: Optional[int] = _off("top_logprobs")
    echo: Optional[bool] = _off("echo")
    suffix: Optional[str] = _off("suffix")
    logit_bias: Optional[dict[str, float]] = _off("logit_bias")
    presence_penalty: Optional[float] = _off("presence_penalty")
    frequency_penalty: Optional[float] = _off("frequency_penalty")

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        """Bounded here, before the request is queued: a stop list sizes the matcher a request
        builds, and its strings the text held back per token."""
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        longest = max((len(x) for x in stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters, got one of {longest}")
        return stop

    def unsupported(self) -> list[tuple[str, str]]:
        """(field name, what was asked) per field set to something the runtime does not do, and
        per unknown field: the name is the error's ``param``, the text its message."""
        bad = [(k, f"{k}={getattr(self, k)!r}") for k in _OFF_VALUES if k in self.model_fields_set
               and getattr(self, k, None) not in _OFF_VALUES[k]]
        bad += [(k, f"{k} (unknown field)") for k in (self.model_extra or {})]
        if isinstance(self.stop, list) and not all(self.stop):
            bad.append(("stop", "stop=[''] (empty stop strings)"))
        return bad


class CompletionRequest(_Sampling):
    """POST /v1/completions: ``prompt`` is one text (no chat template) or one list of token ids."""

    prompt: Union[Annotated[str, Field(min_length=1)], Annotated[list[int], Field(min_length=1)]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions


class TextPart(BaseModel):
    """A content part; only text (no images or audio)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = Field(None, json_schema_extra={"enum": [None]})  # refused: see ChatCompletionRequest

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions: the messages go through the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list[Any]] = _off("tools")
    tool_choice: Optional[Any] = _off("tool_choice")
    functions: Optional[list[Any]] = _off("functions")
    function_call: Optional[Any] = _off("function_call")
    response_format: Optional[dict[str, Any]] = _off("response_format")
    parallel_tool_calls: Optional[bool] = _off("parallel_tool_calls")

    def unsupported(self) -> list[tuple[str, str]]:
        # Chat templates do not show a participant's name (SmolLM2's and Llama 3's drop it), so
        # a name would change nothing the model sees: refused rather than silently ignored.
        named = [(f"messages[{i}].name", f"messages[{i}].name (participant names are not supported)")
                 for i, m in enumerate(self.messages) if m.name is not None]
        return super().unsupported() + named

    def chat_messages(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for "system"; chat templates know "system".
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ------------------------------------------------------------------------ responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "magicpig"
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def finish_reason(engine_reason: Optional[str]) -> Optional[str]:
    """The engine's reason in OpenAI's words: EOS and stop strings are both "stop"."""
    return {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}.get(engine_reason or "", None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
