"""A reward from the user's own code, named on the command line: ``path/to/file.py:function`` or
``package.module:function`` (``algorithm.reward``, ``resrl eval --reward``).

Each process loads the function itself from the spec (under torchrun every rank resolves the
config), so no function is ever pickled between processes. A file is imported by its path, once
per process; a module is imported as Python would from the current directory (installed packages
first). ``resolve_spec`` turns a relative file path into an absolute one, which is what the saved
config records, so a run resumes from any directory.

A spec fails here, at config time, when the file or module is missing or fails to import, or the
function is missing, not callable, or cannot take ``(response, ground_truth)``; what a function
returns, and what it raises, is checked by the caller on the first batch (``resrl.rewards.registry``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from resrl.errors import InputError

SPEC_FORMS = "path/to/file.py:function or package.module:function"
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED_RE = re.compile(rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})*")

# Modules imported from files, by absolute path: a file runs once per process.
_FILES: dict[Path, ModuleType] = {}


def is_spec(name: str) -> bool:
    """Whether ``name`` names user code (``target:function``) rather than a registered reward."""
    return isinstance(name, str) and ":" in name


def _split(spec: str) -> tuple[str, str, bool]:
    """(target, function, target is a file) of a spec; InputError when it has neither form."""
    target, _, attribute = spec.rpartition(":")
    target, attribute = target.strip(), attribute.strip()
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    if not target or not _DOTTED_RE.fullmatch(attribute) or not (is_file or _DOTTED_RE.fullmatch(target)):
        raise InputError(f"{spec!r} is not a reward spec; accepted: a registered name, {SPEC_FORMS}")
    return target, attribute, is_file


def resolve_spec(spec: str) -> str:
    """``spec`` with a file path made absolute (against the current directory), after checking
    that its function loads; a module spec is returned as given."""
    target, attribute, is_file = _split(spec)
    # Loaded as written, so that an error names the path the user typed.
    load_spec(spec)
    return f"{_absolute(target)}:{attribute}" if is_file else spec


def load_spec(spec: str) -> Any:
    """The callable a spec names, its file or module imported once per process."""
    target, attribute, is_file = _split(spec)
    module = _import_file(target) if is_file else _import_module(target)
    where = target if is_file else f"module {target}"
    value: Any = module
    for i, part in enumerate(attribute.split(".")):
        if not hasattr(value, part):
            if i == 0:
                raise InputError(f"{where} has no function {attribute!r}; {_functions(module)}")
            raise InputError(f"{where}: {'.'.join(attribute.split('.')[:i])} has no attribute {part!r}")
        value = getattr(value, part)
    label = f"{target}:{attribute}"
    if not callable(value):
        raise InputError(
            f"{label} is not a function but {type(value).__name__} {value!r:.40}; {_functions(module)}"
        )
    check_signature(value, label)
    return value


def check_signature(fn: Any, label: str) -> None:
    """InputError unless ``fn`` can be called as ``fn(response, ground_truth, **keywords)``: two
    positional parameters first, no other positional-only one without a default."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        # No signature to read (some builtins): the first call shows whether it fits.
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_star_args = any(p.kind == p.VAR_POSITIONAL for p in params)
    extra_positional = [
        p.name for p in positional[2:] if p.kind == p.POSITIONAL_ONLY and p.default is p.empty
    ]
    if (len(positional) < 2 and not takes_star_args) or extra_positional:
        raise InputError(
            f"{label} takes {_signature(fn)}; a reward is called as fn(response, ground_truth, *, "
            "truncated, negative_reward, **row fields) and takes the keywords it names"
        )


def _signature(fn: Any) -> str:
    return f"{getattr(fn, '__name__', 'fn')}{inspect.signature(fn)}"


def _functions(module: ModuleType) -> str:
    """'it has: a, b' for the public callables ``module`` defines itself."""
    names = sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and callable(value)
        and getattr(value, "__module__", None) == module.__name__
    )
    return f"it has: {', '.join(names)}" if names else "it defines no public function"


def _absolute(target: str) -> Path:
    # abspath, unlike Path.absolute, folds "..": one file has one name, and is imported once.
    return Path(os.path.abspath(os.path.expanduser(target)))


def _import_file(target: str) -> ModuleType:
    path = _absolute(target)
    if path in _FILES:
        return _FILES[path]
    if path.is_dir():
        raise InputError(f"{target} is a folder; accepted: {SPEC_FORMS}")
    if not path.is_file():
        raise InputError(f"file {target} not found (looked for {path}); accepted: {SPEC_FORMS}")
    if path.suffix != ".py":
        raise InputError(f"{target} is not a .py file; accepted: {SPEC_FORMS}")
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"resrl_user_reward_{stem}_{digest}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    # Registered before it runs, as an import would, so the file's dataclasses and pickles work.
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        if isinstance(e, KeyboardInterrupt):
            raise
        raise InputError(f"importing {target} failed: {_describe(e, path)}") from e
    _FILES[path] = module
    return module


def _import_module(target: str) -> ModuleType:
    # As `python -m` would find it: the current directory too, after everything installed.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name is not None and (target == e.name or target.startswith(e.name + ".")):
            raise InputError(
                f"no module named {e.name!r} (neither installed nor under the current directory "
                f"{cwd}); accepted: {SPEC_FORMS}"
            ) from None
        raise InputError(f"importing module {target} failed: {_describe(e, None)}") from e
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        raise InputError(f"importing module {target} failed: {_describe(e, None)}") from e


def _describe(error: BaseException, path: Path | None) -> str:
    """``Type: message`` of an import-time exception, with the line of ``path`` it came from."""
    text = " ".join(str(error).split())
    where = ""
    if path is not None and not isinstance(error, SyntaxError):
        lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if Path(f.filename) == path]
        where = f" (line {lines[-1]})" if lines else ""
    return f"{type(error).__name__}{': ' + text if text else ''}{where}"
