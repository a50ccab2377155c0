"""The search space: which engine knobs a study varies, their bounds, and what is pinned.

Knob names are EngineConfig's (vLLM's), so a sampled configuration becomes `kvpilot serve` flags or an
InferenceService's `engine` block without translation. On a GPU the memory knob is
`gpu_memory_utilization`; on CPU that knob does nothing (the KV pool is sized by blocks), so the CPU
space tunes `num_kv_blocks` instead and says so. Precision (`quantization`, `kv_cache_dtype`) changes what the
model computes, so it is searched only when the user allows it (`allow_quantization`): category knobs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

Value = float | int | str | None  # a category knob's values are EngineConfig's own (None: unset)


class Knob(BaseModel):
    """One tunable engine setting: a float or int range (log scale optional), a fixed value, a numeric choice,
    or a category of EngineConfig values (first: the default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="an EngineConfig field: the knob reaches the engine as that field's flag")
    kind: Literal["float", "int", "choice", "category"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[int, ...] | None = None
    categories: tuple[str | None, ...] | None = None
    fixed: float | None = Field(default=None, description="pinned: the study does not search it")

    @field_validator("name")
    @classmethod
    def _engine_field(cls, name: str) -> str:
        from kvpilot.engine.config import EngineConfig

        if name not in EngineConfig.model_fields:
            raise ValueError(f"{name!r} is not an EngineConfig field, so no engine would read it")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> Knob:
        if self.kind == "category":
            return self._valid_categories()
        if self.fixed is not None:
            return self
        if self.kind == "choice":
            if not self.choices:
                raise ValueError(f"{self.name}: a choice knob needs at least one choice")
            return self
        if self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"{self.name}: bounds must satisfy low <= high (got {self.low}, {self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"{self.name}: a log-scale knob needs low > 0 (got {self.low})")
        return self

    def _valid_categories(self) -> Knob:
        from kvpilot.engine.config import EngineConfig

        if not self.categories:
            raise ValueError(f"{self.name}: a category knob needs at least one value")
        field = TypeAdapter(EngineConfig.model_fields[self.name].annotation)
        for c in self.categories:
            try:
                field.validate_python(c, strict=True)
            except ValueError as exc:
                raise ValueError(f"{self.name}: {c!r} is not a value EngineConfig accepts") from exc
        return self

    @property
    def searched(self) -> bool:
        if self.kind == "category":
            return len(self.categories or ()) > 1
        return self.fixed is None and not (self.kind == "choice" and len(self.choices or ()) == 1) and not (
            self.kind != "choice" and self.low == self.high
        )

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high) of a searched range knob; 0 is a valid bound (grid indices start there)."""
        if self.low is None or self.high is None:
            raise ValueError(f"{self.name}: a {self.kind} knob without bounds")
        return self.low, self.high

    def value(self, raw: Value) -> Value:
        if self.kind == "category":
            return raw
        assert isinstance(raw, int | float), f"{self.name}: {raw!r} is not a number"
        return round(raw) if self.kind in ("int", "choice") else float(raw)

    def pinned_value(self) -> Value:
        """The only value of a knob that is not searched."""
        if self.kind == "category":
            return (self.categories or (None,))[0]
        if self.fixed is not None:
            return self.value(self.fixed)
        if self.kind == "choice":
            return (self.choices or (0,))[0]
        return self.value(self.low or 0.0)

    def contains(self, value: Value) -> bool:
        if self.kind == "category":
            return value in (self.categories or ())
        if not isinstance(value, int | float):
            return False
        if not self.searched:
            return value == self.pinned_value()
        if self.kind == "choice":
            return value in (self.choices or ())
        return float(self.low or 0.0) <= value <= float(self.high or 0.0)

    def unit(self, value: Value) -> float:
        """Position of `value` in [0, 1] along the knob's own scale: distances for the neighbourhood penalty
        (two categories are 1 apart: one precision is never 'near' the other)."""
        if self.kind == "category":
            categories = self.categories or ()
            return categories.index(value) / max(1, len(categories) - 1)
        assert isinstance(value, int | float)
        if self.kind == "choice":
            choices = sorted(self.choices or ())
            lo, hi = math.log(choices[0]), math.log(choices[-1])
            return 0.0 if hi == lo else (math.log(value) - lo) / (hi - lo)
        lo, hi = float(self.low or 0.0), float(self.high or 0.0)
        if hi == lo:
            return 0.0
        if self.log:
            return (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return (value - lo) / (hi - lo)


class Bounds(BaseModel):
    """An override from `spec.tuning.searchSpace` (or the CLI): narrower bounds, or a pinned value."""

    model_config = ConfigDict(extra="forbid")

    min: float | None = None
    max: float | None = None
    fixed: float | None = None


class Suggester(Protocol):
    """What Optuna's Trial offers; a protocol so the space can be tested without a study."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...
    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Literal["gpu", "cpu"]
    knobs: tuple[Knob, ...]
    note: str = Field(default="", description="shown to the user: what the memory knob means here")

    def knob(self, name: str) -> Knob:
        for k in self.knobs:
            if k.name == name:
                return k
        raise KeyError(f"no knob {name!r} in the search space (have {[k.name for k in self.knobs]})")

    def suggest(self, trial: Suggester) -> dict[str, Value]:
        """Sample one configuration: searched knobs through the trial, pinned ones as they are."""
        params: dict[str, Value] = {}
        for k in self.knobs:
            if not k.searched:
                params[k.name] = k.pinned_value()
            elif k.kind == "category":
                params[k.name] = trial.suggest_categorical(k.name, list(k.categories or ()))
            elif k.kind == "choice":
                params[k.name] = int(trial.suggest_categorical(k.name, list(k.choices or ())))
            elif k.kind == "int":
                params[k.name] = trial.suggest_int(k.name, int(k.bounds[0]), int(k.bounds[1]), log=k.log)
            else:
                params[k.name] = trial.suggest_float(k.name, *k.bounds, log=k.log)
        return params

    def canonical(self, params: Mapping[str, Value]) -> dict[str, Value]:
        """Rounded so equal configurations compare equal (floats to 3 decimals, ints as ints)."""
        out: dict[str, Value] = {}
        for k in self.knobs:
            if k.name not in params:
                raise ValueError(f"configuration lacks {k.name!r}: {dict(params)}")
            v = k.value(params[k.name])
            out[k.name] = round(v, 3) if isinstance(v, float) else v
        return out

    def distance(self, a: Mapping[str, Value], b: Mapping[str, Value]) -> float:
        """Largest per-knob gap in unit coordinates (Chebyshev): 'near' means near in every knob."""
        gaps = [abs(k.unit(a[k.name]) - k.unit(b[k.name])) for k in self.knobs if k.searched]
        return max(gaps, default=0.0)

    def with_overrides(self, overrides: Mapping[str, Bounds | Mapping[str, Any] | None]) -> SearchSpace:
        """Apply `spec.tuning.searchSpace`-style bounds; an unknown knob name is an error, not a no-op."""
        names = {k.name for k in self.knobs}
        knobs = list(self.knobs)
        for name, raw in overrides.items():
            if raw is None:
                continue
            if name not in names:
                raise ValueError(f"cannot override {name!r}: the {self.target} search space has {sorted(names)}")
            b = raw if isinstance(raw, Bounds) else Bounds.model_validate(raw)
            i = next(i for i, k in enumerate(knobs) if k.name == name)
            k = knobs[i]
            if k.kind == "category":
                raise ValueError(f"{name}: a precision knob has no bounds to override (it is searched only "
                                 "when quantization is allowed; pin it in the engine spec instead)")
            if k.kind == "choice":
                allowed = tuple(c for c in (k.choices or ()) if (b.min is None or c >= b.min)
                                and (b.max is None or c <= b.max))
                if b.fixed is not None and b.fixed not in (k.choices or ()):
                    raise ValueError(f"{name}: fixed value {b.fixed} is not among {k.choices}")
                if not allowed and b.fixed is None:
                    raise ValueError(f"{name}: no choice of {k.choices} lies in [{b.min}, {b.max}]")
                knobs[i] = k.model_copy(update={"choices": allowed or k.choices, "fixed": b.fixed})
            else:
                knobs[i] = Knob(name=k.name, kind=k.kind, log=k.log, fixed=b.fixed,
                                low=k.low if b.min is None else b.min, high=k.high if b.max is None else b.max)
        return self.model_copy(update={"knobs": tuple(knobs)})


def divisors(n: int) -> tuple[int, ...]:
    if n < 1:
        raise ValueError(f"GPU count must be at least 1 (got {n})")
    return tuple(d for d in range(1, n + 1) if n % d == 0)


def precision_knobs() -> tuple[Knob, ...]:
    """FP8 weights and the FP8 KV cache (issue 14), each against the engine's default (first)."""
    return (
        Knob(name="quantization", kind="category", categories=(None, "fp8")),
        Knob(name="kv_cache_dtype", kind="category", categories=("auto", "fp8")),
    )


def gpu_space(gpus: int = 1, allow_quantization: bool = False) -> SearchSpace:
    """Issue 6's defaults for a GPU deployment; precision too when the user allows it."""
    return SearchSpace(
        target="gpu",
        knobs=(
            Knob(name="gpu_memory_utilization", kind="float", low=0.70, high=0.95),
            Knob(name="max_num_seqs", kind="int", low=8, high=1024, log=True),
            Knob(name="max_num_batched_tokens", kind="int", low=256, high=32768, log=True),
            Knob(name="tensor_parallel_size", kind="choice", choices=divisors(gpus)),
            *(precision_knobs() if allow_quantization else ()),
        ),
        note="memory knob: gpu_memory_utilization (share of GPU memory; the KV pool takes what is left)",
    )


def cpu_space(max_model_len: int, allow_quantization: bool = False) -> SearchSpace:
    """For the CPU engine, where gpu_memory_utilization has no effect: the KV pool is tuned in blocks.

    The lower bound of `num_kv_blocks` lets the study find out for itself that a pool smaller than one
    sequence is infeasible; the upper one is a modest memory budget for the demo model.
    """
    return SearchSpace(
        target="cpu",
        knobs=(
            Knob(name="num_kv_blocks", kind="int", low=2, high=512, log=True),
            Knob(name="max_num_seqs", kind="int", low=1, high=64, log=True),
            Knob(name="max_num_batched_tokens", kind="int", low=max(16, max_model_len // 8), high=4096, log=True),
            Knob(name="tensor_parallel_size", kind="choice", choices=(1,)),
            *(precision_knobs() if allow_quantization else ()),
        ),
        note="CPU: gpu_memory_utilization has no effect here, so the memory knob is num_kv_blocks "
        "(KV pool size in blocks of 16 tokens)",
    )


def engine_flags(params: Mapping[str, Value]) -> list[str]:
    """`kvpilot serve` flags for a configuration, spelled as EngineConfig's flags (`--max-num-seqs=64`)."""
    from kvpilot.engine.flags import to_flags

    return to_flags(params)
