"""Settings of `emo-serve serve`: one validated object, read from `EMO_*` environment variables
and overridden by command-line flags (flag > env > default), so Docker and Kubernetes configure
the server with environment variables only.

Unsafe combinations are refused here, before anything starts: a server bound to a non-loopback
address with no admin key would let anyone on the network create subsets and start engines.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .names import NAME_RULES, is_valid_name

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
# vLLM 0.32's own default (`CacheConfig.gpu_memory_utilization`): the share of each GPU's memory
# that one engine may use; the server's engines split it (`engines.process.gpu_memory_share`).
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92


def default_state_dir() -> Path:
    """`$XDG_DATA_HOME/emo-serve`, else `~/.local/share/emo-serve` (the XDG default)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "emo-serve"


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: may resolve to anything


def _split_list(value: Any) -> Any:
    """Env values are comma-separated (`EMO_PRELOAD_SUBSETS=a.json,b.json`); flags give lists."""
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return value


_TUNING: dict[str, Any] = {"group": "limits and tuning"}  # where `emo-serve serve --help` lists a field


class Settings(BaseSettings):
    """Everything `emo-serve serve` can be told: each field is a flag and an `EMO_*` variable."""

    model_config = SettingsConfigDict(env_prefix="EMO_", extra="forbid", validate_default=True)

    # Each field is a flag of `emo-serve serve` (`cli/serve.py` builds them from this class, with
    # these descriptions as their help) and an `EMO_*` environment variable.
    model: str | None = Field(None, description="base checkpoint: directory, fsspec URL or HF id "
                              "(default: the embedded demo model)")
    served_model_name: str | None = Field(None, description="model id of the base in the API "
                                          "(default: the last part of --model)")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="bind port")
    state_dir: Path = Field(default_factory=default_state_dir, description="subsets, demo model and engine "
                            "logs (default: $XDG_DATA_HOME/emo-serve)")
    store: SecretStr | None = Field(
        None, description="where subsets, profiling scores, job states and routing counters live: the state dir "
        "(default) or a PostgreSQL URL, postgresql://user:password@host:5432/db, that a fleet of replicas shares")
    replica_id: str | None = Field(None, description="this replica's name in a shared store (its routing "
                                   "counters are kept under it; default: the host name and port)")
    api_key: SecretStr | None = Field(None, description="bearer key for /v1/*")
    admin_key: SecretStr | None = Field(None, description="bearer key for subset changes; defaults to the API key")
    allow_insecure_admin: bool = Field(False, description="allow a non-loopback bind with no admin key")
    engine_mode: Literal["auto", "shared", "dedicated"] = Field(
        "auto", description="shared: one vLLM engine serves the base and every subset (per-request expert "
        "masks); dedicated: one engine per model; auto: shared (on GPUs too; run `emo-serve doctor` there first)")
    subset_slots: int = Field(64, ge=2, le=4096, description="mask rows of a shared engine, row 0 being the "
                              "unmasked base")
    max_engines: int = Field(2, ge=1, le=64, description="resident vLLM engines, least recently used evicted")
    kv_cache_gb: float | None = Field(
        None, gt=0, description="KV cache per engine (per GPU with tensor parallelism), GiB (default: 1 on CPU; "
        "on GPUs vLLM sizes it from what --gpu-memory-utilization leaves after the weights)")
    gpu_memory_utilization: float = Field(
        DEFAULT_GPU_MEMORY_UTILIZATION, gt=0, le=1, description="GPUs only: share of each GPU's memory the "
        "server's engines use together (vLLM's --gpu-memory-utilization; the default is vLLM's). A shared engine "
        "gets all of it; dedicated engines split it evenly, each getting this divided by --max-engines (the most "
        "engines that run at once)")
    serve_base: bool = Field(True, description="also serve the full base model")
    expert_slots: int | None = Field(
        None, ge=1, description="with the base not served (--no-serve-base, shared engine): routed experts "
        "per layer the engine holds, loaded and evicted as subsets need them (default: what fits in half the "
        "memory left after the non-expert weights, a 3 GiB runtime and the KV cache, at most every expert)")
    preload_subsets: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="subset manifest registered and loaded at start; repeatable "
        "(environment: comma-separated)")
    tensor_parallel_size: int = Field(1, ge=1, description="passed to each engine")
    max_model_len: int | None = Field(None, ge=16, description="context length passed to vLLM "
                                      "(default: the model's)")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "half", "float"] = Field(
        "auto", description="engine dtype")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where engines and profiling run (auto: cuda if there is a GPU)")
    engine_start_timeout: float = Field(600.0, gt=0, description="seconds an engine may take to become healthy")
    routing_capture: bool = Field(True, description="count each model's (and each OpenAI `user`'s) expert "
                                  "routing in the engines: /v1/models/{id}/routing, subset drift, subsets from "
                                  "traffic, engine-side profiling")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")
    # Limits and tuning: all have safe defaults.
    engine_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="extra vLLM server argument, repeatable (environment: one "
        "shell-quoted string)", json_schema_extra=_TUNING)
    load_wait_timeout: float = Field(0.0, ge=0, description="seconds a request waits for its model to load; "
                                     "0 = the engine start timeout", json_schema_extra=_TUNING)
    drain_timeout: float = Field(30.0, ge=0, description="seconds shutdown waits for requests in flight",
                                 json_schema_extra=_TUNING)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="request body limit",
                                json_schema_extra=_TUNING)
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="request header limit",
                                  json_schema_extra=_TUNING)
    max_n: int = Field(16, ge=1, description="largest `n` per request", json_schema_extra=_TUNING)
    max_choices: int = Field(64, ge=1, description="choices per request: `n` (or `best_of`) times the prompts "
                             "of a prompt list (400 beyond)", json_schema_extra=_TUNING)
    max_request_tokens: int | None = Field(None, ge=1, description="tokens one request may ask for: choices "
                                           "times `max_tokens` (the context length where absent); default "
                                           "`max_n` full contexts (400 beyond)", json_schema_extra=_TUNING)
    max_examples: int = Field(64, ge=1, description="profiling examples per subset", json_schema_extra=_TUNING)
    max_example_chars: int = Field(200_000, ge=1, description="characters per profiling example",
                                   json_schema_extra=_TUNING)
    max_profiling_jobs: int = Field(8, ge=1, description="profiling jobs queued or running at once, those "
                                    "scored in a live engine included (429 beyond)", json_schema_extra=_TUNING)
    max_profile_tokens: int = Field(32_768, ge=1, description="tokens of one subset's examples after truncation, "
                                    "summed (400 beyond): a live engine prefills them between completions, "
                                    "else the profiler streams the base for them", json_schema_extra=_TUNING)
    routing_interval: float = Field(5.0, gt=0, le=3600, description="seconds between collections of the "
                                    "engines' routing counters", json_schema_extra=_TUNING)
    routing_retention: float = Field(3600.0, ge=60, le=7 * 86400, description="seconds of routing history kept "
                                     "in time buckets (the largest `window`)", json_schema_extra=_TUNING)
    routing_max_users: int = Field(1000, ge=1, le=1_000_000, description="OpenAI `user` values whose routing "
                                   "is kept by name, per model; beyond, the least recently seen are folded into "
                                   "one \"other users\" count (memory and each usage/<model>.json grow with it: "
                                   "two numbers per expert and layer per user)", json_schema_extra=_TUNING)
    routing_save_interval: float = Field(30.0, gt=0, le=3600, description="seconds between writes of one "
                                         "model's routing counters to the state dir (each write holds all its "
                                         "users; all are written at shutdown, a server killed outright loses at "
                                         "most this much)", json_schema_extra=_TUNING)
    store_poll_interval: float = Field(1.0, gt=0, le=60, description="seconds between reads of a shared "
                                       "store's subsets (creates and deletes made on other replicas)",
                                       json_schema_extra=_TUNING)
    # Supervision and timeouts (a hung engine or a client that stops reading must not hold a slot).
    probe_interval: float = Field(10.0, gt=0, description="seconds between health probes of each ready engine",
                                  json_schema_extra=_TUNING)
    probe_timeout: float = Field(5.0, gt=0, description="seconds an engine has to answer a health probe",
                                 json_schema_extra=_TUNING)
    probe_misses: int = Field(3, ge=1, description="missed probes in a row before an engine is killed",
                              json_schema_extra=_TUNING)
    upstream_read_timeout: float = Field(900.0, gt=0, description="seconds to wait for an engine's whole "
                                         "non-streamed answer (504 after)", json_schema_extra=_TUNING)
    upstream_idle_timeout: float = Field(300.0, gt=0, description="seconds a streamed answer may pause "
                                         "between events before it is ended with an error", json_schema_extra=_TUNING)
    client_send_timeout: float = Field(30.0, gt=0, description="seconds a client may leave a streamed "
                                       "answer unread before it is dropped and its request aborted",
                                       json_schema_extra=_TUNING)
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Host header values accepted (comma-separated; '*' = any). "
        "Default: loopback names when no API key is set (against DNS rebinding), any host otherwise",
        json_schema_extra=_TUNING)

    @field_validator("log_level", "dtype", "device", "engine_mode", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("preload_subsets", "allowed_hosts", mode="before")
    @classmethod
    def _paths(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("engine_args", mode="before")
    @classmethod
    def _engine_args(cls, v: Any) -> Any:
        return shlex.split(v) if isinstance(v, str) else v

    @field_validator("api_key", "admin_key", "kv_cache_gb", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("store", mode="before")
    @classmethod
    def _store_url(cls, v: Any) -> Any:
        raw = v.get_secret_value() if isinstance(v, SecretStr) else v
        if raw in (None, "", "local"):
            return None
        if not isinstance(raw, str) or not raw.startswith(("postgresql://", "postgres://")):
            raise ValueError("the store is `local` or a PostgreSQL URL (postgresql://user:password@host:5432/db)")
        return raw

    @field_validator("replica_id")
    @classmethod
    def _replica_id(cls, v: str | None) -> str | None:
        if v is not None and not is_valid_name(v):
            raise ValueError(f"{v!r}: a replica id is {NAME_RULES}")
        return v

    @field_validator("served_model_name")
    @classmethod
    def _model_id(cls, v: str | None) -> str | None:
        if v is not None and not is_valid_name(v):
            raise ValueError(f"{v!r}: a model id is {NAME_RULES}")
        return v

    @model_validator(mode="after")
    def _secure(self) -> Settings:
        if not is_loopback(self.host) and self.effective_admin_key is None and not self.allow_insecure_admin:
            raise ValueError(
                f"host {self.host!r} is not a loopback address and no admin key is set: anyone who "
                "can reach the port could create subsets and start engines. Set --admin-key (or "
                "--api-key; EMO_ADMIN_KEY / EMO_API_KEY), or pass --allow-insecure-admin")
        return self

    @property
    def effective_admin_key(self) -> SecretStr | None:
        """The admin key defaults to the API key."""
        return self.admin_key or self.api_key

    @property
    def host_allowlist(self) -> frozenset[str] | None:
        """Host names (without port) the server answers; None: any. A keyless server is open
        to whoever reaches it, and a web page can reach a loopback port by DNS rebinding (its own
        name resolving to 127.0.0.1): the Host header it sends is then its own name."""
        if self.allowed_hosts:
            return None if "*" in self.allowed_hosts else frozenset(h.lower() for h in self.allowed_hosts)
        if self.api_key is None:
            return frozenset(LOOPBACK_NAMES | {"127.0.0.1", "::1"})
        return None

    @property
    def wait_timeout(self) -> float:
        """How long a request waits for its model to load or for an engine slot."""
        return self.load_wait_timeout or self.engine_start_timeout

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"


def derive_model_id(location: str) -> str:
    """The API id of a base given by path, URL or Hub id: its last path component."""
    name = location.rstrip("/").rsplit("/", 1)[-1] or "base"
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", name).lstrip("._-")[:64] or "base"
    return name.replace("..", ".")
