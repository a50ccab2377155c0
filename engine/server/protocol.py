"""OpenAI request bodies, as OpenAI accepts them, plus vLLM's sampling extensions, and OpenAI's error shape.

Unknown fields are refused (OpenAI answers "Unrecognized request argument"), and fields OpenAI
defines but this engine cannot honour are accepted only at their neutral value, so a client never
silently gets something other than what it asked for.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from kvpilot.engine.config import MAX_LOGIT_BIAS, MAX_N, MAX_STOP_TOKEN_IDS, SEED_MAX, SEED_MIN
from kvpilot.engine.server.tool_protocol import (
    MAX_TOOLS,
    Tool,
    ToolCallParam,
    ToolChoice,
    check_tool_choice,
    check_tools,
)
from kvpilot.engine.structured.params import StructuredOutputs
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# One HTTP request may ask for at most this many sequences (n x prompts), and a chat at most this many messages.
MAX_SEQUENCES = 256
MAX_MESSAGES = 4096


def _encodable(text: str) -> str:
    """JSON can carry lone UTF-16 surrogates (\\ud800); no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode at position {exc.start} (a lone surrogate?)") from exc
    return text


Text = Annotated[str, AfterValidator(_encodable)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_encodable)]


class ErrorDetail(BaseModel):
    """OpenAI's error body; here, beside the requests, because the router answers in it too and imports no
    web framework."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Unsupported(ValueError):
    """A known OpenAI field set to a value this server does not implement."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and allowed only with it")
        return self

    def structured(self) -> StructuredOutputs | None:
        if self.type == "json_object":
            return StructuredOutputs(json_object=True)
        if self.json_schema is not None:
            return StructuredOutputs(json=self.json_schema.schema_ or {"type": "object"})
        return None


class _SamplingRequest(_Strict):
    """The fields completions and chat share."""

    model: str = Field(min_length=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: Text | Annotated[list[NonEmptyText], Field(max_length=16)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS, description="token id (a JSON key, so a string) -> bias")
    # vLLM's extensions
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10.0)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _stop_not_empty(self) -> _SamplingRequest:
        if self.stop == "":
            raise ValueError("stop strings must not be empty")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.structured_outputs is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise ValueError("set response_format or structured_outputs, not both")
        return self

    def structured(self) -> StructuredOutputs | None:
        """The output constraint, from vLLM's structured_outputs or OpenAI's response_format."""
        if self.structured_outputs is not None:
            return self.structured_outputs
        return self.response_format.structured() if self.response_format is not None else None

    def sampling_fields(self) -> dict[str, Any]:
        """The SamplingParams fields this request sets (max_tokens and logprobs come per endpoint)."""
        fields: dict[str, Any] = {
            "logit_bias": self.logit_bias or None,
            "n": self.n,
            "seed": self.seed,
            "stop": self.stop,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "stop_token_ids": self.stop_token_ids or [],
            "skip_special_tokens": self.skip_special_tokens,
            "structured_outputs": self.structured(),
            "prompt_logprobs": self.prompt_logprobs,
        }
        optional = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
        }
        fields.update({k: v for k, v in optional.items() if v is not None})
        if fields.get("top_p") == 0.0:  # OpenAI accepts 0: the limit of nucleus sampling is argmax
            fields["top_p"], fields["temperature"] = 1.0, 0.0
        return fields

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
PromptInput = (
    NonEmptyText
    | TokenIds
    | Annotated[list[NonEmptyText], Field(min_length=1, max_length=64)]
    | Annotated[list[TokenIds], Field(min_length=1, max_length=64)]
)


class CompletionRequest(_SamplingRequest):
    prompt: PromptInput
    max_tokens: int | None = Field(default=16, ge=0, description="0 only with echo: score the prompt")
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=128)
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """One engine prompt per entry of a batched `prompt`."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _bounded_sequences(self) -> CompletionRequest:
        if self.n * len(self.prompts()) > MAX_SEQUENCES:
            raise ValueError(f"n x prompts ({self.n} x {len(self.prompts())}) exceeds {MAX_SEQUENCES} sequences "
                             "per request")
        return self

    def check_supported(self) -> None:
        if self.max_tokens == 0 and not self.echo:
            raise Unsupported("max_tokens", "max_tokens 0 generates nothing: it is allowed with echo only")
        if self.suffix:
            raise Unsupported("suffix", "suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise Unsupported("best_of", "best_of must equal n: best-of search (ranking extra samples by "
                              "likelihood) is not implemented; ask for n samples and their logprobs instead")


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallParam] | None = Field(default=None, max_length=MAX_TOOLS)

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (transformers' convention)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.for_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, description="deprecated by OpenAI; still accepted")
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = Field(default=None, description="default: auto with tools, none without")
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    add_generation_prompt: bool = True

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, value: list[Tool] | None) -> list[Tool] | None:
        return check_tools(value)

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, value: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        return check_tool_choice(value, info.data.get("tools"))

    @field_validator("parallel_tool_calls")
    @classmethod
    def _parallel_needs_tools(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value is not None and not info.data.get("tools"):
            raise ValueError("parallel_tool_calls is only allowed when tools are specified")
        return value

    @model_validator(mode="after")
    def _logprobs_consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def effective_tool_choice(self) -> ToolChoice:
        """OpenAI's default: auto when the request offers tools, none when it does not."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def check_supported(self) -> None:
        if self.store:
            raise Unsupported("store", "storing completions is not supported")

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def messages_for_template(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]
