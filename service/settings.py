"""The one place the server's configuration lives: env vars `LEVIT_*`, overridable by CLI flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.configs import VARIANTS
from model.weights import default_cache_dir
from service.threads import Priority, ThreadPolicy


class Settings(BaseSettings):
    """Every knob of the server. Field `foo_bar` is env `LEVIT_FOO_BAR` and flag `--foo-bar`."""

    model_config = SettingsConfigDict(env_prefix="LEVIT_", extra="forbid", validate_default=True)

    model: str = Field("LeViT_128S", description="LeViT variant: " + ", ".join(VARIANTS))
    weights: str = Field("auto", description="auto | random | PATH | URL of a checkpoint")
    require_pretrained: bool = Field(False, description="refuse to start on random weights")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="downloaded weights")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description="compute dtype. float16: GPU only. bfloat16: GPU, or a CPU with AMX (Intel Xeon 4th generation "
        "and later; refused at start elsewhere: with oneDNN held below AMX it measured 1.5x slower than float32). "
        "On a 2-core AMX Xeon 1.8-1.9x float32's model throughput at batch 8-16 and 1.44-1.50x the server's on "
        "photos at 32 clients, logits within 0.5-0.7% of float32's largest (docs/benchmarks.md)",
    )
    engine: Literal["auto", "aot", "compile", "trace", "eager"] = Field(
        "auto",
        description="CPU execution path; auto = aot (the compiled artifact, found in LEVIT_ENGINE_PATH or built "
        "there when a C++ compiler exists), else trace",
    )
    engine_path: str = Field(
        "",
        description="folders holding compiled engine artifacts, ':'-separated, searched in order; new builds go "
        "to the first writable one; empty = <LEVIT_CACHE_DIR>/engines",
    )
    instance_kind: Literal["process", "thread"] = Field(
        "process",
        description="process = model processes fed through shared memory by front-end processes; "
        "thread = one process, the model in a thread of it (tests, debugging)",
    )
    workers: int = Field(0, ge=0, le=256, description="front-end processes (HTTP + gRPC + decoding); 0 = from cores")
    instances: int = Field(
        0,
        ge=0,
        le=256,
        description="model processes; 0 = from cores (CPU) or 1 (GPU: every model process runs on LEVIT_DEVICE, "
        "one process per GPU is not built yet)",
    )
    threads: int = Field(0, ge=0, description="torch intra-op threads per model instance; 0 = from cores")
    split_batches: Literal["auto", "on", "off"] = Field(
        "auto",
        description="on = two CPU model processes share LEVIT_THREADS threads: the first reads every batch and "
        "splits it with the second when that one is idle, each half on half the threads (no OpenMP barrier "
        "between the halves, so a decoding thread that preempts one does not stall the other); a lone image "
        "runs on all of them. auto = on with 2-3 cores and LEVIT_INSTANCES unset (measured on 2 cores: +5-8% at "
        "32 clients, 2-8% slower at 8, the same at 1; docs/benchmarks.md)",
    )
    thread_policy: ThreadPolicy = Field(
        "brief",
        description="model processes on CPU: how OpenMP threads wait at barriers. brief = they spin "
        "LEVIT_SPIN_COUNT times, then sleep (GOMP_SPINCOUNT): the cores go back to decoding as soon as a batch "
        "ends or a team thread is preempted (on 2 cores +3-18% at 32 clients, a lone image up to 1.2 ms "
        "slower, 4x the admitted work under a 3x surge); spin = OpenMP's own default (libgomp spins 300,000 "
        "times, milliseconds); sleep = they never spin (OMP_WAIT_POLICY=PASSIVE) and each batch bucket runs on "
        "1 or LEVIT_THREADS threads, whichever was "
        "faster when timed at start (docs/benchmarks.md)",
    )
    spin_count: int = Field(
        10_000,
        ge=1,
        le=10_000_000,
        description="with LEVIT_THREAD_POLICY=brief: spins before an idle OpenMP thread sleeps (one spin is one "
        "pause instruction: 10,000 last 0.03-0.6 ms, depending on the CPU; far fewer make every parallel region "
        "of a forward pay a wake-up)",
    )
    decode_priority: Priority = Field(
        "normal",
        description="decoding threads: idle = they run only on cores the model leaves free (SCHED_IDLE), so a "
        "spinning OpenMP team is never preempted mid-batch; normal = they compete with it",
    )
    pin_cores: bool = Field(
        False,
        description="each model process on its own cores, the front-ends on the rest (if instances leave any)",
    )
    linears: Literal["auto", "onednn", "mkl"] = Field(
        "auto", description="CPU fp32 linear layers: auto = whichever of oneDNN and MKL is faster here, timed at start"
    )
    max_batch_size: int = Field(16, ge=1, le=256, description="images per model call")
    max_batch_delay_ms: float = Field(
        50.0,
        ge=0,
        le=60_000,
        description="longest a batch stays open for more images: while the model is busy (thread kind), or while "
        "front-ends are still decoding images (model processes; a lone request never waits)",
    )
    max_queue: int = Field(
        256,
        ge=1,
        description="admitted images not yet taken by a model (queued, being decoded, or one per request still "
        "being uploaded) before new work gets 503",
    )
    request_timeout_ms: int = Field(10_000, ge=1, description="default per-request deadline")
    read_timeout_s: float = Field(15.0, gt=0, description="longest pause while receiving a request body")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="per request body")
    max_image_pixels: int = Field(50_000_000, ge=1, description="decoded width*height per image")
    max_images_per_request: int = Field(64, ge=1, description="images in one request")
    exact_resize: bool = Field(False, description="disable JPEG DCT-domain downscaling")
    top_k: int = Field(5, ge=1, description="default number of predictions")
    max_top_k: int = Field(1000, ge=1, le=1000, description="largest k a client may ask for")
    host: str = Field("0.0.0.0", description="bind address for HTTP and gRPC")
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535)
    drain_timeout_s: float = Field(30.0, ge=0, description="longest SIGTERM drain")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("model")
    @classmethod
    def _known_variant(cls, value: str) -> str:
        if value not in VARIANTS:
            raise ValueError(f"unknown variant {value!r}; choose one of {', '.join(VARIANTS)}")
        return value

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        head, _, index = value.partition(":")
        if head not in ("auto", "cpu", "cuda") or (index and (head != "cuda" or not index.isdigit())):
            raise ValueError(f"{value!r} is not auto, cpu, cuda or cuda:N")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_process_for_threads(self) -> Settings:
        if self.instance_kind == "thread" and self.workers > 1:
            raise ValueError(
                f"instance_kind=thread runs one process; workers={self.workers} needs instance_kind=process"
            )
        return self

    @property
    def engine_dirs(self) -> list[Path]:
        """LEVIT_ENGINE_PATH as folders: ':'-separated, the first writable one receives new builds."""
        if self.engine_path:
            return [Path(p) for p in self.engine_path.split(":") if p]
        return [self.cache_dir / "engines"]

    @property
    def env_names(self) -> list[str]:
        return [f"LEVIT_{name.upper()}" for name in type(self).model_fields]


class SettingsError(SystemExit):
    """Raised with a one-line message naming the bad setting; exits with status 2."""


def _format_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        name = ".".join(str(p) for p in item["loc"]) or "settings"
        parts.append(f"LEVIT_{name.upper()}: {item['msg']}")
    return "invalid settings: " + "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="levit-serve", description="Serve LeViT image classification over HTTP and gRPC."
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=None, help=f"{field.description or ''} (LEVIT_{name.upper()})")
    return parser


def load_settings(argv: list[str] | None = None) -> Settings:
    """Env vars first, CLI flags on top; errors name the setting instead of dumping a traceback."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(_format_error(error)) from None
