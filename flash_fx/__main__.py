"""``python -m flash_fx explain MODULE_OR_FILE:FACTORY [--option NAME=VALUE ...]``

Prints the reports flash_fx would produce for a model, without running any kernel (so a model meant for a GPU
can be examined on a CPU-only laptop). ``FACTORY`` is a function of no arguments, found in an importable
module (``package.models:build``) or a Python file (``examples/quickstart.py:explain_inputs``), that returns
``(model, example_inputs)`` with ``example_inputs`` a tuple. Options are those of the backend
(``--option device=A100 --option min_speedup=1.5``); values are read as Python literals when they parse.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def load_factory(spec: str) -> Callable[[], tuple[Any, tuple]]:
    """The function named by ``module:name`` or ``path/to/file.py:name``."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise SystemExit(f"expected MODULE_OR_FILE:FACTORY, got {spec!r}")
    if target.endswith(".py"):
        path = Path(target).resolve()
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise SystemExit(f"cannot load {target}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise SystemExit(f"{target} has no function {name!r}")
    return factory


def parse_option(text: str) -> tuple[str, Any]:
    """``name=value`` with the value read as a Python literal when it is one (else as a string)."""
    name, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flash_fx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    explain_parser = commands.add_parser("explain", help="print what flash_fx would rewrite, and why")
    explain_parser.add_argument("factory", help="MODULE_OR_FILE:FACTORY returning (model, example_inputs)")
    explain_parser.add_argument("--option", action="append", default=[], help="a backend option NAME=VALUE")
    args = parser.parse_args(argv)

    import flash_fx

    model, inputs = load_factory(args.factory)()
    options = dict(parse_option(text) for text in args.option)
    for report in flash_fx.explain(model, *inputs, **options):
        print(report)


if __name__ == "__main__":
    main()
