"""Test setup: 8 fake CPU devices for sharding tests, and paths to ../shared."""

import os

# Must be set before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

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
