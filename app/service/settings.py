"""Typed service settings: defaults < config file (TOML) < ``TESSERA_*`` environment variables < CLI flags."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from pipelines.errors import UsageError
from pipelines.limits import InputLimits

GiB = 1024**3


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PacsEndpoint(BaseModel):
    """A DICOMweb server jobs may name (``{"pacs": NAME, ...}``): configured here, never given by clients, so the
    service cannot be made to fetch from an arbitrary URL. Credentials never appear in logs or reprs."""

    model_config = {"extra": "forbid"}

    url: str = Field(description="the DICOMweb root, e.g. http://pacs:8042/dicom-web", pattern=r"^https?://")
    user: str | None = Field(default=None, description="HTTP basic user")
    password: str | None = Field(default=None, repr=False, description="HTTP basic password")
    token: str | None = Field(default=None, repr=False, description="bearer token (instead of user and password)")
    timeout_s: float = Field(default=30.0, gt=0, description="seconds per request")
    retries: int = Field(default=3, ge=1, description="attempts of a request that failed to connect or got "
                                                      "408/429/503/504")


class ServiceSettings(BaseSettings):
    """Everything the REST service and its workers need; ``TESSERA_<FIELD>`` in the environment sets a field."""

    model_config = SettingsConfigDict(env_prefix="TESSERA_", extra="forbid")

    data_dir: Path = Field(default=Path("tessera-data"), description="job store (SQLite), uploads and results")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    auth: bool = Field(default=True, description="require an API key; may be switched off only on a loopback address")
    default_model: str | None = Field(default=None, description="model for jobs that name none")
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    concurrency: int | None = Field(default=None, ge=1, description="jobs at once; default one per GPU, else one")
    executor: Literal["local", "ray"] = Field(
        default="local", description="where jobs' cases run: local worker processes, or Ray actors on a cluster "
                                     "(extra 'ray'; claims, attempts and results stay in this server's SQLite)")
    ray_address: str | None = Field(default=None, description="the Ray cluster for executor 'ray' (default: "
                                                              "$RAY_ADDRESS, else a Ray started on this machine)")
    pacs: dict[str, PacsEndpoint] = Field(
        default_factory=dict, description="DICOMweb servers by name, for jobs by reference (TESSERA_PACS as JSON, "
                                          "or [pacs.NAME] tables in the config file)")
    max_queued_jobs: int = Field(default=32, ge=1, description="queued jobs beyond which uploads get 429")
    job_timeout_s: float = Field(default=3600.0, gt=0, description="a running job is stopped after this long")
    read_ahead: bool = Field(default=True, description="a worker reads its next job while it predicts the current "
                                                       "one (two jobs running per worker, one of them reading)")
    max_attempts: int = Field(default=3, ge=1, description="runs of a job interrupted by crashes before it is failed")
    max_upload_bytes: int = Field(default=2 * GiB, ge=1, description="request bodies above this get 413")
    header_timeout_s: float = Field(default=10.0, gt=0,
                                    description="a connection that has not sent a whole request head is closed")
    body_idle_timeout_s: float = Field(default=30.0, gt=0,
                                       description="a request body that stalls this long gets 408")
    min_upload_rate: int = Field(default=16 * 1024, ge=0,
                                 description="bytes/s a request body must average after its first "
                                             "body_idle_timeout_s (0: no minimum), else 408")
    max_worker_memory_bytes: int | None = Field(
        default=None, ge=1, description="resident memory of a worker and its children while it runs a job; over "
                                        "it the job fails (JOB_MEMORY_EXCEEDED); default 80% of RAM per worker")
    max_files: int = Field(default=8, ge=1, description="file parts per upload (multi-channel models)")
    zip_max_members: int = Field(default=20_000, ge=1)
    zip_max_bytes: int = Field(default=8 * GiB, ge=1, description="uncompressed size limit of an uploaded zip")
    retention_hours: float = Field(default=168.0, gt=0, description="finished jobs' files are deleted after this long")
    retention_sweep_s: float = Field(default=300.0, gt=0, description="how often old jobs are looked for")
    cancel_grace_s: float = Field(default=20.0, gt=0, description="a worker that ignores a cancel this long is killed")
    cors_origins: list[str] = Field(default_factory=list, description="CORS is off unless origins are listed")
    max_voxels: int = Field(default=InputLimits.max_voxels, ge=1, description="voxels of one input volume")
    max_model_voxels: int = Field(default=InputLimits.max_model_voxels, ge=1,
                                  description="voxels of one volume on the model's grid")
    max_decompressed_bytes: int = Field(default=InputLimits.max_decompressed_bytes, ge=1,
                                        description="bytes one gzip stream or zip member may inflate to")
    max_frames: int = Field(default=InputLimits.max_frames, ge=1, description="frames one DICOM file may declare")
    max_inflate_ratio: int = Field(default=InputLimits.max_inflate_ratio, ge=1,
                                   description="inflated / compressed bytes of one gzip stream or zip member, "
                                               "checked past 64 MiB inflated")

    @model_validator(mode="after")
    def _auth_only_off_on_loopback(self) -> ServiceSettings:
        if not self.auth and not is_loopback(self.host):
            raise ValueError(f"auth may be switched off only on a loopback address, not on {self.host!r}")
        return self

    def apply_input_limits(self) -> None:
        """Make the input limits of these settings the process's (the readers take them from the environment,
        so workers and the reader's own children see the same)."""
        for field in fields(InputLimits):
            os.environ[f"TESSERA_{field.name.upper()}"] = str(getattr(self, field.name))

    @property
    def database(self) -> Path:
        return self.data_dir / "tessera.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config = os.environ.get("TESSERA_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config)))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> ServiceSettings:
    """Settings from a TOML file (``config_file`` or ``$TESSERA_CONFIG``), the environment and overrides."""
    from pydantic import ValidationError

    previous = os.environ.get("TESSERA_CONFIG")
    if config_file is not None:
        if not config_file.is_file():
            raise UsageError("CONFIG_NOT_FOUND", f"{config_file}: no such config file")
        os.environ["TESSERA_CONFIG"] = str(config_file)
    try:
        return ServiceSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise UsageError("BAD_SETTINGS", problems) from exc
    finally:
        if config_file is not None:
            if previous is None:
                os.environ.pop("TESSERA_CONFIG", None)
            else:
                os.environ["TESSERA_CONFIG"] = previous
