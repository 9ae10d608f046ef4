"""What a job may show of itself. A job's credentials (HF_TOKEN, AWS keys, WANDB_API_KEY) reach it only through
its environment: `submit.env_vars`, which `rayft submit` puts in the job's runtime_env. Everywhere else the job
is printed, logged, saved or shipped as a file, `redacted` shows them as ***."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
# A mapping whose every value is a credential, whatever its name: a job's environment variables.
SECRET_MAPPINGS = {"env_vars"}
# Words that make a key a credential's name wherever they stand: HF_TOKEN, AWS_SECRET_ACCESS_KEY, client_secret.
SECRET_WORDS = {
    "token",
    "secret",
    "secrets",
    "password",
    "passwd",
    "passphrase",
    "credential",
    "credentials",
    "apikey",
    "auth",
    "authorization",
}
# "key" only as the last word: api_key, WANDB_API_KEY, access_key are keys; api_key_env (the name of a variable)
# and api_keys_file (a path) are not.
KEY_WORDS = {"key", "keys"}
# The user (and password) in a URI: s3://ACCESS:SECRET@bucket, https://TOKEN@github.com, postgresql://u:pw@db.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@")


def secret_name(name: str) -> bool:
    """Whether a config key or variable names a credential (its words split at _, -, . and camelCase)."""
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower())
    words = [w for w in words if w]
    return bool(words) and (bool(SECRET_WORDS & set(words)) or words[-1] in KEY_WORDS)


def is_secret(path: str, value: Any = "") -> bool:
    """Whether `value` at a dotted config path is a credential: any value under an env_vars mapping, or text under
    a key named like a key, token, secret or password (a number there is a limit, e.g. max_active_jobs_per_key)."""
    parts = [p for p in str(path).split(".") if p]
    if any(p in SECRET_MAPPINGS for p in parts):
        return True
    return isinstance(value, str) and any(secret_name(p) for p in parts)


def redacted(data: Any, path: str = "", found: list[str] | None = None) -> Any:
    """A copy of config data (dicts, lists, scalars) fit to print, log, save or ship: every credential replaced by
    *** (each value of env_vars, any value under a key named like a key, token, secret or password, and the user
    and password part of a URI). `path` is the dotted config path of `data`; the paths of what was hidden are
    appended to `found`."""
    if isinstance(data, dict):
        return {k: redacted(v, f"{path}.{k}" if path else str(k), found) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redacted(v, path, found) for v in data]
    if data is None or data == "" or data == REDACTED:
        return data
    if is_secret(path, data):
        hidden: Any = REDACTED
    elif isinstance(data, str):
        hidden = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", data)
    else:
        return data
    if hidden != data and found is not None and path not in found:
        found.append(path)
    return hidden
