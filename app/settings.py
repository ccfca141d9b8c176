"""All service settings in one class; each field is also an ``RDSERVE_<NAME>`` variable (one
documented field per setting, so the module is as long as the list of settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.specs import family_spec


def _xdg_data() -> Path:
    return Path.home() / ".local" / "share" / "rdserve"


class Settings(BaseSettings):
    """rdserve configuration (CLI flags override these; the README table is generated from it)."""

    # Empty variables (compose's ${VAR:-}) mean "unset", not "".
    model_config = SettingsConfigDict(env_prefix="RDSERVE_", extra="ignore", env_ignore_empty=True)

    # Models and artifact
    family: str = Field(
        "esm2",
        description="Model family of the default chain (esm2, unirep). Unset: esm2 when its "
        "weights can be had (local, HF cache, hub), else unirep (weights from PyPI).",
    )
    models: str | None = Field(
        None,
        description="The chain's models, smallest first (shorthands, hub ids or local "
        "directories). With an artifact: where its levels load from (same family and dims). "
        "Without: the chain whose default artifact is served. Default: the family's chain "
        "(esm2 8M,35M,150M; unirep 64,256,1900).",
    )
    revision: str | None = Field(None, description="Hub revision pinned for every model.")
    artifact: Path | None = Field(
        None, description="Projection artifact; default: <data_dir>/artifacts/<chain>.safetensors."
    )
    data_dir: Path = Field(
        default_factory=_xdg_data, description="Where fitted artifacts are kept."
    )
    cache_dir: Path | None = Field(
        None, description="Downloaded weights (UniRep); default ~/.cache/rdserve."
    )
    fit_sequences: int = Field(
        1000,
        ge=2,
        description="Packaged UniRef90 sequences used to fit a missing default artifact (set: "
        "fit even where a default artifact ships, e.g. unirep's).",
    )
    device: str = Field("auto", description="Worker device: auto, cpu, cuda, cuda:N.")
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads of model forwards (default: OMP_NUM_THREADS if set, else the "
        "cores this process may use, from its affinity and cgroup quota; 1 on a host shared "
        "with other busy processes).",
    )
    dtype: str = Field(
        "auto", description="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16."
    )

    # Batching
    token_budget: int | None = Field(
        None,
        ge=64,
        description="Tokens per model batch, padding included (default: the family's: esm2 "
        "1536 on CPU, 16384 on CUDA; unirep 32768).",
    )
    batch_wait_ms: float = Field(
        2.0, ge=0, description="How long the worker waits for more requests to fill a batch."
    )
    chunk_overlap: int = Field(256, ge=0, description="Overlap of windows for the 'chunk' policy.")
    warmup: bool = Field(True, description="Load every level and run a small batch at start.")
    packed_batches: bool = Field(
        False,
        description="Run each batch as one unpadded row with variable-length attention (esm2; "
        "FlashAttention's varlen kernel on CUDA in bf16/fp16).",
    )
    compile: bool = Field(
        False,
        description="torch.compile each level's layers for a handful of packed batch lengths "
        "during warm-up (readiness waits for it; implies packed_batches; esm2).",
    )
    compile_cache_dir: Path | None = Field(
        None,
        description="Where compiled kernels are kept for the next start; default "
        "<cache_dir>/torch-compile.",
    )

    # Request limits
    max_sequences: int = Field(
        2048,
        ge=1,
        description="Most sequences in one request (413 above; OpenAI's own limit, above "
        "LangChain's batch of 1,000): max_residues is what bounds the work.",
    )
    max_residues: int = Field(
        2**20,
        ge=1,
        description="Most residues in one request (413 above): a LangChain batch of 1,000 "
        "typical proteins (~300k residues) fits; lower it where a request this large would not "
        "finish within request_timeout_s (CPU-only servers).",
    )
    max_output_bytes: int = Field(
        64 * 2**20,
        ge=1024,
        description="Largest response, estimated before any work (413 above, suggesting binary "
        "output or a bulk job); also bounds the float32 blocks a worker returns for it.",
    )
    max_body_bytes: int = Field(
        16 * 2**20, ge=1024, description="Largest request body (413 above)."
    )
    max_queue: int = Field(1024, ge=1, description="Most queued requests before 429.")
    request_timeout_s: float = Field(120.0, gt=0, description="Per-request deadline (504 after).")
    shutdown_timeout_s: float = Field(
        25.0,
        gt=0,
        description="On SIGTERM the API stops accepting and waits this long for in-flight "
        "requests (keep it below the orchestrator's stop grace period).",
    )

    # Bulk jobs
    job_store: str | None = Field(
        None,
        description="Where bulk jobs' inputs and results live: a directory or an fsspec URL "
        "(s3://bucket/prefix, gs://…; its package installed); default <data_dir>/jobs. API "
        "replicas must share it.",
    )
    job_retention_s: float = Field(
        7 * 24 * 3600, gt=0, description="Ended jobs (and their results) are deleted after this."
    )
    job_max_records: int = Field(10_000_000, ge=1, description="Most records in one job (413).")
    job_max_residues: int = Field(
        4_000_000_000, ge=1, description="Most residues in one job (413)."
    )
    job_max_bytes: int = Field(
        16 * 2**30, ge=1024, description="Largest job upload as sent (gzip: compressed; 413)."
    )
    job_chunk_residues: int = Field(
        32_768,
        ge=64,
        description="Residues per job chunk: what one worker takes at a time (a chunk is also at "
        "most 1,024 records, and max_residues).",
    )
    job_max_inflight: int = Field(
        0,
        ge=0,
        description="Chunks of one job queued or computing at once (0: two per live worker).",
    )
    job_lease_s: float = Field(
        15.0,
        gt=0,
        description="A job's driver holds a lease this long, renewed every third of it: when an "
        "API process dies, another takes its jobs over after about this long.",
    )
    job_poll_s: float = Field(
        2.0, gt=0, description="How often each API process looks for jobs nobody drives."
    )

    # Cache
    cache_max_bytes: int = Field(
        512 * 2**20, ge=0, description="Embedded-mode in-memory LRU capacity (0 disables)."
    )
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=0, description="Redis cache entry TTL (0: none).")
    cache_per_residue_max_bytes: int = Field(
        2 * 2**20, ge=0, description="Largest per-residue result that is cached."
    )

    # Distributed mode
    redis_url: str | None = Field(None, description="Redis URL; set it for distributed mode.")
    cache_redis_url: str | None = Field(
        None, description="Separate Redis for the cache (an LRU instance); default: redis_url."
    )
    redis_prefix: str = Field("rdserve", description="Key prefix of every Redis key.")
    redis_max_connections: int = Field(
        64, ge=2, description="API's Redis connections per pool; more requests wait for one."
    )
    redis_username: str | None = Field(
        None, description="Redis ACL user of this process (unless the URL names one)."
    )
    redis_password_file: Path | None = Field(
        None, description="File with the Redis password of this process (both Redis URLs)."
    )
    redis_reply_ttl_s: float = Field(
        60.0,
        gt=0,
        description="An API process's reply stream outlives the process by at most this long "
        "(it renews the TTL while it lives).",
    )
    worker_wake_s: float = Field(
        0.0,
        ge=0,
        description="Scale to zero: with no live worker, queue a request and wait this long (at "
        "least 5 s, below request_timeout_s) for one to start (the autoscaler's cold start); 0 "
        "answers 503 no_worker at once.",
    )
    worker_id: str | None = Field(
        None,
        description="Worker name (default host-pid); each start adds a nonce to it, so a "
        "restart under the same name is a new consumer.",
    )
    heartbeat_s: float = Field(2.0, gt=0, description="Worker heartbeat period.")
    claim_idle_s: float = Field(
        300.0, gt=0, description="Reclaim tasks a dead worker left pending after this long."
    )

    # HTTP
    host: str = Field("127.0.0.1", description="Bind address of the API.")
    port: int = Field(8000, ge=0, le=65535, description="Port of the API.")
    metrics_port: int = Field(
        9100, ge=0, le=65535, description="Worker /metrics and /health/live port (0: off)."
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Bind address of the worker's /metrics and /health/live."
    )
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="Longest a client may take to send a request's headers (408)."
    )
    http_body_timeout_s: float = Field(
        30.0, gt=0, description="Longest pause while a client sends a request body (closed)."
    )
    http_keep_alive_s: float = Field(
        5.0, gt=0, description="Idle keep-alive connections are closed after this long."
    )
    http_max_connections: int = Field(
        1024, ge=1, description="Most open client connections of the API; more get 503 at once."
    )
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated API keys (auth off if unset)."
    )
    api_key_file: Path | None = Field(None, description="File with one API key per line.")
    cors_origins: str | None = Field(
        None,
        description="Comma-separated origins allowed by CORS, or * (unset: CORS off; browsers "
        "then refuse cross-origin calls).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    log_sequences: bool = Field(
        False, description="Include sequences in debug logs (off: privacy)."
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        family_spec(self.family)  # an unknown family fails at start-up, listing the known ones
        if self.models is not None and not self.model_list:
            raise ValueError("models must name at least one model")
        self.keys()  # a configured but empty or unreadable key list is an error at start-up
        if self.worker_wake_s >= self.request_timeout_s:
            # The request's deadline would end the wait first: a 504 nobody retries.
            raise ValueError(
                f"worker_wake_s ({self.worker_wake_s:g} s) must be below request_timeout_s "
                f"({self.request_timeout_s:g} s): a request waits for a worker within its deadline"
            )
        return self

    @property
    def cors_origin_list(self) -> list[str]:
        """The CORS origins as a list (empty: CORS off)."""
        return [o.strip() for o in (self.cors_origins or "").split(",") if o.strip()]

    @property
    def model_list(self) -> list[str] | None:
        """The configured chain as a list (None: not configured)."""
        if self.models is None:
            return None
        return [m.strip() for m in self.models.split(",") if m.strip()]

    @property
    def default_chain(self) -> list[str]:
        """The chain to serve when no artifact is given: the configured one or the family's."""
        return self.model_list or list(family_spec(self.family).default_models)

    def keys(self) -> list[str]:
        """Configured API keys (env and file); empty means authentication is off.

        Raises ValueError when keys were configured but none remain (a blank variable or a file
        of blank and comment lines): that must not silently turn authentication off.
        """
        keys: list[str] = []
        if self.api_keys is not None:
            keys += [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]
        if self.api_key_file is not None:
            try:
                lines = self.api_key_file.read_text().splitlines()
            except OSError as e:
                raise ValueError(f"api_key_file: cannot read {self.api_key_file}: {e}") from None
            keys += [k.strip() for k in lines if k.strip() and not k.strip().startswith("#")]
        configured = self.api_key_file is not None or (
            self.api_keys is not None and self.api_keys.get_secret_value().strip() != ""
        )
        if configured and not keys:
            raise ValueError("API keys were configured but none were found (empty key list)")
        return keys

    def redis_auth(self) -> dict[str, str]:
        """Redis client credentials (``username``, ``password``: the password file's first line,
        trimmed, as docker/redis-start.sh reads it); a URL that carries its own wins.

        Raises ValueError when the password file cannot be read or holds no password.
        """
        auth = {}
        if self.redis_username:
            auth["username"] = self.redis_username
        if self.redis_password_file is not None:
            path = self.redis_password_file
            try:
                lines = path.read_text().splitlines()
            except OSError as e:
                raise ValueError(f"redis_password_file: cannot read {path}: {e}") from None
            if not lines or not lines[0].strip():
                raise ValueError(f"redis_password_file: {path} holds no password")
            auth["password"] = lines[0].strip()
        return auth
