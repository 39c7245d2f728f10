"""The server's one settings object: command-line flags > `CHATMED_*` environment variables > defaults.

Built once in `server.__main__.main()` and passed down; nothing here runs at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, CliSuppress, NoDecode, SettingsConfigDict

from engine import EngineConfig

DEMO_BASE_NAME = "chatmed-demo-base"
_MIB = 1024**2


class Settings(BaseSettings):
    """Every knob of the server, typed. Each field is a flag `--kebab-name` and a variable `CHATMED_NAME`."""

    model_config = SettingsConfigDict(
        env_prefix="CHATMED_",
        cli_kebab_case=True,
        cli_prog_name="chatmed-serve",
        cli_implicit_flags=True,
        cli_show_env_vars=True,
        extra="ignore",
    )

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    base_model: Path | None = Field(
        default=None,
        description="Hugging Face LLaMA folder; without it the embedded (random-weight) demo is served",
    )
    adapter: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="a LoRA adapter to serve as NAME=PATH; repeat the flag (env: comma-separated)",
    )
    served_model_name: str | None = Field(
        default=None,
        description="the `model` name of the base; unset: the base folder's name (demo: chatmed-demo-base)",
    )
    chat_template: Path | None = Field(
        default=None, description="a Jinja chat template file used for every served model instead of its own"
    )
    api_key: SecretStr | None = Field(
        default=None, description="require `Authorization: Bearer <key>` on every route but /health"
    )
    device: str = Field(default="cpu", description="torch device, e.g. cpu or cuda")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="weight and KV cache dtype; auto: bfloat16 on a GPU of compute capability 8 or more "
        "(else float16), "
        "bfloat16 on a CPU with bfloat16 matrix instructions (AMX, AVX512-BF16), else float32",
    )
    kv_cache_memory_mb: int = Field(default=512, ge=1, description="memory for the paged KV cache, in MiB")
    num_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch CPU threads of the engine; unset on the CPU: every core but one, which the "
        "event loop keeps (at least 1)",
    )
    prefill_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch CPU threads for engine steps with 128 prompt tokens or more; unset: every "
        "core on the CPU, or --num-threads when that is given",
    )
    enforce_eager: bool = Field(
        default=False, description="on CUDA, run every decode step eagerly instead of replaying CUDA graphs"
    )
    overlap_steps: bool = Field(
        default=True,
        description="on CUDA, run each CUDA-graph decode step while the host reads back the step before's "
        "tokens (each token reaches its stream one step later); steps with top-k/top-p sampling or "
        "logprobs are never deferred; --no-overlap-steps: every step ends with its tokens read",
    )
    max_num_seqs: int = Field(default=64, ge=1, description="requests running at once")
    max_model_len: int | None = Field(
        default=None, ge=2, description="context length in tokens; unset: the model's own"
    )
    max_num_batched_tokens: int = Field(
        default=1024, ge=1, description="tokens per engine step (chunked prefill)"
    )
    max_loras: int = Field(default=4, ge=1, description="adapters resident in device slots at once")
    max_cpu_loras: int | None = Field(
        default=None, ge=1, description="adapters kept in host memory (LRU); unset: max(max_loras, 16)"
    )
    max_lora_rank: int = Field(default=64, ge=1, description="largest LoRA rank an adapter may have")
    admin_api_key: SecretStr | None = Field(
        default=None,
        description="enables POST /v1/load_lora_adapter and /v1/unload_lora_adapter, which need "
        "`Authorization: Bearer <key>`; unset: those routes do not exist",
    )
    adapters_root: Path | None = Field(
        default=None, description="the only folder runtime-loaded adapters may come from (admin API)"
    )
    max_queued_requests: int = Field(
        default=1024, ge=1, description="waiting requests beyond which new ones get 429"
    )
    max_n: int = Field(default=8, ge=1, le=128, description="largest `n` (choices per request) accepted")
    stream_ping_s: float = Field(
        default=15.0, gt=0, description="seconds between keep-alive comments on idle streams"
    )
    send_timeout_s: float = Field(
        default=30.0, gt=0, description="a stream whose client reads nothing for this long is cut"
    )
    max_request_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="larger request bodies get 413 before they are read"
    )
    drain_timeout: float = Field(
        default=30.0, ge=0, description="seconds running requests get to finish after SIGTERM"
    )
    log_requests: bool = Field(
        default=False, description="log prompts and completions (health data: off unless needed)"
    )
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS (repeat; env: comma-separated); none: off"
    )
    cache_dir: Path | None = Field(
        default=None, description="where the embedded demo is built once; unset: ~/.cache/chatmed-serve"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="log level")
    # For tests: builds a much smaller demo model so that a server starts in seconds.
    demo_size: CliSuppress[Literal["default", "tiny"]] = "default"

    @field_validator("adapter", "cors_allow_origins", mode="before")
    @classmethod
    def _split_adapters(cls, value: object) -> object:
        # Environment variables carry one string: "a=/x,b=/y".
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("adapter")
    @classmethod
    def _check_adapters(cls, value: list[str]) -> list[str]:
        names = [parse_adapter(spec)[0] for spec in value]
        if len(set(names)) != len(names):
            raise ValueError("adapter names must be unique")
        return value

    @model_validator(mode="after")
    def _check_adapter_admin(self) -> Settings:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be at least max_loras")
        if self.admin_api_key is not None and self.adapters_root is None:
            raise ValueError("--admin-api-key needs --adapters-root, the folder adapters may be loaded from")
        if self.adapters_root is not None and not self.adapters_root.is_dir():
            raise ValueError("--adapters-root must be an existing folder")
        if self.admin_api_key is not None and not self.admin_api_key.get_secret_value().strip():
            raise ValueError("--admin-api-key must not be empty")
        return self

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> Settings:
        """Flags from `argv` (default: sys.argv[1:]) over the environment over the defaults."""
        # mypy sees only the fields in __init__'s signature, not BaseSettings' own `_cli_*` arguments.
        return cls(_cli_parse_args=argv if argv is not None else True)  # type: ignore[call-arg]

    def adapter_paths(self) -> tuple[tuple[str, Path], ...]:
        """The `--adapter NAME=PATH` pairs, parsed."""
        return tuple(parse_adapter(spec) for spec in self.adapter)

    def engine_config(self, model_path: Path, adapters: tuple[tuple[str, Path], ...]) -> EngineConfig:
        """The engine's frozen config for this base folder and these start-up adapters."""
        on_cpu = self.device.split(":")[0] == "cpu"
        num_threads = self.num_threads or (default_cpu_threads() if on_cpu else None)
        return EngineConfig(
            model_path=model_path,
            adapters=adapters,
            device=self.device,
            dtype=self.dtype,
            kv_cache_bytes=self.kv_cache_memory_mb * _MIB,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            max_queued_requests=self.max_queued_requests,
            max_loras=self.max_loras,
            max_cpu_loras=self.max_cpu_loras or max(self.max_loras, EngineConfig.max_cpu_loras),
            max_lora_rank=self.max_lora_rank,
            num_threads=num_threads,
            prefill_threads=self._prefill_threads(on_cpu, num_threads),
            enforce_eager=self.enforce_eager,
            overlap_steps=self.overlap_steps,
        )

    def _prefill_threads(self, on_cpu: bool, num_threads: int | None) -> int | None:
        """--prefill-threads when given (with a thread count for the other steps); on the CPU, with
        neither flag, every core; an explicit --num-threads alone bounds every step."""
        if num_threads is None:
            return None
        if self.prefill_threads is not None:
            return self.prefill_threads
        return len(os.sched_getaffinity(0)) if on_cpu and self.num_threads is None else None


def default_cpu_threads() -> int:
    """Every core this process may use but one: the engine's matmuls wait at each step's barriers for
    their slowest thread, and a thread that shares its core with the event loop is often that one."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def parse_adapter(spec: str) -> tuple[str, Path]:
    """`NAME=PATH` → (name, path); ValueError with a readable message otherwise."""
    name, sep, path = spec.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise ValueError(f"adapter must be NAME=PATH, got {spec!r}")
    if name == DEMO_BASE_NAME or "/" in name:
        raise ValueError(f"adapter name {name!r} is reserved or contains '/'")
    return name, Path(path).expanduser()
