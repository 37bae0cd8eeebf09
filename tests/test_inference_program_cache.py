"""engine_settings.program_cache_dir: programs loaded from the disk cache give the tokens of the
plain `jax.jit` path without tracing or lowering anything, in this process and in a fresh one;
a changed key input or a damaged entry never reuses a wrong program."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lumos_jax.inference import Engine, SamplingParams
from lumos_jax.inference.params import random_decode_params
from lumos_jax.inference.precompile import Precompiler
from lumos_jax.inference.program_cache import ENV_VAR, SUFFIX, fresh_compile
from lumos_jax.models import PRESETS
from lumos_jax.sharding import make_mesh

CONFIG = PRESETS["tiny"]
SIZES = dict(num_slots=4, max_len=128, max_prefill_tokens=256, steps_per_call=4, block_size=8, num_blocks=40)
LENGTHS = (5, 20, 9)          # one prefill bucket, one decode row count: two programs


def build(cache_dir, threads: int = 0, **changes) -> Engine:
    params, spec = random_decode_params(CONFIG, jax.random.PRNGKey(1), "float32")
    settings = {**SIZES, "cache_dtype": "float32", **changes}
    return Engine.from_params(CONFIG, params, spec, precompile_threads=threads, program_cache_dir=cache_dir,
                              **settings)


def generate(engine: Engine, stop_ids=(2,)) -> list[list[int]]:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, CONFIG.vocab_size, size=n).tolist() for n in LENGTHS]
    return [r.tokens for r in engine.generate(prompts, SamplingParams(max_new_tokens=6, stop_ids=stop_ids))]


def no_lowering(monkeypatch):
    def refuse(self, *key):
        raise AssertionError(f"lowered {key} although its program is cached")
    monkeypatch.setattr(Precompiler, "_lower", refuse)


def entries(directory: Path) -> set[str]:
    return {p.name for p in directory.glob(f"*{SUFFIX}")}


@pytest.fixture(scope="module")
def reference():
    """Tokens of the plain jax.jit path (no cache, nothing ahead of time)."""
    engine = build(None)
    tokens = generate(engine)
    assert engine.programs.stats["ran_precompiled"] == 0
    return tokens


@pytest.fixture(scope="module")
def written(tmp_path_factory, reference):
    """A cache directory written by one engine."""
    directory = tmp_path_factory.mktemp("programs")
    engine = build(str(directory))
    assert generate(engine) == reference
    calls = engine.stats["prefill_calls"] + engine.stats["decode_calls"]
    assert engine.programs.stats["ran_precompiled"] == calls
    assert engine.programs.stats["cache_stored"] == len(entries(directory)) == 2
    return directory, sorted(engine.programs._ready)


@pytest.fixture()
def warm(written, tmp_path):
    """A copy of `written` for one test to change."""
    return Path(shutil.copytree(written[0], tmp_path / "programs"))


@pytest.mark.parametrize("threads", [0, 1])
def test_a_second_engine_loads_every_program_and_lowers_none(warm, reference, monkeypatch, threads):
    """threads=1: the background thread loads first; the shapes this run never met were never
    stored, so those (and only those) fail to lower and are reported as failed."""
    no_lowering(monkeypatch)
    engine = build(str(warm), threads)
    assert generate(engine) == reference
    stats = engine.programs.stats
    assert stats["ran_precompiled"] == engine.stats["prefill_calls"] + engine.stats["decode_calls"]
    assert stats["cache_loaded"] == 2 and stats["cache_stored"] == 0
    resized = engine.resized(num_blocks=40)        # resized engines keep the cache
    assert resized.programs.cache_dir == str(warm)


def test_another_steps_per_call_reuses_only_the_prefill_entry(warm, reference):
    """Greedy tokens do not depend on steps_per_call: the jax.jit reference still holds."""
    before = entries(warm)
    engine = build(str(warm), steps_per_call=2)
    assert generate(engine) == reference
    assert engine.programs.stats["cache_loaded"] == 1 and engine.programs.stats["cache_stored"] == 1
    assert len(entries(warm) - before) == 1


def entry_paths(engine: Engine, keys) -> set[Path]:
    """The files these programs of `engine` would be stored in (computed without compiling)."""
    programs = engine.programs
    programs._prepare()
    return {programs.cache.path(*programs._cache_key(k))[0] for k in keys}


@pytest.mark.parametrize("change", ["cache_dtype", "mesh", "XLA_FLAGS", "source", "jax_config"])
def test_every_key_input_changes_the_entry(written, monkeypatch, change):
    from lumos_jax.inference import program_cache

    directory, keys = written
    same = entry_paths(build(str(directory)), keys)
    assert {p.name for p in same} == entries(directory)       # the key is stable
    kw = {}
    if change == "cache_dtype":
        kw = {"cache_dtype": "bfloat16"}
    elif change == "mesh":
        kw = {"mesh": make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])}
    elif change == "XLA_FLAGS":
        monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_dump_hlo_as_text")
    elif change == "source":
        monkeypatch.setattr(program_cache, "source_hash", lambda: "edited")
    else:
        with jax.default_matmul_precision("highest"):                  # a jax config value
            assert not entry_paths(build(str(directory)), keys) & same
        return
    if "mesh" in kw:
        params, spec = random_decode_params(CONFIG, jax.random.PRNGKey(1), "float32")
        mesh = kw.pop("mesh")
        params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        engine = Engine.from_params(CONFIG, params, spec, mesh=mesh, cache_dtype="float32",
                                    program_cache_dir=str(directory), **SIZES)
    else:
        engine = build(str(directory), **kw)
    assert not entry_paths(engine, keys) & same


def test_a_damaged_entry_is_warned_about_recompiled_and_overwritten(warm, reference, caplog, monkeypatch):
    (prefill,), (decode,) = warm.glob(f"prefill-*{SUFFIX}"), warm.glob(f"decode-*{SUFFIX}")
    prefill.write_bytes(prefill.read_bytes()[:1000])           # truncated
    decode.write_bytes(b"not a program at all")               # garbage
    with caplog.at_level(logging.WARNING, logger="lumos_jax.inference.program_cache"):
        engine = build(str(warm))
        assert generate(engine) == reference
    named = [r.getMessage() for r in caplog.records if "program cache" in r.getMessage()]
    assert len(named) == 2 and all(any(str(p) in m for m in named) for p in (prefill, decode)), named
    assert engine.programs.stats["cache_stored"] == 2
    no_lowering(monkeypatch)                                  # rewritten entries load again
    again = build(str(warm))
    assert generate(again) == reference and again.programs.stats["cache_loaded"] == 2


def test_an_unwritable_directory_is_one_warning_and_the_run_goes_on(written, reference, tmp_path, caplog):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="lumos_jax.inference.program_cache"):
        engine = build(str(blocked))
        assert generate(engine) == reference
    warned = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(warned) == 1 and str(blocked) in warned[0], warned
    assert engine.programs.stats["ran_precompiled"] == engine.stats["prefill_calls"] + engine.stats["decode_calls"]


def test_entries_another_process_wrote_load_and_run(reference, tmp_path, monkeypatch):
    """Written by a fresh process while jax's own persistent cache (tests/conftest.py) holds the
    same programs: an executable jax reloads from its cache does not serialize whole on XLA:CPU
    (it fails when run: 'Function ... not found'), so ours must be compiled afresh. Stop ids no
    token matches widen the stop table to 8: programs no other test of this process compiled."""
    stops = (2, *range(10**6, 10**6 + 4))
    keys = [("decode", 4, 1, 8)]                         # (its prefill program is compiled cold)
    plain = build(None)
    plain.programs._prepare()
    for key in keys:           # into jax's persistent cache, unless (ours) it is bypassed
        plain.programs._lower(*key).compile()
        fresh_compile(plain.programs._lower(*key))
    directory = tmp_path / "programs"
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1])\n"
        "import jax, test_inference_program_cache as t\n"
        "hits = []\n"
        "jax.monitoring.register_event_listener(lambda e, **_: hits.append(e.endswith('/cache_hits')))\n"
        "e = t.build(sys.argv[2]); e.programs._prepare(); hits.clear()\n"
        "for key in json.loads(sys.argv[3]): e.programs._lower(*key).compile()\n"
        "served = sum(hits); tokens = t.generate(e, json.loads(sys.argv[4]))\n"
        "print(json.dumps({'tokens': tokens, 'stats': e.programs.stats, 'served': served}))\n")
    env = {**os.environ, ENV_VAR: "", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(directory),
                           json.dumps(keys), json.dumps(stops)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["served"] == len(keys), "jax's persistent compilation cache is off (tests/conftest.py turns it on)"
    assert out["tokens"] == reference and out["stats"]["cache_stored"] == 2
    no_lowering(monkeypatch)
    engine = build(str(directory))
    assert generate(engine, stops) == reference and engine.programs.stats["cache_loaded"] == 2


def test_the_default_directory_honours_the_environment(monkeypatch, tmp_path):
    from lumos_jax.inference.settings import engine_settings

    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert engine_settings()["program_cache_dir"] == str(tmp_path)
    monkeypatch.setenv(ENV_VAR, "")
    assert engine_settings()["program_cache_dir"] is None
    assert engine_settings(program_cache_dir=None)["program_cache_dir"] is None
    monkeypatch.delenv(ENV_VAR)
    assert engine_settings()["program_cache_dir"].endswith(os.path.join(".cache", "lumos_jax", "programs"))


def test_an_entry_of_another_user_is_not_loaded(tmp_path, monkeypatch, caplog):
    """Entries are pickles: one not owned by this user (a shared, writable cache directory)
    is refused with a warning, never unpickled."""
    import os
    import pickle

    from lumos_jax.inference import program_cache

    cache = program_cache.ProgramCache(tmp_path)
    path, _ = cache.path("decode-r1-t1-s1", {"k": 1})
    path.write_bytes(b"planted")
    monkeypatch.setattr(os, "getuid", lambda: path.stat().st_uid + 1)
    monkeypatch.setattr(pickle, "loads", lambda *_: (_ for _ in ()).throw(AssertionError("unpickled")))
    with caplog.at_level("WARNING"):
        assert cache.load("decode-r1-t1-s1", {"k": 1}) is None
    assert "belongs to another user" in caplog.text
