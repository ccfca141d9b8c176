"""The configuration reference, generated from :class:`app.settings.Settings`.

``python -m app.config_doc`` prints the Markdown table; ``--write`` puts it into README.md between
``<!-- config:start -->`` and ``<!-- config:end -->``; ``--check`` exits 1 when README disagrees.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from app.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config:start -->", "<!-- config:end -->"
_BOUNDS = ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"), (Lt, "lt", "<"))


def env_name(field: str) -> str:
    """The environment variable of a settings field, e.g. ``RDSERVE_TOKEN_BUDGET``."""
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def _type(annotation: Any, info: FieldInfo) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]  # optional: "unset" shows in the default column
    if typing.get_origin(annotation) is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    names = {
        bool: "bool",
        int: "int",
        float: "float",
        str: "str",
        Path: "path",
        SecretStr: "secret",
    }
    text = names.get(annotation, getattr(annotation, "__name__", str(annotation)))
    bounds = [
        f"{sym} {getattr(m, attr)}"
        for m in info.metadata
        for cls, attr, sym in _BOUNDS
        if isinstance(m, cls)
    ]
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size and n % size == 0:
            return f" ({n // size} {unit})"
    return ""


def _default(name: str, info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True, validated_data={})
    if value is None:
        return "*unset*"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path):
        home = str(Path.home())
        text = str(value)
        return f"`~{text[len(home) :]}`" if text.startswith(home) else f"`{text}`"
    if isinstance(value, int) and name.endswith("_bytes"):
        return f"`{value}`{_bytes(value)}"
    return f"`{value}`"


def settings_table() -> str:
    """One Markdown row per settings field: variable, type, default, description."""
    rows = ["| Variable | Type | Default | Description |", "|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        desc = (
            (info.description or "").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        )
        rows.append(
            f"| `{env_name(name)}` | {_type(info.annotation, info)} | {_default(name, info)} "
            f"| {desc} |"
        )
    return "\n".join(rows)


def readme_block(text: str) -> str:
    """What README holds between the config markers (stripped)."""
    _, sep, rest = text.partition(START)
    body, sep2, _ = rest.partition(END)
    if not sep or not sep2:
        raise ValueError(f"README lacks the {START} … {END} markers")
    return body.strip()


def with_table(text: str) -> str:
    """README text with the generated table between the config markers."""
    readme_block(text)  # the markers must be there
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{settings_table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Print the table, or write/check README.md."""
    p = argparse.ArgumentParser(prog="python -m app.config_doc", description=__doc__)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite README.md between the markers")
    g.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    p.add_argument("--readme", type=Path, default=README)
    args = p.parse_args(argv)
    if args.write:
        text = args.readme.read_text()
        new = with_table(text)
        if new != text:
            args.readme.write_text(new)
        return 0
    if args.check:
        if readme_block(args.readme.read_text()) != settings_table():
            print(f"{args.readme}: configuration table is out of date; run {p.prog} --write")
            return 1
        return 0
    print(settings_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
