"""Price catalog and the cost formula, shared by trainers and the platform.

Cost = allocated resources x hourly rate x measured running time. Prices live in
`configs/costs.yaml`, never in code. Light on imports: YAML and dataclasses only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trainers.errors import Refused

DEFAULT_CATALOG = Path(__file__).resolve().parents[1] / "configs" / "costs.yaml"


class CatalogError(Refused):
    """The price catalog is missing, malformed or has an invalid price."""


@dataclass(frozen=True)
class GpuPrice:
    name: str
    on_demand_hour: float
    spot_hour: float | None = None


@dataclass(frozen=True)
class Allocation:
    """What a run holds while it runs: the whole gang of workers."""

    cpus: float
    gpus: float = 0.0
    memory_gib: float = 0.0
    gpu_type: str | None = None

    @classmethod
    def for_workers(cls, num_workers: int, cpus_per_worker: float, gpus_per_worker: float,
                    gpu_type: str | None = None) -> Allocation:
        return cls(cpus=num_workers * cpus_per_worker, gpus=num_workers * gpus_per_worker,
                   gpu_type=gpu_type)


@dataclass(frozen=True)
class CostBreakdown:
    cpu_usd: float
    gpu_usd: float
    memory_usd: float
    seconds: float

    @property
    def total_usd(self) -> float:
        return self.cpu_usd + self.gpu_usd + self.memory_usd

    def as_metrics(self) -> dict[str, float]:
        return {"cost_usd": self.total_usd, "cost_cpu_usd": self.cpu_usd,
                "cost_gpu_usd": self.gpu_usd, "cost_memory_usd": self.memory_usd}


@dataclass(frozen=True)
class PriceCatalog:
    cpu_core_hour: float
    gpus: dict[str, GpuPrice]
    default_gpu: str
    memory_gib_hour: float = 0.0
    source: str = "<in memory>"

    def gpu(self, name: str | None = None) -> GpuPrice:
        key = name or self.default_gpu
        try:
            return self.gpus[key]
        except KeyError:
            raise CatalogError(
                f"{self.source}: no price for GPU type {key!r}. Known types: "
                f"{', '.join(sorted(self.gpus))}. To fix: add it under `gpus:`."
            ) from None

    def hourly_usd(self, alloc: Allocation, *, spot: bool = False) -> float:
        return sum(self._parts(alloc, 3600.0, spot))

    def cost(self, alloc: Allocation, seconds: float, *, spot: bool = False) -> CostBreakdown:
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError(f"running time must be a finite number >= 0, got {seconds}")
        cpu, gpu, mem = self._parts(alloc, seconds, spot)
        return CostBreakdown(cpu_usd=cpu, gpu_usd=gpu, memory_usd=mem, seconds=seconds)

    def _parts(self, alloc: Allocation, seconds: float, spot: bool) -> tuple[float, float, float]:
        hours = seconds / 3600.0
        gpu_rate = 0.0
        if alloc.gpus:
            price = self.gpu(alloc.gpu_type)
            gpu_rate = price.spot_hour if spot and price.spot_hour is not None else price.on_demand_hour
        return (alloc.cpus * self.cpu_core_hour * hours,
                alloc.gpus * gpu_rate * hours,
                alloc.memory_gib * self.memory_gib_hour * hours)


def _price(raw: Any, where: str, source: str, *, required: bool = True) -> float | None:
    if raw is None and not required:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw < 0:
        raise CatalogError(
            f"{source}: `{where}` must be a price in USD per hour >= 0, got {raw!r}. "
            f"To fix: set `{where}` to a number such as 0.25."
        )
    return float(raw)


def parse_catalog(data: Any, source: str = "<in memory>") -> PriceCatalog:
    if not isinstance(data, dict):
        raise CatalogError(f"{source}: expected a mapping at the top level, got {type(data).__name__}.")
    gpus_raw = data.get("gpus") or {}
    if not isinstance(gpus_raw, dict):
        raise CatalogError(f"{source}: `gpus` must map GPU type names to prices.")
    gpus = {}
    for name, entry in gpus_raw.items():
        if not isinstance(entry, dict):
            raise CatalogError(f"{source}: `gpus.{name}` must be a mapping with `on_demand_hour`.")
        gpus[name] = GpuPrice(
            name=name,
            on_demand_hour=_price(entry.get("on_demand_hour"), f"gpus.{name}.on_demand_hour", source),
            spot_hour=_price(entry.get("spot_hour"), f"gpus.{name}.spot_hour", source, required=False),
        )
    default_gpu = data.get("default_gpu", "generic")
    catalog = PriceCatalog(
        cpu_core_hour=_price(data.get("cpu_core_hour"), "cpu_core_hour", source),
        memory_gib_hour=_price(data.get("memory_gib_hour", 0.0), "memory_gib_hour", source),
        gpus=gpus, default_gpu=default_gpu, source=source,
    )
    catalog.gpu(default_gpu)  # the default must itself be priced
    return catalog


def load_catalog(path: str | os.PathLike | None = None) -> PriceCatalog:
    """Load the catalog from `path`, `$OPPEN_COSTS_FILE`, or `configs/costs.yaml`."""
    path = Path(path or os.environ.get("OPPEN_COSTS_FILE") or DEFAULT_CATALOG)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CatalogError(f"cannot read the price catalog {path}: {exc.strerror}. "
                           "To fix: set OPPEN_COSTS_FILE to the catalog's path.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from None
    return parse_catalog(data, source=str(path))
