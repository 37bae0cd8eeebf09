"""Shared by the reference-protocol tests: scripted models and a clean gin config."""

import gin
import pytest

from lumos_jax.agent.generators import GenOutput
from lumos_jax.tokenization import reference_prompt_text


@pytest.fixture(autouse=True)
def _no_gin_bindings():
    """Earlier tests may leave gin bindings (agent_tools.doc_store, ...) behind."""
    gin.clear_config()
    yield
    gin.clear_config()


class Seq:
    """A model that answers each module's turns from a list, keeping the reference prompt text
    (tokenization.reference_prompt_text) of every request."""

    def __init__(self, **outputs):
        self.outputs = {m: list(v) for m, v in outputs.items()}
        self.prompts = {m: [] for m in outputs}

    def generate(self, requests):
        out = []
        for r in requests:
            self.prompts[r.module].append(reference_prompt_text(r.messages))
            out.append(GenOutput(text=self.outputs[r.module].pop(0)))
        return out

    def release(self, session):
        pass


class StopAtStops:
    """Token backend that emits a fixed sequence and honours stop ids, as the engine does."""

    def __init__(self, tokens):
        self.tokens = tokens

    def generate_tokens(self, batch, max_new_tokens, stop_ids):
        out = []
        for _, ids in batch:
            toks = []
            for t in self.tokens:
                toks.append(t)
                if t in stop_ids:
                    break
            out.append((toks, len(ids)))
        return out

    def release(self, session):
        pass
