"""Every setting of the service, from CLI flags or ``RTPRUNE_*`` environment variables.

This is the only module that reads the environment. ``rtprune-ocr serve --help`` and
the README's table list the same fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.engine.loading import DEFAULT_MODEL


class ServiceSettings(BaseSettings):
    """Configuration of one service process (one model, one worker)."""

    model_config = SettingsConfigDict(env_prefix="RTPRUNE_", env_file=None, extra="ignore")

    model: str = Field(
        DEFAULT_MODEL, description="hub id, local checkpoint directory, or random preset (tiny, tiny-v2, random-full)"
    )
    device: str | None = Field(None, description="cuda, cuda:N or cpu; default cuda when available")
    dtype: Literal["bf16", "fp16", "fp32"] | None = Field(None, description="default bf16 on CUDA, fp32 on CPU")
    cache_dir: Path | None = Field(None, description="where presets are written (default ~/.cache/rtprune-ocr)")
    host: str = Field("0.0.0.0", description="interface to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    api_key: SecretStr | None = Field(None, description="when set, /v1/* requires the X-API-Key header")
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1024, description="largest accepted request body")
    max_image_pixels: int = Field(40_000_000, ge=4096, description="largest image or rendered PDF page, in pixels")
    max_pdf_pages: int = Field(50, ge=1, description="most PDF pages per request")
    queue_size: int = Field(16, ge=1, description="requests that may wait for the model; more get 503")
    max_batch_size: int = Field(
        8, ge=1, le=256, description="most pages run together in one batch; 1 turns batching off"
    )
    batch_wait_ms: float = Field(5.0, ge=0, le=5000, description="how long a batch waits for more requests to join")
    request_timeout_s: float = Field(600.0, gt=0, description="per-request deadline (queue + work); then 504")
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with 503")
    warmup: bool = Field(True, description="run one tiny page before reporting ready")
    log_json: bool = Field(True, description="structured JSON log lines")

    @model_validator(mode="after")
    def _check(self) -> ServiceSettings:
        if self.api_key is not None and not self.api_key.get_secret_value():
            self.api_key = None  # an empty RTPRUNE_API_KEY means no key, not a key that is empty
        return self
