"""The JSON the REST service answers with (documented in its OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorInfo(BaseModel):
    code: str
    message: str


class Artifact(BaseModel):
    name: str
    url: str
    bytes: int


class JobInfo(BaseModel):
    id: str
    url: str
    state: str = Field(description="queued, running, succeeded, failed or cancelled")
    stage: str | None = Field(default=None, description="pipeline stage of a running job")
    progress: float = Field(description="0..1")
    model: str
    formats: list[str] | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    queue_position: int | None = Field(default=None, description="jobs ahead of this one, while queued")
    attempts: int
    warnings: list[str]
    error: ErrorInfo | None
    timings_s: dict[str, float]
    artifacts: list[Artifact]
    expired: bool = Field(default=False, description="the files were deleted by the retention policy")


class JobList(BaseModel):
    jobs: list[JobInfo]


class Accepted(BaseModel):
    id: str
    url: str
    state: str


class LabelInfo(BaseModel):
    value: int
    name: str


class ModelInfo(BaseModel):
    name: str
    version: str
    family: str
    default: bool
    channels: list[str]
    labels: list[LabelInfo]


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: str
    version: str | None = None
    workers: int | None = None
    queued: int | None = None
