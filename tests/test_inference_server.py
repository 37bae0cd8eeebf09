"""`lumos-jax serve` through the official openai client against localhost."""

import json
import threading
import urllib.error
import urllib.request

import pytest

from inference_helpers import STORIES, hf_greedy

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served():
    from transformers import LlamaForCausalLM

    from lumos_jax.inference import Engine
    from lumos_jax.inference.server import make_server
    from lumos_jax.tokenization import Tokenizer

    tok = Tokenizer(STORIES)
    engine = Engine.from_path(STORIES, num_slots=4, max_len=128, steps_per_call=8)
    server = make_server(engine, tok, port=0, model_name="stories")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
    yield client, base, tok, LlamaForCausalLM.from_pretrained(STORIES).eval()
    server.shutdown()


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES)


def hf_completion(hf_tok, prompt_ids, gen_ids) -> str:
    """What the generated ids add to the prompt's text, by transformers' decode of all ids
    (keeps the leading space that decoding the new ids alone drops)."""
    whole = hf_tok.decode(list(prompt_ids) + list(gen_ids), skip_special_tokens=True)
    return whole[len(hf_tok.decode(prompt_ids, skip_special_tokens=True)):]


@pytest.mark.parametrize("prompt", ["Once upon a time", "Lily went"])
def test_completion_matches_hf_greedy_and_streams_the_same(served, hf_tok, prompt):
    client, _, tok, hf = served
    r = client.completions.create(model="stories", prompt=prompt, max_tokens=20, temperature=0)
    ids = tok.encode(prompt, add_bos=True)
    assert ids == hf_tok(prompt).input_ids
    assert r.choices[0].text == hf_completion(hf_tok, ids, hf_greedy(hf, ids, 20))
    if prompt == "Lily went":  # the model continues with a word: its space is kept
        assert r.choices[0].text.startswith(" ")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 20
    pieces = list(client.completions.create(model="stories", prompt=prompt, max_tokens=20,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in pieces) == r.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"


def test_chat_uses_lumos_template_and_stop_strings(served):
    from lumos_jax.inference.chat import chat_prompt_ids

    client, _, tok, hf = served
    messages = [{"role": "user", "content": "Lily went to the park."}]
    ids = chat_prompt_ids(messages, tok, "train")
    assert tok.decode(ids).startswith("<|user|>\nLily went to the park.\n<|assistant|>")
    expected = tok.decode(hf_greedy(hf, ids, 30))
    r = client.chat.completions.create(model="stories", messages=messages, max_tokens=30,
                                       temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == expected
    stop = expected.split()[2]
    r = client.chat.completions.create(model="stories", messages=messages, max_tokens=30,
                                       temperature=0, stop=[stop])
    assert r.choices[0].message.content == expected[: expected.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="stories", messages=messages, max_tokens=30,
                                              temperature=0, stop=[stop], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed)
    assert text == expected[: expected.index(stop)]


def test_concurrent_requests_are_batched_and_correct(served, hf_tok):
    client, _, tok, hf = served
    prompts = ["Once upon a time", "The cat", "Tom and Lily", "One day", "The sun was", "Ben"]
    out = [None] * len(prompts)

    def ask(i):
        out[i] = client.completions.create(model="stories", prompt=prompts[i], max_tokens=12,
                                           temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p, text in zip(prompts, out):
        ids = tok.encode(p, add_bos=True)
        assert text == hf_completion(hf_tok, ids, hf_greedy(hf, ids, 12))


def test_bad_requests_get_4xx_and_the_server_keeps_serving(served):
    client, base, _, _ = served
    with pytest.raises(openai.BadRequestError, match="unknown parameter"):
        client.completions.create(model="stories", prompt="x", extra_body={"frobnicate": 1})
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
        client.completions.create(model="stories", prompt="a b c " * 100, max_tokens=10)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="stories", prompt="x", temperature=7)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="stories", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.completions.create(model="stories", prompt="x", n=3)
    req = urllib.request.Request(base + "/completions", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.post("/nowhere", cast_to=dict, body={})
    assert [m.id for m in client.models.list().data] == ["stories"]
    r = client.completions.create(model="stories", prompt="The dog", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
