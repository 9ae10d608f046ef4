"""A sweep's search space: checked against the job's schema, turned into Ray Tune domains, and applied
to the job config of each trial."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ValidationError

from rayft.training.config import set_dotted
from rayft.tuning.config import distribution_problems

# Sections a trial may not vary: where runs are stored, the sweep itself, how the result is served/evaluated.
FIXED = ("run.name", "run.storage_path", "sweep", "serve", "eval")


def space_problems(job) -> list[str]:
    """Every problem with job.sweep.space: unknown paths, and values the job's schema would refuse."""
    problems = []
    raw = job.model_dump(mode="json")
    for path, spec in job.sweep.space.items():
        where = f"sweep.space.{path}"
        if any(path == f or path.startswith(f + ".") for f in FIXED):
            section = path.split(".")[0]
            what = section if section in ("sweep", "serve", "eval") else path
            problems.append(f"{where}: {what} cannot vary between trials")
            continue
        missing = _missing_path(type(job), path)
        if missing:
            problems.append(f"{where}: {missing}")
            continue
        if distribution_problems(spec):
            continue  # reported with the distributions
        for value in edge_values(spec):
            trial = copy.deepcopy(raw)
            set_dotted(trial, path, value)
            trial.pop("sweep", None)
            try:
                type(job).model_validate(trial)
            except ValidationError as e:
                first = e.errors(include_url=False)[0]
                at = ".".join(str(p) for p in first["loc"])
                problems.append(f"{where}: the value {value!r} is refused: {at + ': ' if at else ''}{first['msg']}")
                break
    return problems


def edge_values(spec: Any) -> list[Any]:
    """The values worth validating: both bounds of a range, every choice, or the fixed value."""
    if not isinstance(spec, dict):
        return [spec]
    kind, args = next(iter(spec.items()))
    return list(args)


def tune_space(space: dict[str, Any], search: str) -> dict[str, Any]:
    """Ray Tune's param_space for the sweep's space (keys stay dotted config paths)."""
    from ray import tune

    out: dict[str, Any] = {}
    for path, spec in space.items():
        if not isinstance(spec, dict):
            out[path] = spec
            continue
        kind, args = next(iter(spec.items()))
        if kind == "loguniform":
            out[path] = tune.loguniform(*args)
        elif kind == "uniform":
            out[path] = tune.uniform(*args)
        elif kind == "randint":
            out[path] = tune.randint(args[0], args[1] + 1)  # the job file's bounds are inclusive
        elif kind == "grid" or (kind == "choice" and search == "grid"):
            out[path] = tune.grid_search(list(args))
        else:
            out[path] = tune.choice(list(args))
    return out


def trial_count(param_space: dict[str, Any], num_samples: int) -> int:
    """Trials Tune runs for a tune_space: num_samples times every combination of its grid_search entries."""
    combos = 1
    for value in param_space.values():
        if isinstance(value, dict) and "grid_search" in value:
            combos *= len(value["grid_search"])
    return num_samples * combos


def apply_params(raw: dict, params: dict[str, Any]) -> dict:
    """A copy of the raw job config with each dotted path set to the trial's value."""
    out = copy.deepcopy(raw)
    for path, value in params.items():
        set_dotted(out, path, value)
    return out


def _missing_path(model: type[BaseModel], path: str) -> str | None:
    """None when `path` names a setting of the job schema, else what is wrong with it."""
    keys = path.split(".")
    for i, key in enumerate(keys):
        fields = model.model_fields
        if key not in fields:
            known = ", ".join(sorted(fields))
            prefix = ".".join(keys[:i]) or "the job file"
            return f"{prefix} has no setting {key!r} (known: {known})"
        ann = fields[key].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if i == len(keys) - 1:
                return f"{path} is a section; name one of its settings (e.g. {path}.{next(iter(ann.model_fields))})"
            model = ann
            continue
        if i == len(keys) - 1:
            return None
        origin = getattr(ann, "__origin__", None)
        if origin is dict and i == len(keys) - 2:  # a mapping setting, e.g. data.repeat.<file>
            return None
        return f"{'.'.join(keys[: i + 1])} is a single setting; it has no {'.'.join(keys[i + 1 :])}"
    return None
