"""gin: import every configurable up front, then parse --gin_file / --gin.X=Y.

t5x-style: `--gin_file` may repeat; `--gin.model_config.preset="'llama2_7b'"` binds
one parameter. Gin files are searched in the working directory and the repository's
`gin/` folder, so `--gin_file=models/tiny.gin` works from anywhere.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import gin
from etils import epath

from lumos_jax.assets import expand as expand_bundled
from lumos_jax.atomic import write_atomic
from lumos_jax.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
GIN_DIR = REPO_ROOT / "gin"

# Every module holding @gin.configurable functions; imported before any parse so gin
# never reports "No configurable matching" for a module that simply wasn't loaded.
CONFIGURABLE_MODULES = [
    "lumos_jax.sharding",
    "lumos_jax.models.config",
    "lumos_jax.models.attention_tpu",
    "lumos_jax.tokenization",
    "lumos_jax.generation",
    "lumos_jax.data.loader",
]
OPTIONAL_CONFIGURABLE_MODULES: list[str] = [
    "lumos_jax.training.gin_configurables",
    "lumos_jax.inference.gin_configurables",
    "lumos_jax.agent.gin_configurables",
    "lumos_jax.evaluation.gin_configurables",
]


class ConfigError(UserError):
    """A bad gin file or binding; the message is one line naming the file or key."""


def import_configurables() -> None:
    for name in CONFIGURABLE_MODULES:
        importlib.import_module(name)
    for name in OPTIONAL_CONFIGURABLE_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise


def resolve_gin_file(name: str) -> str:
    for base in (Path.cwd(), GIN_DIR, REPO_ROOT):
        p = (base / name) if not Path(name).is_absolute() else Path(name)
        if p.exists():
            return str(p)
    raise ConfigError(f"gin file not found: {name} (looked in ., {GIN_DIR})")


class _QuietGinSearch(logging.Filter):
    """gin logs "Path not found" at ERROR for every search folder an `include` misses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Path not found")



def _without_gin_lookalikes(paths: Sequence[str]) -> list[str]:
    """sys.path minus folders holding a plain `runs/`, `models/`, ... folder. gin also looks
    for `include 'runs/x.gin'` inside a Python package `runs`; such a folder (our own `runs/`
    outputs) is then a namespace package with no file and gin's lookup crashes (TypeError).
    Configurables are imported before parsing, so nothing needs these entries meanwhile."""
    names = [d.name for d in GIN_DIR.iterdir() if d.is_dir()]

    def lookalike(entry: str) -> bool:
        base = Path(entry or ".")
        return any((base / n).is_dir() and not (base / n / "__init__.py").exists() for n in names)

    return [p for p in paths if not lookalike(p)]


_SEARCH_PATHS: set[str] = set()  # the folders we gave gin's `include` search, each once


def _add_gin_search_paths(*paths: str) -> None:
    """gin's public `add_config_file_search_path` appends on every call and gin has no public
    way to read the list back, so we remember what we added instead of reading its private one."""
    for p in paths:
        if p not in _SEARCH_PATHS:
            gin.add_config_file_search_path(p)
            _SEARCH_PATHS.add(p)


def parse_gin(gin_files: Sequence[str] = (), bindings: Sequence[str] = ()) -> None:
    """Parse files then bindings; any problem becomes one ConfigError line."""
    import_configurables()
    gin.clear_config()
    _add_gin_search_paths(str(GIN_DIR), str(Path.cwd()), str(REPO_ROOT))
    files = [resolve_gin_file(f) for f in gin_files]
    quiet = _QuietGinSearch()
    logging.getLogger().addFilter(quiet)  # only while gin searches; not on import
    saved_path = sys.path[:]
    sys.path[:] = _without_gin_lookalikes(sys.path)
    try:
        for f in files:
            try:
                gin.parse_config_file(f)
            except Exception as e:  # gin raises several types; report them as one line
                raise ConfigError(_gin_error(e, f)) from None
    finally:
        sys.path[:] = saved_path
        logging.getLogger().removeFilter(quiet)
    for b in bindings:
        try:
            gin.parse_config(b)
        except Exception as e:
            key = b.partition(" = ")[0]
            raise ConfigError(_gin_error(e, f"--gin.{key}", binding=b)) from None
    _expand_bundled_paths()


def gin_bindings() -> Iterator[tuple[str, str, str, Any]]:
    """(key, configurable, parameter, value) of every binding now in force; key is how a
    flag names it: `configurable.param`, `scope/configurable.param`, or a macro's name.
    The one reader of gin's private table (gin has no public one)."""
    for (scope, selector), params in gin.config._CONFIG.items():  # noqa: SLF001 - no public reader
        name = selector.rsplit(".", 1)[-1]  # gin keys configurables by module path
        for param, value in params.items():
            key = scope if selector == "gin.macro" else f"{scope + '/' if scope else ''}{name}.{param}"
            yield key, name, param, value


def _expand_bundled_paths() -> None:
    """`'bundled:X'` gin strings -> the installed package's assets/X (gin has no path type)."""
    for key, params in gin.config._CONFIG.items():  # noqa: SLF001 - gin has no public setter
        for name, value in params.items():
            params[name] = expand_bundled(value)


_UNQUOTED = re.compile(r"Failed to parse token '([^']*)'")
_DENYLISTED = re.compile(r"Configurable '([^']+)' has denylisted kwarg '([^']+)'")
# bindings that moved: the engine's size is set in one namespace for agent, eval, generate, serve
MOVED = {
    "agent_models.engine_slots": "engine_settings.num_slots",
    "agent_models.engine_max_len": "engine_settings.max_len",
    "agent_models.engine_steps_per_call": "engine_settings.steps_per_call",
    "lumos_agent.engine_slots": "engine_settings.num_slots",
    "lumos_agent.engine_max_len": "engine_settings.max_len",
}


def _gin_error(e: Exception, where: str, binding: str | None = None) -> str:
    """gin's message, as one line; an unquoted string (gin shows `<ast.Name ...>`) named as
    such; a binding that moved names its new key."""
    moved = _DENYLISTED.search(str(e))
    if moved and f"{moved.group(1)}.{moved.group(2)}" in MOVED:
        old = f"{moved.group(1)}.{moved.group(2)}"
        return (f"{binding and '--gin.' + binding.partition(' = ')[0] or where}: {old} was moved: bind "
                f"{MOVED[old]} (one engine size for agent, eval, generate and serve)")
    m = _UNQUOTED.search(str(e))
    if m and "<ast." in str(e):
        word = m.group(1)
        if binding is not None:  # a --gin.K=V flag: the shell eats one level of quotes
            return f"gin: unquoted string {word} in {where}; quote it: {where}=\"'{word}'\""
        loc = e.args[1] if len(e.args) > 1 else None
        line = getattr(loc, "line_num", None) or getattr(e, "lineno", None)
        return f"gin: unquoted string {word} in {where}:{line}; quote it: '{word}'"
    return f"{binding and '--gin.' + binding or where}: {_one_line(e)}"


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return " ".join(t.strip() for t in text if t.strip()) or type(e).__name__


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Pull `--gin.X=Y` bindings out of argv (argparse can't express them)."""
    rest, bindings = [], []
    for a in argv:
        if a.startswith("--gin."):
            key, eq, value = a[len("--gin."):].partition("=")
            if not eq:
                raise ConfigError(f"{a}: expected --gin.NAME=VALUE")
            bindings.append(f"{key} = {value}")
        else:
            rest.append(a)
    return rest, bindings


def add_gin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin file (repeatable; searched in . and gin/)")


_REQUIRED = re.compile(r"(\S+) set to `%gin.REQUIRED` but not subsequently overridden")


def check_required() -> None:
    """t5x's rule: a value a run cannot do without (an experiment's BASE_MODEL_DIR, ...) is
    bound to `%gin.REQUIRED` and must be given before anything runs; gin itself checks it only
    in `gin.finalize()`, which would also lock the config, so its check is called alone."""
    try:
        gin.config.find_missing_overrides_hook(gin.config._CONFIG)  # noqa: SLF001 - the hook's input
    except ValueError as e:
        m = _REQUIRED.search(str(e))
        if m is None:
            raise ConfigError(f"gin: {_one_line(e)}") from None
        key = m.group(1)
        if key.endswith(("/gin.macro.value", "/macro.value")):
            key = key.rpartition("/")[0]
        else:  # scope/module.path.configurable.param -> scope/configurable.param
            scope, _, selector = key.rpartition("/")
            key = (scope + "/" if scope else "") + ".".join(selector.split(".")[-2:])
        raise ConfigError(f"gin: {key} is required (the config marks it %gin.REQUIRED); "
                          f"give it: --gin.{key}=VALUE (a string in quotes: \"'...'\")") from None


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """argparse + gin for one subcommand: parses args, then gin files and bindings, and
    checks that every `%gin.REQUIRED` value was given."""
    add_gin_arguments(parser)
    rest, bindings = split_gin_args(argv)
    args = parser.parse_args(rest)
    parse_gin(args.gin_file, bindings)
    check_required()
    args.gin_bindings = bindings
    return args


OPERATIVE_CONFIG = "operative_config.gin"


def write_operative_config(directory) -> None:
    """t5x's operative config: the gin values the run has used so far, into `directory` (a
    training workdir or an eval output folder; a gs:// URI is written through etils.epath)."""
    text = gin.operative_config_str()
    if "://" in str(directory):  # a URI stays an epath.Path (what orbax uses for gs://)
        target = epath.Path(str(directory))
        target.mkdir(parents=True, exist_ok=True)
        (target / OPERATIVE_CONFIG).write_text(text)
    else:
        write_atomic(Path(directory) / OPERATIVE_CONFIG, text)
