"""The engine's compiled programs kept on disk, so a later run loads them instead of tracing.

JAX's own persistent compilation cache skips only XLA's compile: to find its key it still
traces and lowers every program (Lumos-I GSM8K on one H200, 2026-12-01: 32.8 s of a 50.4 s
run tracing and lowering 34 engine programs). Here each program is stored as a serialized
executable (`jax.experimental.serialize_executable`) under a key made of everything that can
change it, computed without tracing: jax/jaxlib versions, platform and devices, the jax
config and XLA flags, a hash of the `lumos_jax` source, the argument shapes, dtypes,
shardings and tree structure, the static arguments and the call's rows/tokens/stop width.
A file that cannot be read back (truncated, garbage, another jax) is reported in one warning
and recompiled over: never run as a wrong program. Entries are pickles: the cache directory
must be as trusted as the code itself (as for JAX's own cache).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import importlib.metadata

import jax
from jax.experimental.serialize_executable import deserialize_and_load, serialize

try:  # private: the hook that keeps this cache's compiles out of jax's own (see fresh_compile)
    from jax._src import compiler as _jax_compiler
except ImportError:  # pragma: no cover - a jax without it: such programs are just not stored
    _jax_compiler = None

from lumos_jax.atomic import write_atomic

log = logging.getLogger(__name__)

MAGIC = b"lumos-jax program v1\n"
SUFFIX = ".lumosprog"
ENV_VAR = "LUMOS_PROGRAM_CACHE"
# jax config values that cannot change a program (where caches live, logging, guards; the
# platform and devices are in the key themselves)
_CONFIG_IGNORED = ("compilation_cache", "persistent_cache", "log", "dump", "explain", "pprint",
                   "traceback", "transfer_guard", "timeout", "cross_host", "debug_log_modules",
                   "raise_persistent_cache_errors", "source_url", "check_proxy_envs", "jax_platform")
_ENV_KEYS = ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "TPU_TOPOLOGY", "NEURON_CC_FLAGS")
FRESH_OPTIONS = {"xla_embed_ir_in_executable": False}
_write_lock = threading.Lock()
_local = threading.local()      # this thread's compile: bypass jax's cache / did it hit
_hooks_lock = threading.Lock()
_hooks: dict[str, bool] = {}


def default_cache_dir() -> str | None:
    """`$LUMOS_PROGRAM_CACHE` (set but empty: no cache), else ~/.cache/lumos_jax/programs."""
    value = os.environ.get(ENV_VAR)
    if value is not None:
        return value or None
    return str(Path.home() / ".cache" / "lumos_jax" / "programs")


@functools.cache
def source_hash() -> str:
    """sha256 over every .py file of the `lumos_jax` package (once per process): any code
    change makes every entry a miss."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def sharding_text(sharding) -> str:
    """A sharding with its devices in order (a Mesh's repr names no devices)."""
    if sharding is None:
        return "None"
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and hasattr(mesh, "devices"):
        ids = [int(d.id) for d in mesh.devices.flat]
    else:
        ids = sorted(int(d.id) for d in sharding.device_set)
    return f"{sharding!r} devices={ids}"


def abstract_text(tree) -> dict:
    """Tree structure and every leaf's shape, dtype, weak type and sharding."""
    leaves, treedef = jax.tree.flatten(tree)
    return {"tree": str(treedef),
            "leaves": [f"{tuple(x.shape)} {x.dtype} weak={getattr(x, 'weak_type', False)} "
                       f"{sharding_text(getattr(x, 'sharding', None))}" for x in leaves]}


def environment() -> dict:
    """Everything outside the call that can change a compiled program."""
    devices = jax.devices()
    config = {k: repr(v) for k, v in sorted(jax.config.values.items())
              if not any(s in k for s in _CONFIG_IGNORED)}
    return {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"), "source": source_hash(),
            "backend": jax.default_backend(), "platform_version": devices[0].client.platform_version,
            "devices": [(d.id, d.platform, d.device_kind, d.process_index) for d in devices],
            "process": (jax.process_index(), jax.process_count()),
            "env": {k: os.environ.get(k) for k in _ENV_KEYS}, "config": config}


def _install_hooks() -> bool:
    """A jax-cache hit listener, and a bypass of jax's persistent cache for the compiles of this
    module's thread-local `fresh_compile` (once per process). False if jax no longer has the
    private hook (the hit listener then still keeps such programs out of this cache)."""
    with _hooks_lock:
        if not _hooks:
            def on_event(event, **_):
                if event == "/jax/compilation_cache/cache_hits" and getattr(_local, "watch", False):
                    _local.hit = True
            jax.monitoring.register_event_listener(on_event)
            _hooks["bypass"] = False
            try:
                compiler = _jax_compiler
                original = compiler._get_cache_key

                def cache_key(*args, **kwargs):
                    return None if getattr(_local, "watch", False) else original(*args, **kwargs)
                compiler._get_cache_key = cache_key
                _hooks["bypass"] = True
            except (ImportError, AttributeError):
                log.warning("program cache: this jax has no jax._src.compiler._get_cache_key; "
                            "programs that jax's own cache serves are not stored")
        return _hooks["bypass"]


def fresh_compile(lowered) -> tuple[Any, bool]:
    """`lowered.compile()` outside jax's persistent cache, and whether it may be stored. An
    executable jax's cache deserialized does not serialize again whole on XLA:CPU (jax 0.10.2:
    the reloaded program fails with 'Function ... not found'), so only fresh compiles go here:
    not served from jax's persistent cache, nor from its in-memory memo of `lowered`."""
    _install_hooks()
    _local.watch, _local.hit = True, False
    try:   # any compiler option (this one at its default) skips jax's in-memory executable memo
        compiled = lowered.compile(FRESH_OPTIONS)
    finally:
        _local.watch = False
    return compiled, not _local.hit


def _device_ids(compiled) -> list[int]:
    """The executable's devices in assignment order (what deserializing must be given)."""
    unloaded = getattr(compiled._executable, "_unloaded_executable", None)
    devices = getattr(unloaded, "device_list", None)
    if devices is None:
        devices = compiled._executable.xla_executable.local_devices()
    return [int(d.id) for d in devices]


class ProgramCache:
    """Serialized executables in `directory`, one file per key (see the module doc)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).expanduser()
        self._write_warned = False      # one warning for an unwritable directory, not one per program

    def path(self, label: str, key: dict) -> tuple[Path, str]:
        """The entry's file and the key as text (also stored inside, checked on load)."""
        text = json.dumps(key, sort_keys=True, default=repr)
        digest = hashlib.sha256(text.encode()).hexdigest()[:40]
        return self.directory / f"{label}-{digest}{SUFFIX}", text

    def load(self, label: str, key: dict):
        """The compiled program stored under `key`, or None (a miss; an unreadable entry is
        warned about and left to be overwritten)."""
        path, text = self.path(label, key)
        try:
            data = path.read_bytes()
            owner = path.stat().st_uid
        except FileNotFoundError:
            return None
        except OSError as err:
            log.warning("program cache: cannot read %s (%s); compiling it again", path, err)
            return None
        if hasattr(os, "getuid") and owner != os.getuid():  # entries are pickles: only our own are read
            log.warning("program cache: %s belongs to another user (uid %d); not loading it", path, owner)
            return None
        try:
            return self._decode(data, text)
        except Exception as err:  # noqa: BLE001 - any bad entry is a miss, never a crash
            log.warning("program cache: %s is unusable (%s: %s); compiling it again and overwriting it",
                        path, type(err).__name__, err)
            return None

    @staticmethod
    def _decode(data: bytes, text: str):
        head, digest, body = data[:len(MAGIC)], data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
        if head != MAGIC:
            raise ValueError("not a lumos-jax program entry")
        if hashlib.sha256(body).digest() != digest:
            raise ValueError(f"checksum mismatch ({len(data)} bytes: truncated or altered)")
        entry = pickle.loads(body)
        if entry["key"] != text:
            raise ValueError("stored under another key")
        by_id = {d.id: d for d in jax.devices()}
        devices = [by_id[i] for i in entry["devices"]]
        return deserialize_and_load(entry["payload"], entry["in_tree"], entry["out_tree"],
                                    backend=devices[0].client, execution_devices=devices)

    def store(self, label: str, key: dict, compiled) -> bool:
        """Write `compiled` under `key` atomically; False (with a warning) if it cannot be."""
        path, text = self.path(label, key)
        try:
            payload, in_tree, out_tree = serialize(compiled)
            body = pickle.dumps({"key": text, "devices": _device_ids(compiled), "payload": payload,
                                 "in_tree": in_tree, "out_tree": out_tree}, protocol=pickle.HIGHEST_PROTOCOL)
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)   # private: entries are pickles
            with _write_lock:   # atomic_path's temp name is per process, not per thread
                write_atomic(path, MAGIC + hashlib.sha256(body).digest() + body)
        except Exception as err:  # noqa: BLE001 - the run goes on with the program in memory
            (log.debug if self._write_warned else log.warning)(
                "program cache: cannot write %s (%s: %s)", path, type(err).__name__, err)
            self._write_warned = True
            return False
        return True


def entry_key(env: dict, engine: dict, call: dict) -> dict:
    """The full key of one program: the process's `environment()`, the engine's arguments
    and statics, and the call's shape."""
    return {"format": 1, "env": env, "engine": engine, "call": call}


def describe(value: Any) -> str:
    """A static argument as key text (shardings with their devices)."""
    if hasattr(value, "device_set"):
        return sharding_text(value)
    return repr(value)
