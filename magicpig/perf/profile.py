"""The cost model's view of a device, its host and its CPU store (:class:`DeviceProfile`), the
profile JSON schema (:func:`profile_schema`), loading and saving, and the profiles shipped in
``magicpig/perf/profiles/`` (:func:`load_profile` by bare name). Pure Python: no torch, no
numpy. The saturation curve of a share of the device (:class:`Saturation`) and the store's cost
(:class:`StoreProfile`) are parts of a profile; :mod:`magicpig.perf.fit` fits them."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

from magicpig.config import check_float, check_int
from magicpig.perf.shape import ModelShape

KINDS = ("gpu", "cpu")
SCHEMA_VERSION = 1
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


# ------------------------------------------------------------------------------ saturation
@dataclass(frozen=True)
class Saturation:
    """Relative throughput of a share x of the device: s(1) = 1, non-decreasing.

    s(x) = (1 - exp(-(x/x0)^p)) / (1 - exp(-(1/x0)^p)): close to linear below the saturation
    share x0 and flat well above it; p (``shape``) sharpens the knee. ``x0=None`` is linear
    (s(x) = x: no saturation).
    """

    x0: Optional[float] = None
    shape: float = 1.0

    def __post_init__(self) -> None:
        if self.x0 is not None:
            object.__setattr__(self, "x0", check_float("Saturation.x0", self.x0, 1e-4, 1e4))
        object.__setattr__(self, "shape", check_float("Saturation.shape", self.shape, 0.1, 10.0))

    def __call__(self, share: float) -> float:
        x = check_float("share", share, 0.0, 1.0, low_open=True)
        if self.x0 is None:
            return x
        # expm1 keeps the ratio exact when x0 is large (the curve then tends to s(x) = x).
        return math.expm1(-((x / self.x0) ** self.shape)) / math.expm1(-((1.0 / self.x0) ** self.shape))

    def to_dict(self) -> dict:
        return {"x0": self.x0, "shape": self.shape}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "Saturation":
        return cls(d.get("x0"), d.get("shape", 1.0))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ CPU store
@dataclass(frozen=True)
class StoreProfile:
    """Cost of the CPU store (csrc/store.cpp) at ``threads`` threads, in seconds.

    call_s: fixed cost of one attend call (one sparse layer, one micro-batch). row_s: per K/V
    row read (one middle key of one KV head in one layer: the store's "candidate rows read").
    entry_s: per bucket-list entry walked ("bucket-list entries walked"). append_s: per token
    per KV head per layer appended in prefill (copy, norms, bucket lists).
    """

    call_s: float
    row_s: float
    entry_s: float = 0.0
    append_s: float = 0.0
    threads: int = 1

    def __post_init__(self) -> None:
        for f in ("call_s", "row_s", "entry_s", "append_s"):
            object.__setattr__(self, f, check_float(f"StoreProfile.{f}", getattr(self, f), 0.0, 10.0))
        object.__setattr__(self, "threads", check_int("StoreProfile.threads", self.threads, 1))

    def attend_time(self, rows: float, entries: float = 0.0, calls: int = 1) -> float:
        """Seconds for ``calls`` attend calls reading ``rows`` rows and walking ``entries``
        bucket entries in all."""
        return calls * self.call_s + rows * self.row_s + entries * self.entry_s

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------ profiles
@dataclass(frozen=True)
class DeviceProfile:
    """A device, its host and its CPU store, as the cost model sees them.

    kind: "gpu" (a separate device: store attends overlap device work) or "cpu" (the device is
    the host: nothing overlaps). peak_flops (FLOP/s) and memory_bandwidth (bytes/s) are the
    specification; the efficiencies are the achievable fractions. compute_units: SMs or cores;
    granularity: the smallest step of a lane's units (8 SMs on Hopper, 1 core).
    step_overhead_s: fixed seconds per lane step. sequence_overhead_s: seconds per sequence per
    decode step (added to the step, not scaled by the share; 0 when the JSON lacks it).
    attention_efficiency: the attention kernel's FLOP rate relative to the matmuls' (a prefill's
    attention FLOPs cost ``flops / attention_efficiency`` at the matmul rate; fitted on a CPU,
    where the flash kernel and the GEMMs differ; 1 when the JSON lacks it).
    multi_row_efficiency: the fraction of the bandwidth a decode step of two or more sequences
    reads the weights at, relative to one sequence's (a CPU's multi-row GEMM streams the weights
    far less efficiently than its single-row GEMV: measured here, 2 rows cost as much as 4;
    1 on a GPU and when the JSON lacks it).
    link_bandwidth (bytes/s, 0 when kind is
    "cpu") and link_latency_s (seconds per transfer): host<->device copies. model: the model
    the profile was fitted for, if any; fit: how it was fitted (informational); notes: the
    assumptions, in words.
    """

    name: str
    kind: str
    peak_flops: float
    compute_efficiency: float
    memory_bandwidth: float
    memory_efficiency: float
    compute_units: int
    granularity: int
    step_overhead_s: float
    compute_saturation: Saturation
    memory_saturation: Saturation
    store: StoreProfile
    host_cores: int
    host_memory_bandwidth: float
    link_bandwidth: float = 0.0
    link_latency_s: float = 0.0
    model: Optional[ModelShape] = None
    fit: dict = field(default_factory=dict, hash=False)
    notes: tuple[str, ...] = ()
    sequence_overhead_s: float = 0.0
    attention_efficiency: float = 1.0
    multi_row_efficiency: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"DeviceProfile.kind={self.kind!r}: expected one of {KINDS}")
        pos = {"peak_flops": math.inf, "memory_bandwidth": math.inf, "host_memory_bandwidth": math.inf,
               "compute_efficiency": 1.0, "memory_efficiency": 1.0, "attention_efficiency": 100.0,
               "multi_row_efficiency": 1.0}
        for f, high in pos.items():
            object.__setattr__(self, f, check_float(f"DeviceProfile.{f}", getattr(self, f), 0.0, high, low_open=True))
        for f in ("step_overhead_s", "sequence_overhead_s", "link_bandwidth", "link_latency_s"):
            object.__setattr__(self, f, check_float(f"DeviceProfile.{f}", getattr(self, f), 0.0, math.inf))
        units = check_int("DeviceProfile.compute_units", self.compute_units, 1)
        object.__setattr__(self, "compute_units", units)
        object.__setattr__(self, "granularity", check_int("DeviceProfile.granularity", self.granularity, 1, units))
        object.__setattr__(self, "host_cores", check_int("DeviceProfile.host_cores", self.host_cores, 1))
        if self.kind == "gpu" and self.link_bandwidth <= 0:
            raise ValueError(
                f"DeviceProfile.link_bandwidth={self.link_bandwidth!r}: a gpu profile needs a positive link bandwidth"
            )
        object.__setattr__(self, "notes", tuple(str(n) for n in self.notes))

    @property
    def flops(self) -> float:
        """Achievable FLOP/s of the whole device."""
        return self.peak_flops * self.compute_efficiency

    @property
    def bandwidth(self) -> float:
        """Achievable bytes/s of the whole device."""
        return self.memory_bandwidth * self.memory_efficiency

    def unit_grid(self) -> list[int]:
        """The unit counts a lane can get, ascending: multiples of the granularity, and all."""
        grid = list(range(self.granularity, self.compute_units + 1, self.granularity))
        return grid if grid[-1] == self.compute_units else grid + [self.compute_units]

    def share_of(self, units: int) -> float:
        """The share of ``units`` compute units (e.g. the SM count a green context granted)."""
        return check_int("units", units, 1, self.compute_units) / self.compute_units

    def to_dict(self) -> dict:
        """The JSON document (schema in :func:`profile_schema`)."""
        return {
            "schema": SCHEMA_VERSION, "name": self.name, "kind": self.kind,
            "device": {
                "peak_flops": self.peak_flops, "compute_efficiency": self.compute_efficiency,
                "memory_bandwidth": self.memory_bandwidth, "memory_efficiency": self.memory_efficiency,
                "compute_units": self.compute_units, "granularity": self.granularity,
                "step_overhead_s": self.step_overhead_s, "sequence_overhead_s": self.sequence_overhead_s,
                "attention_efficiency": self.attention_efficiency,
                "multi_row_efficiency": self.multi_row_efficiency,
                "compute_saturation": self.compute_saturation.to_dict(),
                "memory_saturation": self.memory_saturation.to_dict(),
            },
            "host": {
                "cores": self.host_cores, "memory_bandwidth": self.host_memory_bandwidth,
                "link_bandwidth": self.link_bandwidth, "link_latency_s": self.link_latency_s,
                "store": self.store.to_dict(),
            },
            "model": None if self.model is None else self.model.to_dict(),
            "fit": self.fit, "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "DeviceProfile":
        """The inverse of :meth:`to_dict`; ValueError naming what is missing or wrong."""
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA_VERSION:
            got = d.get("schema") if isinstance(d, Mapping) else d
            raise ValueError(f"profile schema={got!r}: expected a JSON object with schema {SCHEMA_VERSION}")
        try:
            return cls._from_checked(d)
        except (KeyError, AttributeError) as err:
            raise ValueError(f"profile {d.get('name')!r}: missing or malformed entry {err}") from None

    @classmethod
    def _from_checked(cls, d: Mapping[str, object]) -> "DeviceProfile":
        dev, host, model = d["device"], d["host"], d.get("model")
        if not isinstance(dev, Mapping) or not isinstance(host, Mapping):
            raise ValueError(f"profile {d.get('name')!r}: 'device' and 'host' must be JSON objects")
        return cls(
            name=d["name"], kind=d["kind"],  # type: ignore[arg-type]
            peak_flops=dev["peak_flops"], compute_efficiency=dev["compute_efficiency"],
            memory_bandwidth=dev["memory_bandwidth"], memory_efficiency=dev["memory_efficiency"],
            compute_units=dev["compute_units"], granularity=dev["granularity"],
            step_overhead_s=dev["step_overhead_s"], sequence_overhead_s=dev.get("sequence_overhead_s", 0.0),
            attention_efficiency=dev.get("attention_efficiency", 1.0),
            multi_row_efficiency=dev.get("multi_row_efficiency", 1.0),
            compute_saturation=Saturation.from_dict(dev["compute_saturation"]),
            memory_saturation=Saturation.from_dict(dev["memory_saturation"]),
            store=StoreProfile(**host["store"]), host_cores=host["cores"],
            host_memory_bandwidth=host["memory_bandwidth"], link_bandwidth=host["link_bandwidth"],
            link_latency_s=host["link_latency_s"],
            model=None if model is None else ModelShape.from_dict(model),  # type: ignore[arg-type]
            fit=dict(d.get("fit") or {}), notes=tuple(d.get("notes") or ()),  # type: ignore[arg-type]
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "DeviceProfile":
        return cls.from_dict(json.loads(text))

    def save(self, path: Union[str, Path]) -> None:
        """Write :meth:`to_json` to ``path`` (its folder is made if missing)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())


def profile_schema() -> str:
    """The profile JSON layout, for documentation (units in brackets)."""
    return """{
  "schema": 1, "name": str, "kind": "gpu" | "cpu",
  "device": {"peak_flops": [FLOP/s], "compute_efficiency": (0,1], "memory_bandwidth": [bytes/s],
             "memory_efficiency": (0,1], "compute_units": int, "granularity": int,
             "step_overhead_s": [s], "sequence_overhead_s": [s per sequence per decode step, default 0],
             "attention_efficiency": [attention FLOP rate / matmul FLOP rate, default 1],
             "multi_row_efficiency": (0,1] [weight-read bandwidth of a multi-sequence decode step, default 1],
             "compute_saturation": {"x0": share | null, "shape": p},
             "memory_saturation": {"x0": share | null, "shape": p}},
  "host": {"cores": int, "memory_bandwidth": [bytes/s], "link_bandwidth": [bytes/s, 0 = none],
           "link_latency_s": [s per transfer],
           "store": {"call_s": [s/call], "row_s": [s/row], "entry_s": [s/entry],
                     "append_s": [s/token/KV head/layer], "threads": int}},
  "model": null | ModelShape fields, "fit": {...informational...}, "notes": [str]
}"""


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped in ``magicpig/perf/profiles/``."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(path_or_name: Union[str, Path]) -> DeviceProfile:
    """A profile from a JSON file, or a shipped one by bare name (e.g. "h100_llama31_8b")."""
    text = str(path_or_name)
    is_name = isinstance(path_or_name, str) and "/" not in text and "\\" not in text and not text.endswith(".json")
    path = PROFILE_DIR / f"{text}.json" if is_name else Path(path_or_name)
    if not path.is_file():
        raise ValueError(f"path_or_name={text!r}: no such profile file (shipped: {shipped_profiles()})")
    return DeviceProfile.from_json(path.read_text())
