"""Node settings of the flow observer (a section of the agent's node config, ``flows``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from weft.datapath import abi
from weft.observe.ring import DEFAULT_CAPACITY

EVENT_LEVELS = {"all": abi.EV_LEVEL_ALL, "medium": abi.EV_LEVEL_MEDIUM, "drops": abi.EV_LEVEL_DROPS,
                "off": abi.EV_LEVEL_OFF}
PAGE = 4096


class FlowLogInclude(BaseModel):
    """Which flows a flow log keeps (like ACNS container network logs): a flow is written if
    it matches every non-empty field (values of one field OR'ed). No include rules: every flow."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: list[str] = Field(default_factory=list)
    pod: list[str] = Field(default_factory=list)  # [namespace/]pod prefix, source or destination
    verdict: list[str] = Field(default_factory=list)
    protocol: list[str] = Field(default_factory=list)


class FlowLogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    max_bytes: int = Field(default=10 * 1024 * 1024, ge=4096)  # rotate when the file would pass this
    max_files: int = Field(default=5, ge=1, le=100)  # rotated files kept: path.1 .. path.N
    # A flow is logged when any rule matches it (rules OR'ed); none: every flow.
    include: list[FlowLogInclude] = Field(default_factory=list)


class FlowSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ring_capacity: int = Field(default=DEFAULT_CAPACITY, ge=1, le=1 << 20)  # flows kept per node
    # Which packets the datapath reports: every one, or (medium) drops plus connection opens,
    # first replies and new SYN/FIN/RST (the rate stays bounded under load), or drops, or none.
    event_level: Literal["all", "medium", "drops", "off"] = "medium"
    events_ring_bytes: int | None = None  # the kernel event ring; None: the datapath default (8 MiB)
    log: FlowLogSettings | None = None

    @field_validator("events_ring_bytes")
    @classmethod
    def _ring_size(cls, value: int | None) -> int | None:
        if value is not None and (value < PAGE or value & (value - 1)):
            raise ValueError(f"events_ring_bytes {value} must be a power of two of at least {PAGE}")
        return value

    @property
    def level(self) -> int:
        return EVENT_LEVELS[self.event_level]
