"""Test setup: 8 fake CPU devices for sharding tests, and paths to ../shared."""

import atexit
import os
import shutil
import tempfile

# Must be set before jax is imported anywhere in the test session. LLVM optimisation level 1
# instead of 2: the same HLO programs and numerics (no fast-math either way); the suite is
# compile-bound (tiny models), and level 1 compiles ~20% faster with no slower run time
# (level 0 compiles faster still but runs the training tests ~40% slower). XLA:CPU's classic
# elemental emitters for fusions instead of its MLIR fusion emitters: the same arithmetic (no
# fast-math), fusion decisions that differ a little (memory-analysis checks therefore compile
# as deployed: inference_helpers.compile_as_deployed), and ~30% less CPU time on the in-process
# JAX test files. Tests that start their own JAX process may pass COMPILE_FLAGS on.
COMPILE_FLAGS = "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One XLA compilation cache per test session, fresh each run (never a user's cache): programs
# that several tests build alike, and the CLI subprocesses they start (which inherit this
# environment), compile once. The programs run are the same; only their compile is shared.
_XLA_CACHE = tempfile.mkdtemp(prefix="lumos-jax-tests-xla-cache-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# the engines' program cache (lumos_jax.inference.program_cache) of this session, not the user's
_PROGRAM_CACHE = tempfile.mkdtemp(prefix="lumos-jax-tests-programs-")
atexit.register(shutil.rmtree, _PROGRAM_CACHE, ignore_errors=True)
os.environ.setdefault("LUMOS_PROGRAM_CACHE", _PROGRAM_CACHE)

from pathlib import Path  # noqa: E402

import gin  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"
# The full evaluation sets are not bundled (users point $LUMOS_EVAL_DATA at their copy).
os.environ.setdefault("LUMOS_EVAL_DATA", str(DATA / "eval"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.fail(f"{SHARED} is missing: tests read the shared fixtures from ../shared")
    return SHARED


@pytest.fixture(scope="session")
def llama2_tokenizer():
    from lumos_jax.tokenization import Tokenizer

    return Tokenizer(FIXTURES / "llama2-tokenizer", add_pad_token=True)


@pytest.fixture(autouse=True, scope="module")
def _gin_bindings_stay_in_their_file():
    """No gin binding leaks from one test file into the next (a file's own module-scoped
    fixtures may still parse gin for all its tests): the suite passes in any file order."""
    gin.clear_config()
    yield
    gin.clear_config()
