"""The study file: TOML → a frozen, validated `StudySpec`.

Every problem in a file is reported at once, each as `FILE: FIELD: what is wrong; what to do`.
In `[space]` a scalar fixes a value, a list is a choice and a table `{low, high, log}` is a range.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from selector import metrics
from selector.errors import SpecError

SKLEARN_SETS = ("iris", "wine", "breast_cancer", "digits", "diabetes")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "tanh", "sigmoid")
OPTIMIZERS = ("sgd", "momentum", "adagrad", "rmsprop", "adadelta", "adam", "adamw")
SHAPES = ("constant", "funnel")
LR_SCHEDULES = ("constant", "cosine", "step")

# Keys of the spec hash that may change between runs of one study: where it is stored, and how many
# trials it gets in total (raising n_trials extends a finished study).
UNHASHED_KEYS = ("storage", "n_trials")


@dataclass(frozen=True)
class Param:
    """One search-space entry: a fixed value, a choice among values, or an int/float range."""

    kind: Literal["fixed", "choice", "int", "float"]
    value: Any = None
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False


@dataclass(frozen=True)
class _Rule:
    type: Literal["int", "float", "str", "bool"]
    default: Any
    allowed: tuple[str, ...] = ()
    low: float | None = None  # inclusive bounds on any value or range end
    high: float | None = None
    high_open: bool = False  # the high bound itself is not allowed
    low_open: bool = False


SPACE_RULES: dict[str, _Rule] = {
    "depth": _Rule("int", 2, low=1, high=32),
    "width": _Rule("int", 128, low=1, high=65536),
    "shape": _Rule("str", "constant", SHAPES),
    "activation": _Rule("str", "relu", ACTIVATIONS),
    "dropout": _Rule("float", 0.0, low=0.0, high=1.0, high_open=True),
    "weight_decay": _Rule("float", 0.0, low=0.0),
    "batch_size": _Rule("int", 128, low=1),
    "optimizer": _Rule("str", "adam", OPTIMIZERS),
    "lr": _Rule("float", 1e-3, low=0.0, low_open=True),
    "momentum": _Rule("float", 0.9, low=0.0, high=1.0, high_open=True),
    "nesterov": _Rule("bool", False),
    "beta1": _Rule("float", 0.9, low=0.0, high=1.0, high_open=True),
    "beta2": _Rule("float", 0.999, low=0.0, high=1.0, high_open=True),
    "rho": _Rule("float", 0.9, low=0.0, high=1.0, high_open=True),
    "batch_norm": _Rule("bool", False),
    "residual": _Rule("bool", False),
    "grad_clip": _Rule("float", 0.0, low=0.0),
    "lr_schedule": _Rule("str", "constant", LR_SCHEDULES),
}


def _type_ok(rule: _Rule, v: Any) -> bool:
    if rule.type == "bool":
        return isinstance(v, bool)
    if isinstance(v, bool):
        return False
    if rule.type == "int":
        return isinstance(v, int)
    if rule.type == "float":
        return isinstance(v, int | float)
    return isinstance(v, str)


def _check_value(rule: _Rule, v: Any) -> None:
    if not _type_ok(rule, v):
        raise ValueError(f"expected {rule.type}, got {v!r}")
    if rule.allowed and v not in rule.allowed:
        hint = difflib.get_close_matches(str(v), rule.allowed, n=1)
        did = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ValueError(f"unknown value {v!r}{did}; expected one of {', '.join(rule.allowed)}")
    if rule.type in ("int", "float"):
        _check_bounds(rule, _finite(v), repr(v))


def _finite(v: float) -> float:
    """`v` as a float; NaN, infinity and integers too large for a float are refused."""
    try:
        x = float(v)
    except OverflowError:
        raise ValueError("the number is too large") from None
    if not math.isfinite(x):
        raise ValueError(f"{v!r} is not a finite number")
    return x


def _check_bounds(rule: _Rule, x: float, shown: str) -> None:
    if rule.low is not None and (x < rule.low or (rule.low_open and x == rule.low)):
        op = ">" if rule.low_open else ">="
        raise ValueError(f"{shown} is out of range; must be {op} {rule.low:g}")
    if rule.high is not None and (x > rule.high or (rule.high_open and x == rule.high)):
        op = "<" if rule.high_open else "<="
        raise ValueError(f"{shown} is out of range; must be {op} {rule.high:g}")


def _range(rule: _Rule, table: dict[str, Any]) -> Param:
    if rule.type not in ("int", "float"):
        raise ValueError("a range needs a numeric parameter; give a list of choices instead")
    unknown = sorted(set(table) - {"low", "high", "log"})
    if unknown:
        raise ValueError(f"unknown range key {unknown[0]!r}; a range is {{low, high, log}}")
    if "low" not in table or "high" not in table:
        raise ValueError("a range needs both 'low' and 'high'")
    low, high, log = table["low"], table["high"], table.get("log", False)
    for v in (low, high):
        _check_value(rule, v)
    if not isinstance(log, bool):
        raise ValueError(f"'log' must be true or false, got {log!r}")
    if low > high:
        raise ValueError(f"low ({low}) is greater than high ({high})")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0, got {low}")
    return Param("int" if rule.type == "int" else "float", low=low, high=high, log=log)


def _param_validator(key: str) -> PlainValidator:
    rule = SPACE_RULES[key]

    def validate(raw: Any) -> Param:
        if isinstance(raw, Param):
            return raw
        if isinstance(raw, dict):
            return _range(rule, raw)
        if isinstance(raw, list):
            if not raw:
                raise ValueError("an empty list of choices; give at least one value")
            for v in raw:
                _check_value(rule, v)
            if len(set(map(repr, raw))) != len(raw):
                raise ValueError(f"repeated value in {raw!r}")
            return Param("choice", choices=tuple(raw)) if len(raw) > 1 else Param("fixed", raw[0])
        _check_value(rule, raw)
        return Param("fixed", float(raw) if rule.type == "float" else raw)

    return PlainValidator(validate)


def _space_field(key: str) -> Any:
    return Field(default=Param("fixed", SPACE_RULES[key].default))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataSpec(_Strict):
    source: str | None = None
    path: str | None = None
    target: str | None = None
    drop: list[str] = Field(default_factory=list)
    groups: str | None = None
    task: Literal["classification", "regression"] | None = None
    # 0: no test set (the estimators' studies, scored by their caller); `final` refuses such a study
    test_size: float = Field(default=0.2, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.source is None) == (self.path is None):
            raise ValueError("give exactly one of 'source' (e.g. \"sklearn:digits\") or 'path'")
        if self.source is not None:
            name = self.source.removeprefix("sklearn:")
            if not self.source.startswith("sklearn:") or name not in SKLEARN_SETS:
                raise ValueError(
                    f"source {self.source!r} is not known; use one of "
                    + ", ".join(f"sklearn:{s}" for s in SKLEARN_SETS)
                    + ", or 'path' for a CSV/Parquet file"
                )
        if self.path is not None and not self.target:
            raise ValueError("a 'path' needs 'target', the name of the column to predict")
        return self

    def file(self, base_dir: str) -> Path | None:
        """The data file's absolute, normalised path (no `studies/../data`): a relative `path` is
        relative to the study file's directory, `base_dir`. None for a bundled set."""
        return None if self.path is None else (Path(base_dir) / self.path).resolve()


class CVSpec(_Strict):
    folds: int = Field(default=5, ge=2, le=100)
    repeats: int = Field(default=1, ge=1, le=100)


class TrainingSpec(_Strict):
    max_epochs: int = Field(default=60, ge=1, le=100_000)
    patience: int = Field(default=8, ge=1)
    device: Literal["cpu", "cuda", "auto"] = "auto"


MAX_FUSE = 64


def fuse_setting(value: int | str | None, name: str) -> int | str | None:
    """A fuse given outside a study file (`--fuse`, the API's `fuse=`) checked as `[search] fuse`
    is: None (the study's), 'auto', or a whole number from 1 to `MAX_FUSE` (a string of digits
    from the command line)."""
    if value is None or value == "auto":
        return value
    number = int(value) if isinstance(value, str) and value.isdigit() else value
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_FUSE:
        raise SpecError(f"{name} {value}: give a whole number from 1 to {MAX_FUSE}, or auto")
    return number


class SearchSpec(_Strict):
    sampler: Literal["tpe", "random", "gp", "cmaes"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    max_failures: int = Field(default=10, ge=1)
    # Trials trained together as one fused model (`selector.fused`): 1 trains one at a time,
    # "auto" picks the group size from a memory estimate and a measured cost model.
    fuse: Annotated[int, Field(ge=1, le=MAX_FUSE)] | Literal["auto"] = "auto"


class SpaceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    depth: Annotated[Param, _param_validator("depth")] = _space_field("depth")
    width: Annotated[Param, _param_validator("width")] = _space_field("width")
    shape: Annotated[Param, _param_validator("shape")] = _space_field("shape")
    activation: Annotated[Param, _param_validator("activation")] = _space_field("activation")
    dropout: Annotated[Param, _param_validator("dropout")] = _space_field("dropout")
    weight_decay: Annotated[Param, _param_validator("weight_decay")] = _space_field("weight_decay")
    batch_size: Annotated[Param, _param_validator("batch_size")] = _space_field("batch_size")
    optimizer: Annotated[Param, _param_validator("optimizer")] = _space_field("optimizer")
    lr: Annotated[Param, _param_validator("lr")] = _space_field("lr")
    momentum: Annotated[Param, _param_validator("momentum")] = _space_field("momentum")
    nesterov: Annotated[Param, _param_validator("nesterov")] = _space_field("nesterov")
    beta1: Annotated[Param, _param_validator("beta1")] = _space_field("beta1")
    beta2: Annotated[Param, _param_validator("beta2")] = _space_field("beta2")
    rho: Annotated[Param, _param_validator("rho")] = _space_field("rho")
    batch_norm: Annotated[Param, _param_validator("batch_norm")] = _space_field("batch_norm")
    residual: Annotated[Param, _param_validator("residual")] = _space_field("residual")
    grad_clip: Annotated[Param, _param_validator("grad_clip")] = _space_field("grad_clip")
    lr_schedule: Annotated[Param, _param_validator("lr_schedule")] = _space_field("lr_schedule")

    @model_validator(mode="after")
    def _batch_norm_needs_two_rows(self) -> SpaceSpec:
        """Batch norm cannot train on a batch of one row: every such trial would fail."""
        if _can_be(self.batch_size, 1) and _can_be(self.batch_norm, True):
            raise ValueError(
                "batch_size can be 1 while batch_norm can be true, and batch norm cannot train "
                "on a batch of one row; make batch_size at least 2 or batch_norm false"
            )
        return self


def _can_be(p: Param, value: Any) -> bool:
    """Whether the searched parameter `p` can take `value`."""
    if p.kind == "fixed":
        return bool(p.value == value and type(p.value) is type(value))
    if p.kind == "choice":
        return any(c == value and type(c) is type(value) for c in p.choices)
    return bool(p.low <= value <= p.high)


def check_space_value(key: str, value: Any) -> None:
    """Raise ValueError unless `value` is a valid value of the search-space parameter `key`
    (a saved model's config is checked with the rules a study file is)."""
    rule = SPACE_RULES.get(key)
    if rule is None:
        raise ValueError(f"unknown parameter {key!r}")
    _check_value(rule, value)


# A study's name: it names the artifacts' folder, so nothing that reads as a path.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"
# How a refusal by each pattern reads (a regular expression is not a message).
_PATTERN_TEXT = {
    NAME_PATTERN: "use letters, digits, '_', '.' and '-', a letter or digit first, at most 100 "
    "characters",
}


class StudySpec(_Strict):
    """A validated study file. `base_dir` resolves relative data paths; `raw` is the file's table."""

    name: str = Field(pattern=NAME_PATTERN)
    metric: str
    direction: Literal["maximize", "minimize"] | None = None
    n_trials: int = Field(default=50, ge=1, le=1_000_000)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    storage: str | None = None
    data: DataSpec
    cv: CVSpec = CVSpec()
    training: TrainingSpec = TrainingSpec()
    search: SearchSpec = SearchSpec()
    space: SpaceSpec = Field(default_factory=SpaceSpec)  # type: ignore[arg-type]
    base_dir: str = "."
    raw: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @field_validator("metric")
    @classmethod
    def _metric_known(cls, v: str) -> str:
        if v not in metrics.METRICS:
            hint = difflib.get_close_matches(v, list(metrics.METRICS), n=1)
            did = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ValueError(
                f"metric {v!r} is not supported{did}; use one of " + ", ".join(metrics.METRICS)
            )
        return v

    @field_validator("storage")
    @classmethod
    def _storage_given(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("is empty; give a database URL (sqlite:///path.db) or remove the key")
        return v

    @field_validator("direction")
    @classmethod
    def _direction_max(cls, v: str | None) -> str | None:
        if v == "minimize":
            raise ValueError(
                "'minimize' contradicts the metric: scores are greater-is-better "
                "(use e.g. neg_log_loss); remove 'direction'"
            )
        return v

    @property
    def study_direction(self) -> Literal["maximize", "minimize"]:
        return "maximize"

    def spec_hash(self) -> str:
        """A hash of everything that defines the study's trials (not where it lives, not its budget)."""
        return hashlib.sha256(canonical_json(hashed_part(self.raw)).encode()).hexdigest()[:16]


def hashed_part(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k not in UNHASHED_KEYS}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


_PREFIX = re.compile(r"^(Value error|Assertion failed), ")


def _field_hint(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """'did you mean' for an unknown key, looked up among the fields of the model that holds it."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return ""
        model = ann
    hint = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean '{hint[0]}'?)" if hint and hint[0] != "raw" else ""


def _shown(part: Any) -> str:
    """A key as written, quoted when it is empty or holds a line break or other control character."""
    text = str(part)
    return text if text.isprintable() and text else repr(text)


def _problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(_shown(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            out.append(f"{where}: unknown key{_field_hint(StudySpec, loc)}")
        elif e["type"] == "missing":
            out.append(f"{where}: missing; this field is required")
        else:
            msg = _PREFIX.sub("", e["msg"])
            if e["type"] == "string_pattern_mismatch":
                msg = _PATTERN_TEXT.get(str(e.get("ctx", {}).get("pattern")), msg)
            got = repr(e.get("input"))
            got = got if len(got) <= 60 else got[:57] + "..."
            out.append(f"{where}: {msg}" + ("" if e["type"] == "value_error" else f" (got {got})"))
    return out


def parse(raw: dict[str, Any], *, origin: str, base_dir: str = ".") -> StudySpec:
    """Validate a study table; `origin` names the file in every message."""
    if not isinstance(raw, dict):
        raise SpecError(f"{origin}: expected a table of settings")
    for reserved in ("base_dir", "raw"):
        if reserved in raw:
            raise SpecError(f"{origin}: {reserved}: unknown key")
    try:
        return StudySpec.model_validate({**raw, "base_dir": base_dir, "raw": raw})
    except ValidationError as e:
        problems = _problems(e)
        raise SpecError("\n".join(f"{origin}: {p}" for p in problems)) from None


def load(path: str | Path) -> StudySpec:
    """Read and validate a study file."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        if stat.S_ISDIR(mode):
            raise SpecError(f"{p}: is a directory; give a study file (.toml)")
        if not stat.S_ISREG(mode):  # a FIFO would block for ever, a device never end
            raise SpecError(f"{p}: not a regular file (a pipe or device); give a study file")
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SpecError(f"{p}: no such study file") from None
    except IsADirectoryError:
        raise SpecError(f"{p}: is a directory; give a study file (.toml)") from None
    except UnicodeDecodeError:
        raise SpecError(f"{p}: not a text file; a study file is TOML") from None
    except OSError as e:
        raise SpecError(f"{p}: cannot read: {e.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except RecursionError:
        raise SpecError(f"{p}: not valid TOML: arrays or tables nested too deeply") from None
    except ValueError as e:  # TOMLDecodeError, or an integer too long to convert
        raise SpecError(f"{p}: not valid TOML: {str(e).splitlines()[0]}") from None
    return parse(raw, origin=str(p), base_dir=str(p.resolve().parent))


def from_record(raw: dict[str, Any], base_dir: str, *, origin: str) -> StudySpec:
    """Rebuild the spec recorded in the database (used by workers and read-only commands)."""
    return parse(raw, origin=origin, base_dir=base_dir)
