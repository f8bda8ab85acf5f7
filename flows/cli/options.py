"""Command-line options derived from the config models (flows/configs.py): no default is written here.

    @app.command("train")
    @guarded
    @configured(TrainConfig)
    def train(cfg: TrainConfig, lr: float | None = opt(TrainConfig, "trainer.lr")) -> None: ...

    cai train --config train.yaml --set trainer.loss_type=ipo --lr 1e-5 --show-config

`opt` makes a typer option whose help is the field's description and whose shown default is the
field's default; its value stays None unless the flag is given, and only given flags reach the
config. `configured` adds `--config FILE` (YAML), `--set KEY=VALUE` (dotted keys for nested
fields) and `--show-config`, resolves file < --set < flags, validates (unknown keys are an error)
and calls the command with the config.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from cai.errors import UserError

CONFIG_HELP = "YAML file of config fields (nested keys allowed); --set and flags override it."
SET_HELP = "A config field, dotted for nested ones (runner.chunk_size=16); values are YAML/JSON. Repeatable."
SHOW_HELP = "Print the resolved config as YAML and exit without running."


def _submodel(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def field_default(model: type[BaseModel], path: str) -> tuple[Any, str]:
    """(default, description) of a dotted field path, e.g. (TrainConfig, "trainer.lr") -> (5e-06, "...")."""
    holder: Any = None  # the default instance of the enclosing sub-model, whose values win
    *parents, name = path.split(".")
    for part in parents:
        f = model.model_fields[part]
        holder = getattr(holder, part) if holder is not None else f.get_default(call_default_factory=True)
        model = _submodel(f.annotation) or _submodel(type(holder))
        if model is None:
            raise KeyError(f"{path}: {part} is not a sub-model")
    f = model.model_fields[name]
    value = getattr(holder, name) if isinstance(holder, BaseModel) else f.get_default(call_default_factory=True)
    return value, f.description or ""


def _shown(value: Any) -> str | bool:
    if value is None or value is PydanticUndefined:
        return False
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or False
    return str(value)


def opt(model: type[BaseModel], path: str, *flags: str, convert: Callable[[Any], Any] | None = None,
        **kwargs: Any) -> Any:
    """A typer option for the config field `path`: help and shown default come from the model."""
    default, description = field_default(model, path)
    info = typer.Option(None, *flags, help=description, show_default=_shown(default), **kwargs)
    info.config_path = path
    info.config_convert = convert
    return info


# --- resolving: file < --set < flags -------------------------------------------------------------

def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def nest(path: str, value: Any) -> dict[str, Any]:
    for part in reversed(path.split(".")):
        value = {part: value}
    return value


def _yaml(text: str, source: str) -> Any:
    """YAML read the constitution loader's safe way: aliases (a few hundred bytes that expand to
    gigabytes) and deep nesting are refused with file:line:col (ConstitutionError)."""
    from constitution.load import safe_yaml

    return safe_yaml(text, source, what="a config", needs=4)[1]


def parse_value(text: str, key: str = "", flag: str = "--set") -> Any:
    """`--set` values: JSON first (numbers like 1e-5, true, null, [..]), then YAML (`[a, b]`), else the text."""
    from constitution.load import ConstitutionError

    try:
        return json.loads(text)
    except Exception:  # noqa: BLE001 - not JSON: try YAML
        pass
    try:
        return _yaml(text, f"{flag} {key}=")
    except ConstitutionError as exc:
        if not exc.detail.startswith("YAML syntax error"):  # an alias or nesting: refused, not text
            raise UserError(f"{flag} {key}: {exc.detail}") from None
    return text


def parse_set(item: str, flag: str = "--set") -> dict[str, Any]:
    """One KEY=VALUE of `flag` (--set, or deploy's --job-variable) as a nested dict."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        example = ("--job-variable working_dir=/srv/cai" if flag == "--job-variable"
                   else "--set rounds=3 or --set trainer.lr=1e-5")
        raise UserError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {example}")
    return nest(key.strip(), parse_value(value, key.strip(), flag))


def read_config(path: Path) -> dict[str, Any]:
    from constitution.load import ConstitutionError

    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--config {path}: not UTF-8 text (byte {exc.object[exc.start]:#x}); "
                        "save the file as UTF-8") from None
    except OSError as exc:
        raise UserError(f"--config {path}: cannot read it ({exc.strerror or exc.__class__.__name__})") from None
    try:
        data = _yaml(text, str(path))
    except ConstitutionError as exc:
        raise UserError(f"--config {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def _normalise(model: type[BaseModel], layer: dict[str, Any]) -> dict[str, Any]:
    """Sub-model values as dicts, so layers merge field by field (`engine: vllm` -> {backend: vllm})."""
    out = {}
    for key, value in layer.items():
        f = model.model_fields.get(key) if isinstance(key, str) else None
        sub = _submodel(f.annotation) if f else None
        if sub is not None and isinstance(value, dict):
            value = _normalise(sub, value)
        elif sub is not None:
            try:
                value = sub.model_validate(value).model_dump(exclude_unset=True)
            except ValidationError:
                pass  # the final validation names the field
        out[key] = value
    return out


def resolve_config(model: type[BaseModel], config_file: Path | None, settings: Iterable[str],
                   flags: dict[str, Any]) -> BaseModel:
    """The config from a YAML file, then each --set, then the flags given (dotted paths)."""
    layers = [read_config(config_file)] if config_file else []
    layers += [parse_set(s) for s in settings or ()]
    layers += [nest(path, value) for path, value in flags.items()]
    values: dict[str, Any] = {}
    for layer in layers:
        values = merge(values, _normalise(model, layer))
    return model.model_validate(values)


def show(cfg: BaseModel) -> None:
    import yaml

    sys.stdout.write(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True))


def config_params() -> list[inspect.Parameter]:
    """--config, --set and --show-config, for a command signature."""
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("config_file", kw, annotation=Path | None,
                          default=typer.Option(None, "--config", metavar="FILE", help=CONFIG_HELP)),
        inspect.Parameter("settings", kw, annotation=list[str] | None,
                          default=typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP)),
        inspect.Parameter("show_config", kw, annotation=bool,
                          default=typer.Option(False, "--show-config", help=SHOW_HELP)),
    ]


def configured(model: type[BaseModel], adjust: Callable[..., BaseModel] | None = None,
               fields: dict[str, type] | None = None):
    """Give a command --config/--set/--show-config; call it with the resolved config as `cfg`.

    Options made by `opt` go into the config (only when given); other options reach the command
    as they are, and also `adjust(cfg, **them)` when set (for flags that are no single field).
    `fields` (field name -> the flag's value type) adds an `opt` for each after the command's own
    options: a set of options several commands share, written once.
    """
    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        first, *rest = sig.parameters.values()
        rest += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind | None,
                                   default=opt(model, name)) for name, kind in (fields or {}).items()]
        mapped = {p.name: p.default for p in rest if hasattr(p.default, "config_path")}

        @functools.wraps(fn)
        def wrapper(*, config_file: Path | None = None, settings: list[str] | None = None,
                    show_config: bool = False, **kwargs: Any):
            given = {}
            for name, info in mapped.items():
                value = kwargs.pop(name, None)
                if value is None or value == []:
                    continue
                given[info.config_path] = info.config_convert(value) if info.config_convert else value
            cfg = resolve_config(model, config_file, settings or (), given)
            if adjust is not None:
                cfg = adjust(cfg, **kwargs)
            if show_config:
                show(cfg)
                raise typer.Exit(0)
            return fn(cfg, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=[*rest, *config_params()])
        wrapper.config_model = model
        return wrapper

    return decorate
