"""Validated, frozen configuration of a correction (the edge layer: files and options become keywords here)."""

from __future__ import annotations

import hashlib
import json
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .reference import FORMS


class CorrectionConfig(BaseModel):
    """Every option that changes the result of a correction.

    Unknown keys are refused. The same object is stored in the output's attributes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    reference: str = Field("iterative", description="frame index, iterative[:A:B], pairs[:A:B], mean:A:B or median:A:B")
    upsample_factor: float = Field(50.0, ge=1, description="subpixel precision is 1/upsample_factor px")
    max_shift: int | None = Field(None, ge=1, description="largest shift searched per axis, px (default: 1/8 frame)")
    method: Literal["ncc", "phase"] = "ncc"
    min_overlap: float = Field(0.3, gt=0, le=1)
    detect_defects: bool = Field(True, description="find hot, dead, stuck (and, without a mask, unlit) pixels")
    tame_outliers: bool = Field(True, description="leave out cosmic-ray streaks and other frame-local outliers")
    bandpass: tuple[float, float | None] | None = Field(
        None, description="mask-aware difference-of-Gaussians scales [low, high] px applied before correlating")
    min_ncc: float = Field(0.1, ge=-1, le=1, description="frames correlating worse are flagged invalid")
    interpolation_order: int = Field(3, ge=0, le=5, description="spline order used to shift frames")
    block_frames: int | None = Field(None, ge=1, description="frames per task (default: from the frame size)")
    start_time: datetime | None = Field(None, description="time of frame 0 (ISO 8601); with frame_interval it "
                                                          "builds the output's time coordinate")
    frame_interval: float | None = Field(None, gt=0, description="seconds between frames (with start_time)")
    array: str | None = Field(None, description="array name inside an input group")

    @field_validator("reference", mode="before")
    @classmethod
    def _reference_as_text(cls, value):
        if isinstance(value, bool):
            raise ValueError(f"must be {FORMS}")
        return str(value) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _time_needs_both(self):
        if (self.start_time is None) != (self.frame_interval is None):
            raise ValueError("start_time and frame_interval go together: give both or neither")
        return self

    @field_validator("bandpass")
    @classmethod
    def _bandpass_order(cls, value):
        if value is not None:
            low, high = value
            if not low > 0 or (high is not None and not high > low):
                raise ValueError("needs 0 < low < high, in px, e.g. [1, 12]")
        return value

    def digest(self) -> str:
        """Short hash of the options that change the result."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _explain(error: ValidationError, model: type[BaseModel] | None = None) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        known = ", ".join((model or CorrectionConfig).model_fields)
        return f"unknown configuration key {key!r}; known keys: {known}"
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:  # a rule between keys: the message names them
        return f"invalid configuration: {message}"
    return f"invalid value for {key!r}: {message} (got {first.get('input')!r})"


def make_config(**options) -> CorrectionConfig:
    """Build a validated configuration from keyword options (``None`` values are left at their defaults).

    Raises
    ------
    ConfigError
        Naming the unknown key or the invalid value.
    """
    given = {key: value for key, value in options.items() if value is not None}
    try:
        return CorrectionConfig(**given)
    except ValidationError as error:
        raise ConfigError(_explain(error)) from None


def _read_config_file(path) -> dict:
    """The whole TOML or JSON configuration file as a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {str(path)!r} does not exist")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"cannot read configuration file {str(path)!r}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"configuration file {str(path)!r} must hold a table of options")
    return data


def load_config_file(path) -> dict:
    """Read a TOML or JSON configuration file into a dict of options.

    Options may sit at the top level or in a ``[correction]`` table.
    """
    data = _read_config_file(path)
    if "correction" in data:
        others = sorted(set(data) - {"correction", *RUN_SECTIONS})
        if others:
            raise ConfigError(f"configuration file {str(path)!r}: {others[0]!r} is outside the [correction], "
                              "[cluster] and [storage_options] tables; move it into one of them")
        return dict(data["correction"])
    return {key: value for key, value in data.items() if key not in RUN_SECTIONS}


#: Tables of a configuration file that say how to run, not what to compute (not part of the output's identity).
RUN_SECTIONS = ("cluster", "storage_options")


class ClusterConfig(BaseModel):
    """Where the work runs: the local threaded scheduler (default), a local cluster of worker processes, or a
    running Dask scheduler (its address or scheduler file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheduler: str | None = Field(None, description="tcp://HOST:PORT of a running scheduler, or its scheduler file")
    local_workers: int | None = Field(None, ge=1, description="start a local cluster of this many worker processes")
    threads_per_worker: int = Field(1, ge=1, description="threads of each local worker process")

    @model_validator(mode="after")
    def _one_kind_of_cluster(self):
        if self.scheduler is not None and self.local_workers is not None:
            raise ValueError("give either scheduler (a running cluster) or local_workers (a new local one), not both")
        return self


def load_run_settings(path, *, scheduler: str | None = None) -> tuple[ClusterConfig, dict]:
    """The ``[cluster]`` and ``[storage_options]`` tables of a configuration file (``path`` may be None).

    ``scheduler`` (from the command line) overrides the file's.
    """
    data = _read_config_file(path) if path is not None else {}
    cluster = data.get("cluster", {})
    if not isinstance(cluster, dict):
        raise ConfigError("[cluster] must be a table, e.g. [cluster] scheduler = \"tcp://HOST:8786\"")
    cluster = dict(cluster)
    if scheduler is not None:
        cluster["scheduler"] = scheduler
    try:
        settings = ClusterConfig(**cluster)
    except ValidationError as error:
        raise ConfigError(_explain(error, ClusterConfig).replace("configuration key", "[cluster] key")) from None
    storage = data.get("storage_options", {})
    if not isinstance(storage, dict):
        raise ConfigError("[storage_options] must be a table of fsspec options, e.g. {s3 = {anon = false}}")
    return settings, storage
