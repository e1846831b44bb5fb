"""Command-line options made from config dataclasses, so each setting is defined once: in its config.

``nextchar serve`` takes every ServerConfig field, ``nextchar train`` every ModelConfig
and TrainConfig field, each as ``--field-name`` (and, for serve, the environment
variable ``NEXTCHAR_FIELD_NAME``). A field's ``metadata`` gives its help text and,
where needed, its flag names, choices, or that it names an existing file.
``config_options`` rewrites a command's signature: the one parameter typed as the
config class is replaced by the fields' options, and the command receives the
config built (and validated) from them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])


def _option(name: str, kind: Any, default: Any, metadata: Any, env_prefix: str) -> inspect.Parameter:
    meta = dict(metadata)
    choices = meta.get("choices")
    if choices:
        kind = Literal[tuple(choices)]
    extra: dict[str, Any] = {}
    if meta.get("file"):
        extra.update(exists=True, dir_okay=False)
    option = typer.Option(
        *meta.get("flags", ()),
        help=meta.get("help"),
        envvar=f"{env_prefix}{name.upper()}" if env_prefix else None,
        show_default=not meta.get("secret") and default is not None,
        **extra,
    )
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
    )


def config_options(*classes: type[Any], env_prefix: str = "") -> Callable[[F], F]:
    """Give the decorated command one option per field of each config class.

    The command declares a parameter per class, annotated with the class; it is
    called with an instance made from the options (its defaults: the class's own).
    """

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)  # annotations as objects, not strings
        params = {
            cls: [p.name for p in signature.parameters.values() if p.annotation is cls] for cls in classes
        }
        kept = [p for p in signature.parameters.values() if not any(p.name in v for v in params.values())]
        added: list[inspect.Parameter] = []
        owners: dict[str, type[Any]] = {}
        for cls in classes:
            if len(params[cls]) != 1:
                raise TypeError(f"{command.__name__} must take exactly one {cls.__name__} parameter")
            defaults, types = cls(), typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                added.append(
                    _option(f.name, types[f.name], getattr(defaults, f.name), f.metadata, env_prefix)
                )
                owners[f.name] = cls

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            values: dict[type[Any], dict[str, Any]] = {cls: {} for cls in classes}
            for field_name, cls in owners.items():
                values[cls][field_name] = kwargs.pop(field_name)
            for cls in classes:  # a ValueError names the field (exit code 1, one line)
                kwargs[params[cls][0]] = cls(**values[cls])
            return command(**kwargs)

        run.__signature__ = signature.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
        run.__annotations__ = {}  # the signature says it all; the command's own name the config classes
        return typing.cast(F, run)

    return decorate
