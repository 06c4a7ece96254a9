"""What the deployment files may refer to: the project's entry points, settings and metrics.

Shared by the compose and Kubernetes tests, which check their files against the code
rather than against a copy of its names.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
IMAGE_USER_ID = 10001  # the Dockerfile's `USER`, which runAsUser and file modes rely on


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def console_scripts() -> dict[str, str]:
    """[project.scripts] of the root pyproject.toml: name -> 'module:function'."""
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["project"].get("scripts", {}))


def _falaj_parser() -> argparse.ArgumentParser:
    from falaj_platform.cli import build_parser

    return build_parser()


def command_problem(argv: Sequence[str]) -> str | None:
    """Why `argv` is not a real entry point of the project, or None when it is.

    A console script must be declared in pyproject.toml and point at a function that
    exists; `falaj` arguments must parse with the CLI's own parser. `python -m MODULE`
    must name an importable module that runs as a program (a package's `__main__`).
    """
    if not argv:
        return "empty command"
    program, *args = argv
    scripts = console_scripts()
    if program in scripts:
        module_name, _, function = scripts[program].partition(":")
        module = importlib.import_module(module_name)
        if not callable(getattr(module, function, None)):
            return f"console script {program!r} points at {scripts[program]!r}, which does not exist"
        if program == "falaj":
            stderr = io.StringIO()
            try:
                with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                    _falaj_parser().parse_args(args)
            except SystemExit as stop:
                if stop.code not in (0, None):
                    return f"`{' '.join(argv)}` is not a valid falaj command: {stderr.getvalue().strip().splitlines()[-1:]}"
        return None
    if program in ("python", "python3") and len(args) >= 2 and args[0] == "-m":
        module_name = args[1]
        spec = importlib.util.find_spec(module_name)
        if spec is None:
            return f"no module {module_name!r}"
        if spec.submodule_search_locations is not None:
            if importlib.util.find_spec(f"{module_name}.__main__") is None:
                return f"package {module_name!r} has no __main__ module"
        elif spec.origin is None or '__name__ == "__main__"' not in Path(spec.origin).read_text():
            return f"module {module_name!r} does not run as a program"
        return None
    return f"{program!r} is neither a console script in pyproject.toml nor `python -m <module>`"


_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` against `env`."""

    def replace(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        current = env.get(name)
        if op in (":-", "-"):
            return arg if (current is None or (op == ":-" and current == "")) else current
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                raise KeyError(f"{name} must be set: {arg}")
            return current
        if current is None:
            raise KeyError(f"{name} is used without a default and is not set")
        return current

    return _INTERPOLATION.sub(replace, value)


_METRIC_DEFINITION = re.compile(r"\b(?:Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*\"(?P<name>[a-z_][a-z0-9_]*)\"")
_SERIES_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created", "_info")


def defined_metrics() -> set[str]:
    """Every Prometheus metric the platform's code defines, by its name without `_total`."""
    names: set[str] = set()
    for path in (ROOT / "src").rglob("*.py"):
        for match in _METRIC_DEFINITION.finditer(path.read_text()):
            names.add(match["name"].removesuffix("_total"))
    return names


def metric_family(series_name: str, families: set[str]) -> str | None:
    """The defined family a series name belongs to (`x_bucket` -> `x`), or None."""
    if series_name in families:
        return series_name
    for suffix in _SERIES_SUFFIXES:
        if series_name.endswith(suffix) and series_name.removesuffix(suffix) in families:
            return series_name.removesuffix(suffix)
    return None
