"""The job file: one YAML document composed of each package's config (the training job from
rayft.training, extended by the sweep job of rayft.tuning, plus `serve` and `submit`).

Precedence is model defaults < YAML < `--set a.b=value`. Unknown keys are errors, and every
problem is reported at once with its dotted path, the bad value and (when it came from the
YAML) the file:line it sits on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError

from rayft.serving.config import ServeConfig
from rayft.training.config import RunConfig, ScalingConfig, Section, TrainJob, set_dotted  # noqa: F401
from rayft.training.redact import redacted
from rayft.tuning.config import SweepJob


class SubmitConfig(Section):
    """How `rayft submit` packages a job for a remote cluster (ignored by local commands)."""

    pip: list[str] = Field(
        default_factory=list, description="Extra pip requirements installed for the job on the cluster."
    )
    image_uri: str | None = Field(
        default=None, description="Container image the job runs in (Ray's image_uri; the nodes need podman)."
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables of the job's driver and workers, and the place for its credentials "
        "(HF_TOKEN, AWS keys, WANDB_API_KEY): their values go into the job's environment only, shown as *** "
        "everywhere else.",
    )
    max_upload_mb: float = Field(
        default=100.0,
        gt=0,
        description="Largest total size of local data and model files shipped with a job; put bigger ones on "
        "shared storage.",
    )
    shared_paths: list[str] = Field(
        default_factory=list,
        description="Path prefixes mounted at the same place on every node (NFS): files under them are not "
        "shipped, the job reads them in place.",
    )


class JobConfig(SweepJob):
    """A whole rayft job file: the sweep job (training job + `sweep`) plus the endpoint and cluster packaging."""

    serve: ServeConfig = Field(default_factory=ServeConfig, description="The HTTP endpoint (rayft serve).")
    submit: SubmitConfig = Field(default_factory=SubmitConfig, description="Packaging for a cluster (rayft submit).")


class ConfigError(Exception):
    """A job file or override that cannot be used; `problems` holds one line per problem."""

    error_kind = "config"  # what `rayft` calls it ("config error ..."); rayft.training.run_dir.user_error

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        head = f"{self.source}: {n} problem{'s' if n != 1 else ''} in the job config"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


# Keys whose relative values are paths relative to the job file (so a job file travels with its data).
_FILE_RELATIVE_KEYS = (
    "data.train",
    "data.eval",
    "serve.api_keys_file",
    "serve.admin_keys_file",
    "serve.adapter_roots",
    "serve.finetune.storage_path",
)


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> JobConfig:
    """Read a job file (or none: defaults only), apply `a.b=value` overrides, validate everything.

    Raises ConfigError listing every problem at once.
    """
    raw: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(source, [f"job file not found: {p} (pass the path of a YAML job file)"])
        text = p.read_text()
        try:
            raw = yaml.safe_load(text) or {}
            lines = _yaml_lines(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            raise ConfigError(source, [f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]) from None
        if not isinstance(raw, dict):
            raise ConfigError(source, ["the job file must be a mapping of sections (model:, data:, ...)"])
        _resolve_relative(raw, p.parent.resolve())

    problems, set_keys = apply_overrides(raw, overrides)

    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(source, problems + _describe(e, raw, lines, source, set_keys)) from None
    if problems:
        raise ConfigError(source, problems)
    # Storage is relative to where the command runs (like any output path on a command line).
    if "://" not in cfg.run.storage_path:
        cfg.run.storage_path = str(Path(cfg.run.storage_path).expanduser().resolve())
    # So is a model directory named by a relative path (e.g. an earlier run's runs/NAME/final): the workers, which
    # run elsewhere, get its absolute path. Anything else (an alias, a hub id, a URI) stays as written.
    model_dir = Path(cfg.model.name).expanduser()
    if "://" not in cfg.model.name and not model_dir.is_absolute() and model_dir.is_dir():
        cfg.model.name = str(model_dir.resolve())
    return cfg


def apply_overrides(raw: dict, overrides: list[str] | None) -> tuple[list[str], set[str]]:
    """Apply `a.b=value` overrides (values parsed as YAML) to raw config data in place.

    Returns the problems found and the keys that were set."""
    problems: list[str] = []
    set_keys: set[str] = set()
    for item in overrides or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            shown = f"{key}={redacted(value, key)}" if sep else item
            problems.append(f"--set {shown!r}: expected KEY=VALUE with a dotted key, e.g. training.lr=1e-4")
            continue
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        if not set_dotted(raw, key, parsed):
            problems.append(f"--set {key}: {key.rsplit('.', 1)[0]} is not a section, cannot set a key inside it")
        set_keys.add(key)
    return problems, set_keys


class _ServeOnly(Section):
    serve: ServeConfig = Field(default_factory=ServeConfig)


def load_serve_config(overrides: list[str] | None) -> ServeConfig:
    """The `serve:` section from defaults and `serve.*` overrides, for targets that are not job files."""
    raw: dict[str, Any] = {}
    problems = [
        f"--set {o}: only serve.* settings apply when serving a model or run dir (not a job file)"
        for o in overrides or []
        if not o.strip().startswith("serve.")
    ]
    more, set_keys = apply_overrides(raw, [o for o in overrides or [] if o.strip().startswith("serve.")])
    problems += more
    try:
        cfg = _ServeOnly.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("--set", problems + _describe(e, raw, {}, "--set", set_keys)) from None
    if problems:
        raise ConfigError("--set", problems)
    return cfg.serve


def _resolve_relative(raw: dict, base: Path) -> None:
    for dotted in _FILE_RELATIVE_KEYS:
        *sections, key = dotted.split(".")
        sec = raw
        for section in sections:
            sec = sec.get(section) if isinstance(sec, dict) else None
        if not isinstance(sec, dict) or key not in sec:
            continue
        value = sec[key]
        if isinstance(value, str):
            sec[key] = _resolve_one(value, base)
        elif isinstance(value, list):
            sec[key] = [_resolve_one(v, base) if isinstance(v, str) else v for v in value]
    adapters = (raw.get("serve") or {}).get("adapters") if isinstance(raw.get("serve"), dict) else None
    if isinstance(adapters, dict):
        for name, value in adapters.items():
            if isinstance(value, str):
                adapters[name] = _resolve_one(value, base)
    rl = (raw.get("training") or {}).get("rl") if isinstance(raw.get("training"), dict) else None
    if isinstance(rl, dict) and isinstance(rl.get("reward"), list):  # FILE.py:function reward functions
        for i, entry in enumerate(rl["reward"]):
            spec = entry.get("function") if isinstance(entry, dict) else entry
            if isinstance(spec, str) and ".py:" in spec:
                file, _, name = spec.rpartition(":")
                resolved = f"{_resolve_one(file, base)}:{name}"
                rl["reward"][i] = entry | {"function": resolved} if isinstance(entry, dict) else resolved
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("name"), str):
        name = model["name"]
        if name.startswith((".", "~", "/")) or (base / name).is_dir():
            model["name"] = _resolve_one(name, base)


def _resolve_one(value: str, base: Path) -> str:
    if "://" in value or os.path.isabs(os.path.expanduser(value)):
        return os.path.expanduser(value)
    return str(base / value)


def _yaml_lines(text: str) -> dict[str, int]:
    """Map each dotted key path in a YAML document to its 1-based line number."""
    out: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                out[path] = k.start_mark.line + 1
                walk(v, path)

    root = yaml.compose(text)
    if root is not None:
        walk(root, "")
    return out


_MSG_REWRITES = [
    (re.compile(r"^Input should be "), "must be "),
    (re.compile(r"^Value error, "), ""),
    (re.compile(r"^Field required$"), "is required"),
]


def _describe(err: ValidationError, raw: dict, lines: dict[str, int], source: str, set_keys: set[str]) -> list[str]:
    problems = []
    for e in err.errors(include_url=False):
        loc = [str(p) for p in e["loc"]]
        # Model-level validators put the field in the message; tagged unions add type names to loc.
        loc = [p for p in loc if not p.startswith(("function-", "literal[", "list[", "str", "int"))]
        dotted = ".".join(loc)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            msg = f"unknown key{' (allowed: ' + ', '.join(allowed) + ')' if allowed else ''}"
        else:
            msg = e["msg"]
            for pat, rep in _MSG_REWRITES:
                msg = pat.sub(rep, msg)
            if e["type"] != "missing" and "input" in e and not isinstance(e["input"], dict):
                msg += f" (got {redacted(e['input'], dotted)!r})"  # a credential's value shows as ***
        where = ""
        if dotted in set_keys:
            where = " [from --set]"
        elif dotted in lines:
            where = f" [{source}:{lines[dotted]}]"
        problems.append(f"{dotted}: {msg}{where}" if dotted else msg)
    return problems


def _allowed_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = JobConfig
    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def _optional_section(ann: Any) -> type[BaseModel] | None:
    """The section of an optional one (`MlflowTracking | None`: off when unset), else None."""
    args = getattr(ann, "__args__", ())
    sections = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    return sections[0] if len(args) == 2 and type(None) in args and len(sections) == 1 else None


def _choices(ann: Any) -> list:
    """The values a Literal annotation allows, also inside `X | None` or `list[str] | Literal[...]`."""
    if get_origin(ann) is Literal:
        return list(get_args(ann))
    return [v for a in get_args(ann) if get_origin(a) is Literal for v in get_args(a)]


def _described(field: Any) -> str:
    """A field's description, with the values it allows when the description does not name them all."""
    desc = field.description or ""
    values = _choices(field.annotation)
    if values and not all(re.search(rf"(?<![\w-]){re.escape(str(v))}(?![\w-])", desc) for v in values):
        desc = f"{desc} One of: {', '.join(str(v) for v in values)}."
    return desc


def config_reference() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field, for `rayft config show --describe` and docs/config.md
    (rayft.cluster.docs). An optional section (off when unset) has a row of its own, then its keys' rows."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            path = f"{prefix}{name}"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, path + ".")
                continue
            default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
            rows.append((path, default, _described(field)))
            if (section := _optional_section(ann)) is not None:
                walk(section, path + ".")

    walk(JobConfig, "")
    return rows
