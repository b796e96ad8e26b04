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
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL_ID = "emo-demo"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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


class Settings(BaseSettings):
    """Everything `emo-serve serve` can be told; see `docs` of each field for its flag."""

    model_config = SettingsConfigDict(env_prefix="EMO_", extra="forbid", validate_default=True)

    model: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    state_dir: Path = Field(default_factory=default_state_dir)
    api_key: SecretStr | None = None
    admin_key: SecretStr | None = None
    allow_insecure_admin: bool = False
    engine_mode: Literal["auto", "shared", "dedicated"] = Field(
        "auto", description="shared: one vLLM engine serves the base and every subset (per-request expert "
        "masks; vLLM's V1 CPU runner); dedicated: one engine per model; auto: shared on CPU, dedicated on GPUs")
    subset_slots: int = Field(64, ge=2, le=4096, description="mask rows of a shared engine, row 0 being the "
                              "unmasked base")
    max_engines: int = Field(2, ge=1, le=64)
    kv_cache_gb: float = Field(1.0, gt=0)
    serve_base: bool = True
    preload_subsets: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(None, ge=16)
    dtype: Literal["auto", "float32", "bfloat16", "float16", "half", "float"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine_start_timeout: float = Field(600.0, gt=0)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # Added beyond the agreed list (limits and tuning; all have safe defaults).
    engine_args: Annotated[list[str], NoDecode] = Field(default_factory=list)
    load_wait_timeout: float = Field(0.0, ge=0)  # 0: same as engine_start_timeout
    drain_timeout: float = Field(30.0, ge=0)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    max_n: int = Field(16, ge=1)
    max_examples: int = Field(64, ge=1)
    max_example_chars: int = Field(200_000, ge=1)
    # Supervision and timeouts (a hung engine or a client that stops reading must not hold a slot).
    probe_interval: float = Field(10.0, gt=0, description="seconds between health probes of each ready engine")
    probe_timeout: float = Field(5.0, gt=0, description="seconds an engine has to answer a health probe")
    probe_misses: int = Field(3, ge=1, description="missed probes in a row before an engine is killed")
    upstream_read_timeout: float = Field(900.0, gt=0, description="seconds to wait for an engine's whole "
                                         "non-streamed answer (504 after)")
    upstream_idle_timeout: float = Field(300.0, gt=0, description="seconds a streamed answer may pause "
                                         "between events before it is ended with an error")
    client_send_timeout: float = Field(30.0, gt=0, description="seconds a client may leave a streamed "
                                       "answer unread before it is dropped and its request aborted")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Host header values accepted (comma-separated; '*' = any). "
        "Default: loopback names when no API key is set (against DNS rebinding), any host otherwise")

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

    @field_validator("api_key", "admin_key", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("served_model_name")
    @classmethod
    def _model_id(cls, v: str | None) -> str | None:
        if v is not None and (not _MODEL_ID.match(v) or ".." in v):
            raise ValueError(f"{v!r}: a model id is 1-64 letters, digits, '_', '-', '.', "
                             "starting with a letter or digit, without '..'")
        return v

    @model_validator(mode="after")
    def _secure(self) -> "Settings":
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
    def subsets_dir(self) -> Path:
        return self.state_dir / "subsets"

    @property
    def materialized_dir(self) -> Path:
        return self.state_dir / "materialized"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"


def shipped_default_model() -> Path | None:
    """The trained toy EMO shipped inside the package, if this build has one."""
    shipped = resources.files("emo_serve") / "data" / "models" / DEFAULT_MODEL_ID
    return Path(str(shipped)) if (shipped / "config.json").is_file() else None


def resolve_default_model(state_dir: Path) -> Path:
    """The embedded default base: the shipped toy EMO if there is one, otherwise the tiny demo
    checkpoint, generated once into `<state_dir>/models/emo-demo`."""
    shipped = shipped_default_model()
    if shipped is not None:
        return shipped
    target = state_dir / "models" / DEFAULT_MODEL_ID
    if not (target / "config.json").is_file():
        from .demo import write_demo_checkpoint

        try:
            write_demo_checkpoint(target, "tiny", seed=0)
        except FileExistsError:  # another process generated it first (or left a partial dir)
            if not (target / "config.json").is_file():
                raise
    return target


def derive_model_id(location: str) -> str:
    """The API id of a base given by path, URL or Hub id: its last path component."""
    name = location.rstrip("/").rsplit("/", 1)[-1] or "base"
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", name).lstrip("._-")[:64] or "base"
    return name.replace("..", ".")
