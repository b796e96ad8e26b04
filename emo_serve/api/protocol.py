"""Request and response models of the HTTP API (what the OpenAPI schema documents).

The OpenAI request models check only what the front end itself needs — the model to route to and
the bounds it enforces (`n`, `max_tokens`, streaming options) — and keep every other field as
given (`extra="allow"`): vLLM's server behind validates sampling parameters exactly as OpenAI
clients expect, and unknown-but-valid OpenAI fields are passed on, not rejected.
The subsets API is our own, so its request model is strict (`extra="forbid"`): a typo is a 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import SubsetError
from ..methods import METHODS
from ..names import validate_name
from ..usage import MAX_USER_CHARS

NAME_FIELD = Field(min_length=1, max_length=64, description="subset name: also its model id")


# -- OpenAI-compatible requests ----------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Passed on to vLLM; typed here because the front end merges its own entries into them.
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None
    cache_salt: str | None = None
    # Counted per user (live routing); longer than the routing queries accept, it could never be asked for.
    user: str | None = None

    @field_validator("user")
    @classmethod
    def _user_length(cls, v: str | None) -> str | None:
        # Checked here, not with `max_length`: pydantic's own check refuses a lone surrogate in its
        # words before `limits.check_encodable` can name it as such.
        if v is not None and len(v) > MAX_USER_CHARS:
            raise ValueError(f"at most {MAX_USER_CHARS} characters (the longest `user` whose routing can be "
                             "asked for)")
        return v

    def payload(self) -> dict[str, Any]:
        """The body passed on to the engine: the fields as the client sent them."""
        return self.model_dump(exclude_unset=True, mode="json")

    @property
    def output_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


class ChatCompletionRequest(_GenerationRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# -- OpenAI-compatible responses (documented loosely: the engine's fields pass through) --------
class _Passthrough(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Passthrough):
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int


class Completion(_Passthrough):
    id: str
    object: str
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None


class EmoModelInfo(BaseModel):
    kind: Literal["base", "subset"]
    state: str
    base: str
    engine: str | None = Field(None, description="the vLLM engine serving this model (shared by several "
                               "models in the shared engine mode)")
    experts_per_layer: list[int]
    base_experts_per_layer: list[int]
    params: int
    base_params: int
    bytes: int
    base_bytes: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "emo-serve"
    root: str
    parent: str | None = None
    max_model_len: int
    emo: EmoModelInfo


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- subsets API -------------------------------------------------------------------------------
class TextExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)


class ChatExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[dict[str, Any]] = Field(min_length=1)


class FromTraffic(BaseModel):
    """Learn a subset from the routing counted on live traffic (no examples)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256, description="the base or a subset whose traffic to learn from")
    user: str | None = Field(None, min_length=1, max_length=MAX_USER_CHARS,
                             description="only requests whose OpenAI `user` field was this")
    min_tokens: int = Field(1, ge=1, description="refuse (400) when fewer tokens were observed")
    window: float | None = Field(None, description="only the last `window` seconds of traffic "
                                 "(default: all of it; not with `user`)")


class SubsetCreate(BaseModel):
    """Explicit expert ids, task examples, or observed traffic; with the latter two, how many
    experts to keep."""

    model_config = ConfigDict(extra="forbid")

    name: str = NAME_FIELD
    experts: list[list[int]] | list[int] | None = Field(
        None, description="routed expert ids to keep: one list per layer, or one list for every "
        "layer (shared experts are always kept)")
    examples: list[str | TextExample | ChatExample] | None = Field(
        None, min_length=1, description="task examples: strings, {'text'} or {'messages'}")
    from_traffic: FromTraffic | None = Field(
        None, description="keep the experts that a model's observed traffic (or one user's) routed to most")
    size: int | None = Field(None, ge=1, description="routed experts kept per layer")
    fraction: float | None = Field(None, gt=0, le=1, description="share of each layer's routed experts")
    sizes: list[int] | None = Field(None, description="routed experts kept, per layer")
    max_loss_increase: float | None = Field(
        None, ge=0, le=100, description="the smallest subset whose perplexity stays within this relative "
        "increase over the base (0.05 = +5 %), measured on held-out folds of the examples")
    budget: int | None = Field(None, ge=1, description="routed experts summed over layers, placed per layer "
                               "where they lower the examples' loss most")
    folds: int = Field(5, ge=1, le=16, description="k-fold split of the examples for `max_loss_increase`/`budget`")
    # A Literal spelled from the one METHODS tuple (mypy wants literal values; pydantic checks it).
    method: Literal[METHODS] = "usage"  # type: ignore[valid-type]
    max_tokens_per_example: int = Field(512, ge=1, le=8192)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    load: bool = Field(False, description="start the subset's engine as soon as it is ready")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return validate_name(v)
        except SubsetError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _one_way(self) -> SubsetCreate:
        if sum(x is not None for x in (self.experts, self.examples, self.from_traffic)) != 1:
            raise ValueError("give exactly one of `experts`, `examples` or `from_traffic`")
        sizing = sum(x is not None for x in (self.size, self.fraction, self.sizes, self.max_loss_increase,
                                             self.budget))
        if self.from_traffic is not None:
            if sizing != 1 or self.max_loss_increase is not None:
                raise ValueError("with `from_traffic`, give exactly one of `size`, `fraction`, `sizes` or `budget`")
            if self.method not in ("usage", "frequency"):
                raise ValueError("with `from_traffic`, `method` is `usage` (router mass) or `frequency` (top-k share)")
        if self.examples is not None and sizing != 1:
            raise ValueError("with `examples`, give exactly one of `size`, `fraction`, `sizes`, "
                             "`max_loss_increase` or `budget`")
        if self.experts is not None and sizing:
            raise ValueError("`size`, `fraction`, `sizes`, `max_loss_increase` and `budget` apply to "
                             "`examples`, not to explicit `experts`")
        return self

    def example_items(self) -> list[str | dict[str, Any]]:
        return [e if isinstance(e, str) else e.model_dump() for e in self.examples or ()]


class ExpertCounts(BaseModel):
    subset: int
    base: int


class Drift(BaseModel):
    """How far a subset's traffic strays from its experts, as counted in the engine."""

    mass_outside: float | None = Field(description="per token, the share of the base router's routed top-k "
                                       "weight that falls on experts the subset dropped (what the full router "
                                       "would have given them), averaged over MoE layers, then over tokens: 0 = "
                                       "the traffic routes as the subset does; null before any token was measured")
    tokens: int = Field(description="tokens measured")
    window: float | None = Field(None, description="seconds looked back (null: all time)")
    router: Literal["full", "none"] = Field(
        description="full: a shared engine, which holds the base's whole router (with the base served or "
        "with expert slots), so the mass is exact; none: a dedicated engine, whose router has only the "
        "subset's experts (no drift measured)")
    collected_at: float | None = Field(None, description="when the engines' counts were last collected "
                                       "(seconds since the epoch; null before the first collection): tokens "
                                       "routed since are not in `tokens` yet")


class SubsetObject(BaseModel):
    id: str
    object: Literal["subset"] = "subset"
    state: Literal["profiling", "ready", "loading", "loaded", "failed"]
    created: int
    base: str
    base_fingerprint: str
    experts: list[list[int]] | None = None
    experts_per_layer: list[int] | None = None
    params: ExpertCounts | None = None
    bytes: ExpertCounts | None = None
    method: str | None = None
    size: int | list[int] | None = None
    fraction: float | None = None
    max_loss_increase: float | None = None
    budget: int | None = None
    quality: dict[str, Any] | None = Field(
        None, description="the quality estimate of a subset sized by `max_loss_increase` or `budget`: "
        "perplexity and accuracy change vs the base, how measured (k-fold or in-sample), sizes tried")
    example_fingerprints: list[str] = Field(default_factory=list)
    profile_seconds: float | None = None
    error: str | None = None
    engine: dict[str, Any] | None = None
    engine_id: str | None = Field(None, description="the vLLM engine serving this subset")
    resident_experts: list[list[int]] | None = Field(
        None, description="with expert slots: of the subset's routed experts, those resident in the shared "
        "engine, per layer (the rest are loaded by its next request); null when all always are")
    drift: Drift | None = Field(None, description="null when routing capture is off")
    scored_by: str | None = Field(None, description="what scored the experts: `engine` (a live engine's "
                                  "prefill), `traffic` (observed requests) or `profiler` (layer-streamed)")


class LayerRoutingStats(BaseModel):
    layer: int
    tokens: int = Field(description="tokens routed at this layer")
    counts: list[int] = Field(description="per base expert id: tokens whose top-k held it")
    mass: list[float] = Field(description="per base expert id: mean router probability over the tokens")
    kept: list[int] | None = Field(None, description="a subset's experts at this layer")


class DriftPoint(BaseModel):
    start: float = Field(description="bucket start, seconds since the epoch")
    mass_outside: float | None
    tokens: int


class ModelRouting(BaseModel):
    object: Literal["model.routing"] = "model.routing"
    model: str
    kind: Literal["base", "subset"]
    window: float | None
    user: str | None
    since: float | None = Field(description="when counting began for this model (seconds since the epoch)")
    tokens: int
    layers: list[LayerRoutingStats]
    drift: Drift | None
    drift_series: list[DriftPoint] = Field(description="mass outside per time bucket over the retention")


class SubsetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SubsetObject]


class Deleted(BaseModel):
    id: str
    object: Literal["subset"] = "subset"
    deleted: bool = True


# -- operational -------------------------------------------------------------------------------
class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    models: dict[str, str]
    detail: str | None = None


class Version(BaseModel):
    version: str
    vllm: str | None
    base: str
    base_fingerprint: str
