"""The LLM-teacher converter and the QA tool's endpoint backend (both on the `openai` package,
lumos_jax.openai_chat) against a fake local OpenAI-compatible server (never a real one)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import DATA

from lumos_jax.data.reference_conversion import convert_rows
from data_pipeline.teacher import ChatClient, TeacherError, convert_with_teacher, gsm8k_items
from lumos_jax.agent.tools.base import ToolContext, ToolError
from lumos_jax.agent.tools.qa import QA, OpenAIQA
from lumos_jax.jsonl import read_jsonl


class FakeOpenAI:
    """Answers each task with a canned plan; can fail, stall or answer empty on chosen calls."""

    def __init__(self, script=()):
        self.script = list(script)  # per call: "500", "400", "empty", "garbage", "nochoices", "ok"
        self.requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, body, self.headers.get("Authorization")))
                mode = fake.script.pop(0) if fake.script else "ok"
                if mode in ("500", "400"):
                    self.send_response(int(mode))
                    self.end_headers()
                    return
                if len(body["messages"]) == 1:  # the QA tool: one user turn
                    content = "Answer: Paris"
                else:
                    task = body["messages"][1]["content"].rsplit("Task: ", 1)[1].split("\n")[0]
                    content = f"Subgoal 1: Solve {task}\nAction 1-1: R1 = Calculator(1 + 1) = 2"
                content = "" if mode == "empty" else content
                reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                data = b"{not json" if mode == "garbage" else json.dumps({} if mode == "nochoices" else reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def exemplars():
    return read_jsonl(DATA / "lumos" / "converted" / "maths.jsonl")


def _client(url, **kw):
    return ChatClient(url, "teacher-model", api_key="k", sleep=lambda s: None, **kw)


def test_prompt_retries_and_output_feed_the_reference_conversion(tmp_path, exemplars):
    items = gsm8k_items(DATA / "train" / "gsm8k_train.jsonl")[:3]
    fake = FakeOpenAI(script=["500", "empty", "garbage", "ok"])
    try:
        report = convert_with_teacher(items, "maths", tmp_path / "out.jsonl", _client(fake.url), exemplars)
    finally:
        fake.close()
    assert report.converted == 3 and not report.failed
    path, body, auth = fake.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k" and body["temperature"] == 0
    system, user = body["messages"]
    assert system["content"].startswith("You are a helpful assist to convert natural language plans")
    assert "For the actions, they must be one of 'Calculator', 'SolveEquation', 'Count', and 'Define'." in user["content"]
    assert "Example 6:\nTask: Toby is counting goldfish" in user["content"]
    assert user["content"].endswith(f"Task: {items[0]['task']}\n\nNatural language plan: "
                                    f"{items[0]['natural_language_plan']}\n\n")
    assert len(fake.requests) == 3 + 3  # three retried failures on the first item
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["source_index"] for r in rows] == [0, 1, 2]
    lines, stats = convert_rows(rows, "maths", "ground", "iterative")
    assert stats.written == 3 and "R1 = Calculator(1 + 1)" in lines[0]


def test_resume_skips_done_items_and_repairs_a_torn_line(tmp_path, exemplars):
    items = [{"task": f"t{i}", "natural_language_plan": "p"} for i in range(5)]
    out = tmp_path / "out.jsonl"
    fake = FakeOpenAI()
    try:
        first = convert_with_teacher(items, "maths", out, _client(fake.url), exemplars, max_items=2)
        with open(out, "a") as f:
            f.write('{"task": "t2", "subgoal_pl')  # interrupted mid-write
        second = convert_with_teacher(items, "maths", out, _client(fake.url), exemplars)
    finally:
        fake.close()
    assert (first.converted, second.skipped_done, second.converted) == (2, 2, 3)
    assert [r["source_index"] for r in read_jsonl(out)] == [0, 1, 2, 3, 4]
    assert len(fake.requests) == 5


def test_gives_up_cleanly_and_reports_the_item(tmp_path, exemplars):
    fake = FakeOpenAI(script=["500"] * 10)
    try:
        report = convert_with_teacher([{"task": "t", "natural_language_plan": "p"}], "maths",
                                      tmp_path / "o.jsonl", _client(fake.url, max_retries=2), exemplars)
    finally:
        fake.close()
    assert report.converted == 0 and "gave up after 3 attempts (HTTP 500)" in report.failed[0]
    with pytest.raises(TeacherError, match="attempts"):
        _client("http://127.0.0.1:9/v1", max_retries=1, timeout=2).complete([{"role": "user", "content": "x"}])


def test_a_client_error_is_final_and_a_reply_without_choices_is_retried(tmp_path, exemplars):
    fake = FakeOpenAI(script=["nochoices", "ok", "400"])
    try:
        assert "Subgoal 1" in _client(fake.url).complete([{"role": "user", "content": "x"}, {
            "role": "user", "content": "Task: t\n"}])
        with pytest.raises(TeacherError, match=r"HTTP 400 \(not retried\)"):
            _client(fake.url).complete([{"role": "user", "content": "x"}, {"role": "user", "content": "Task: t\n"}])
    finally:
        fake.close()
    assert len(fake.requests) == 3


def test_qa_tool_endpoint_retries_server_errors_then_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("QA_KEY", "secret")
    fake = FakeOpenAI(script=["500", "ok"] + ["500"] * 3)
    try:
        qa = QA(OpenAIQA(fake.url, "qa-model", api_key_env="QA_KEY", max_retries=2))
        qa.backend.client.sleep = lambda s: None
        assert qa("[France], Question: What is the capital?", ToolContext(variables={})) == "Paris"
        path, body, auth = fake.requests[-1]
        assert (path, body["model"], body["max_tokens"], auth) == ("/v1/chat/completions", "qa-model", 100,
                                                                 "Bearer secret")
        with pytest.raises(ToolError) as e:
            qa("[France], Question: What is the capital?", ToolContext(variables={}))
    finally:
        fake.close()
    assert str(e.value) == f"QA endpoint {fake.url}/chat/completions: gave up after 3 attempts (HTTP 500)"
