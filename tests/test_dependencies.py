"""Every third-party package the code imports is declared in pyproject.toml (read from the
ast of every module, mapped to its distribution by the installed metadata)."""

import ast
import importlib.metadata
import re
import sys
import tomllib

from conftest import REPO

PACKAGES = ("lumos_jax", "data_pipeline", "launch")
# import name -> distribution where the installed metadata cannot tell (namespace packages)
KNOWN = {"jax": "jax", "flax": "flax", "orbax": "orbax-checkpoint"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    """(main dependencies, optional ones) as normalized distribution names."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {_norm(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in reqs}
    optional = set().union(*(names(v) for v in project.get("optional-dependencies", {}).values()))
    return names(project["dependencies"]), optional


def _imports() -> dict[str, list[str]]:
    """Top-level third-party import name -> the files:lines importing it."""
    found: dict[str, list[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    top = mod.split(".")[0]
                    if top in sys.stdlib_module_names or top in PACKAGES or top == "__future__":
                        continue
                    found.setdefault(top, []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_every_imported_package_is_declared():
    main, optional = _declared()
    dists = importlib.metadata.packages_distributions()
    missing = []
    for top, where in sorted(_imports().items()):
        candidates = {_norm(d) for d in dists.get(top, [])} | ({_norm(KNOWN[top])} if top in KNOWN else set())
        if not candidates:
            missing.append(f"{top} (not installed; imported at {where[0]})")
        elif not candidates & (main | optional):
            missing.append(f"{top} (distribution {'/'.join(sorted(candidates))}; imported at {where[0]})")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)


def test_the_scan_sees_the_known_imports():
    """The walk itself works: packages we know are imported are found (a broken scan passes nothing)."""
    found = _imports()
    assert {"jax", "numpy", "gin", "safetensors", "openai", "tqdm"} <= set(found)
