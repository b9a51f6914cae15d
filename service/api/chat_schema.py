"""The chat-completion body as this server reads it (OpenAI's shape, vLLM's knobs, ours in ``rtprune``):
unknown fields are refused by name, and the fields frameworks send by habit are accepted at their
neutral values only (:data:`NEUTRAL` says why any other value fails)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.engine.decode.sequence import TABLE_CELL_IDS
from service.engine.options import MAX_NEW_TOKENS, PageKnobs

# Every field is bounded, so that what validation costs never grows with what a client sends (the JSON body
# cap bounds the body as a whole; these say which field is too long). A URL is bounded by the upload limit.
Short = Annotated[str, Field(max_length=256)]  # ids, names, values spelled as text
Name = Annotated[str, Field(max_length=1024)]  # a document's name
Text = Annotated[str, Field(max_length=65_536)]  # a prompt, an instruction, a text part


class ImageUrl(BaseModel):
    url: str = Field(description="data:image/...;base64,... (or http(s) when the server allows fetching)")
    detail: Short | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: Text | None = None
    image_url: ImageUrl | None = None

    @field_validator("image_url", mode="before")
    @classmethod
    def url_as_a_string(cls, value: Any) -> Any:
        """Some clients send the URL itself, as vLLM accepts it, where OpenAI's shape has ``{"url": ...}``."""
        return {"url": value} if isinstance(value, str) else value


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="system or developer turns (text), then one user turn with the image"
    )
    content: Text | Annotated[list[ContentPart], Field(max_length=64)] | None = None

    def parts(self) -> list[ContentPart]:
        if self.content is None:
            return []
        return [ContentPart(type="text", text=self.content)] if isinstance(self.content, str) else self.content

    def text(self) -> str:
        return "\n".join(p.text for p in self.parts() if p.type == "text" and p.text).strip()


INSTRUCTION_ROLES = ("system", "developer")
TURN_RULE = (
    "DeepSeek-OCR reads one user turn (one image_url part and an optional prompt), optionally after "
    "system or developer turns that hold text"
)


class VllmXargs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ngram_size: int = Field(30, ge=0, le=512)
    window_size: int = Field(90, ge=0, le=8192)
    whitelist_token_ids: Annotated[list[int], Field(max_length=1024)] | None = Field(
        None, description=f"only {sorted(TABLE_CELL_IDS)} is supported"
    )


class StreamOptions(BaseModel):
    include_usage: bool = Field(
        False, description="as OpenAI: one last chunk with empty choices carries usage; earlier chunks usage null"
    )


class ResponseFormat(BaseModel):
    type: Short = Field(description="only text: the answer is the page's markdown")


def _not_set(value: Any) -> bool:
    return not value  # None, False, 0, "", [], {}


NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {  # field -> (is it neutral?, why other values fail)
    "temperature": (lambda v: v == 0, "decoding is greedy: temperature must be 0 (sampling is not supported)"),
    "top_p": (lambda v: v == 1, "decoding is greedy: top_p must be 1 (sampling is not supported)"),
    "n": (lambda v: v == 1, "one choice per request: n must be 1"),
    "stop": (_not_set, "stop sequences are not supported: a page ends at end-of-text or max_tokens"),
    "frequency_penalty": (_not_set, "penalties are not supported (the n-gram guard in vllm_xargs stops loops); send 0"),
    "presence_penalty": (_not_set, "penalties are not supported (the n-gram guard in vllm_xargs stops loops); send 0"),
    "logit_bias": (_not_set, "logit_bias is not supported (vllm_xargs.whitelist_token_ids is)"),
    "logprobs": (_not_set, "logprobs are not returned by this server"),
    "top_logprobs": (_not_set, "logprobs are not returned by this server"),
    "response_format": (lambda v: v.type == "text", "only response_format type text: the answer is markdown"),
    "store": (_not_set, "completions are not stored by this server: store must be false"),
    "tools": (_not_set, "tools are not supported: the model transcribes pages"),
    "tool_choice": (lambda v: v == "none", "tools are not supported: tool_choice must be none"),
}


class ChatRequest(BaseModel):
    """OpenAI's chat-completion body as this server reads it: unknown fields are refused by name; the
    fields in :data:`NEUTRAL` are accepted at their neutral values only."""

    model_config = ConfigDict(extra="forbid")

    model: Short | None = Field(None, description="any id is accepted; the answer names the model that ran")
    messages: list[ChatMessage] = Field(min_length=1, max_length=16, description=TURN_RULE)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, description="only 0 (greedy) is supported")
    top_p: float | None = Field(None, description="only 1 is supported")
    n: int | None = Field(None, description="only 1 is supported")
    seed: int | None = Field(None, description="accepted and unused: decoding is greedy, so deterministic")
    user: Short | None = Field(None, description="accepted and unused")
    metadata: Annotated[dict[Short, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = Field(
        None, description="accepted and unused (as OpenAI: at most 16 pairs)"
    )
    service_tier: Short | None = Field(None, description="accepted and unused")
    parallel_tool_calls: bool | None = Field(None, description="accepted and unused")
    stop: Short | Annotated[list[Short], Field(max_length=4)] | None = Field(
        None, description="only empty (no stop sequences)"
    )
    frequency_penalty: float | None = Field(None, description="only 0")
    presence_penalty: float | None = Field(None, description="only 0")
    logit_bias: Annotated[dict[Short, float], Field(max_length=300)] | None = Field(None, description="only empty")
    logprobs: bool | None = Field(None, description="only false")
    top_logprobs: int | None = Field(None, description="only 0")
    response_format: ResponseFormat | None = Field(None, description='only {"type": "text"}')
    store: bool | None = Field(None, description="only false")
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = Field(None, description="only empty")
    tool_choice: Short | Annotated[dict[str, Any], Field(max_length=8)] | None = Field(None, description="only none")
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = True
    vllm_xargs: VllmXargs | None = None
    rtprune: PageKnobs | None = Field(None, description="rtprune-ocr's page knobs (mode, pruner, retention, ...)")
