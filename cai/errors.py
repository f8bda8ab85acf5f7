"""The one error type of the method layer that a person can act on, and the one wording of a rejected setting.

    from cai.errors import UserError, validated
    cfg = validated(LabelConfig, samples=1)   # UserError: invalid setting: samples: samples must be at least 2 ...
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class UserError(Exception):
    """Bad input a person can fix (unknown name, bad file, unreachable database): exit code 2."""


def invalid_settings(errors: Iterable[Mapping[str, Any]]) -> str:
    """pydantic's complaints (`ValidationError.errors()`) as one line: every problem, `; `-joined.

    The one wording for every config, whether the command line, a `--config` file or Python
    built it: `cai export --format csv` and `--set format=csv` both read
    `invalid setting: format: Input should be 'arrow', 'parquet' or 'jsonl' (got 'csv')`."""
    return "invalid setting: " + "; ".join(map(_problem, errors))


def validated(model: type[M], **values: Any) -> M:
    """`model(**values)`, with pydantic's complaint turned into a one-line UserError (exit 2)."""
    try:
        return model(**values)
    except ValidationError as exc:
        raise UserError(invalid_settings(exc.errors())) from None


def _problem(e: Mapping[str, Any]) -> str:
    """One pydantic error as `field.path: what is wrong (got value)`."""
    where = ".".join(map(str, e["loc"]))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"{where}: unknown setting (check the spelling; --show-config lists them all)"
    if e["type"] == "missing":
        return f"{where}: required (pass --{where.replace('_', '-')} or --set {where}=...)"
    if not where:  # a check across fields: the message names them
        return msg
    if e["type"] == "value_error" and isinstance(e.get("input"), dict):  # a check across a sub-model's fields
        return f"{where}: {msg}"
    return f"{where}: {msg} (got {e.get('input')!r})"
