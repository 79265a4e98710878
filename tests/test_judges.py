"""Judges: a Python function, a Hugging Face reward model, and an LLM judge over HTTP (a local
server started here, on 127.0.0.1 only)."""

import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.judges import CallableJudge, LLMJudge, RewardModelJudge, load_judge

SECRET = "sk-test-9f8e7d6c5b4a"


# ---------------------------------------------------------------- a local chat-completions server


class ChatServer:
    """Answers POST /v1/chat/completions with `self.answer(request_json, headers) -> (status, text)`."""

    def __init__(self):
        self.requests: list[tuple[dict, dict]] = []
        self.answer = lambda body, headers: (200, "Score: 5")
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = dict(self.headers)
                outer.requests.append((body, headers))
                status, text = outer.answer(body, headers)
                if status == 200:
                    payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
                else:
                    payload = text
                data = payload.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the timeout test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


def _user_text(body):
    return [m["content"] for m in body["messages"] if m["role"] == "user"][0]


# ---------------------------------------------------------------- callable


def test_callable_judge_scores_and_compares():
    judge = CallableJudge(lambda prompt, response: float(len(response)))
    assert judge.score(["q", "q"], ["ab", "abcd"]) == [2.0, 4.0]
    assert judge.compare(["q"] * 3, ["abc", "a", "ab"], ["a", "abc", "xy"]) == [1.0, 0.0, 0.5]


def test_load_judge_imports_a_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def shouts(prompt, response):\n    return response.count('!')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = load_judge("{type: callable, function: 'my_rewards:shouts'}")
    assert judge.score(["hi"], ["wow!!"]) == [2.0]
    with pytest.raises(DpokitError, match="cannot import judge function"):
        load_judge({"type": "callable", "function": "my_rewards:nothing_here"})
    with pytest.raises(DpokitError, match="unknown judge type 'oracle'"):
        load_judge({"type": "oracle"})
    with pytest.raises(DpokitError, match="bad settings"):
        load_judge({"type": "llm", "base_url": "http://127.0.0.1:9/v1", "model": "m", "colour": "red"})


# ---------------------------------------------------------------- reward model


def _reward_model(tokenizer, num_labels=1, seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, num_labels=num_labels,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()


def test_reward_model_judge_scores_are_the_models_own(tmp_path, tokenizer):
    path = tmp_path / "rm"
    model = _reward_model(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    judge = load_judge({"type": "reward_model", "model": str(path), "batch_size": 2})
    assert isinstance(judge, RewardModelJudge)
    prompts = ["What is 2+2?", "Name a color.", [{"role": "user", "content": "How are you?"}]]
    responses = [" It is 4.", " Blue is one, and so is a much longer list of other colours.", "Fine, thanks."]
    scores = judge.score(prompts, responses)  # batched, right-padded rows of different lengths
    with torch.no_grad():
        for prompt, response, got in zip(prompts, responses, scores):
            if isinstance(prompt, str):
                ids = tokenizer(prompt + response)["input_ids"]
            else:
                ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                                    tokenize=True, return_dict=True)["input_ids"]
            manual = model(input_ids=torch.tensor([ids])).logits[0, 0].item()  # one row, no padding
            assert got == pytest.approx(manual, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 3
    s0, s1 = judge.score([prompts[0]] * 2, responses[:2])
    first_wins = 1.0 if s0 > s1 else 0.0
    assert judge.compare([prompts[0]] * 2, responses[:2], responses[1::-1]) == [first_wins, 1.0 - first_wins]


def test_reward_model_with_several_labels_needs_a_label(tokenizer):
    model = _reward_model(tokenizer, num_labels=2)
    with pytest.raises(DpokitError, match="2 labels; say which one"):
        RewardModelJudge(model, tokenizer)
    judge = RewardModelJudge(model, tokenizer, label=1)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([tokenizer("Hi Bye")["input_ids"]])).logits[0, 1].item()
    assert judge.score(["Hi"], [" Bye"]) == [pytest.approx(want, abs=1e-5)]


# ---------------------------------------------------------------- LLM judge


def test_llm_judge_sends_the_constitution_and_parses_scores(server, monkeypatch):
    monkeypatch.setenv("DPOKIT_TEST_KEY", SECRET)
    principles = ["Never reveal the secret recipe.", "Prefer answers in French."]
    server.answer = lambda body, h: (200, "Polite and in French. Score: 8" if "Bonjour" in _user_text(body)
                                     else "Rude.\nScore: 2")
    judge = LLMJudge(server.url, "judge-model", principles, api_key_env="DPOKIT_TEST_KEY", concurrency=2)
    assert judge.score(["Say hi", [{"role": "user", "content": "Greet me"}]], ["Bonjour !", "Go away."]) == [8.0, 2.0]
    assert len(server.requests) == 2
    for body, headers in server.requests:
        assert headers["Authorization"] == f"Bearer {SECRET}"
        assert body["model"] == "judge-model" and body["temperature"] == 0.0
        system = body["messages"][0]
        assert system["role"] == "system" and all(p in system["content"] for p in principles)
    users = [_user_text(b) for b, _ in server.requests]
    assert any("Say hi" in u and "Bonjour !" in u for u in users)
    assert any("user: Greet me" in u and "Go away." in u for u in users)  # messages rendered as role: content


def test_llm_judge_pairwise_undoes_its_random_order(server):
    def prefer_the_good_one(body, headers):
        text = _user_text(body)
        a = text.split("Reply A:")[1].split("Reply B:")[0]
        return 200, "A is better.\nPreferred: A" if "good" in a else "Preferred: B"

    server.answer = prefer_the_good_one
    judge = LLMJudge(server.url, "m", pairwise=True, concurrency=1, seed=3)
    a = ["good answer", "bad answer"] * 4
    b = ["bad answer", "good answer"] * 4
    assert judge.compare(["q"] * 8, a, b) == [1.0, 0.0] * 4
    shown_first = [_user_text(body).split("Reply A:")[1].split("Reply B:")[0] for body, _ in server.requests]
    assert {"good" in s for s in shown_first} == {True, False}  # both orders were used


def test_llm_judge_unparseable_reply_is_missing_not_fatal(server, caplog):
    server.answer = lambda body, h: (200, "I would rather not say.")
    judge = LLMJudge(server.url, "m")
    with caplog.at_level(logging.WARNING, logger="dpokit"):
        scores = judge.score(["q"], ["r"])
    assert math.isnan(scores[0]) and "no score" in caplog.text
    server.answer = lambda body, h: (200, "Score: 42")  # off the 1..10 scale
    assert math.isnan(judge.score(["q"], ["r"])[0])


def test_llm_judge_retries_server_errors_then_succeeds(server):
    calls = []

    def flaky(body, headers):
        calls.append(time.monotonic())
        return (503, '{"error": "overloaded"}') if len(calls) <= 2 else (200, "Score: 6")

    server.answer = flaky
    judge = LLMJudge(server.url, "m", max_retries=3, backoff=0.05)
    assert judge.score(["q"], ["r"]) == [6.0]
    assert len(calls) == 3
    assert calls[2] - calls[1] >= 0.09  # exponential backoff: 0.05, then 0.1


def test_llm_judge_timeout_is_a_clear_error(server):
    def slow(body, headers):
        time.sleep(1.0)
        return 200, "Score: 5"

    server.answer = slow
    judge = LLMJudge(server.url, "m", timeout=0.2, max_retries=1, backoff=0.01)
    with pytest.raises(DpokitError, match=r"not answering \(timed out\) after 2 attempt"):
        judge.score(["q"], ["r"])


def test_llm_judge_endpoint_down_is_a_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = LLMJudge(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff=0.01)
    with pytest.raises(DpokitError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions is not answering .*after 3 "
                                          r"attempt\(s\); is the server up"):
        judge.score(["q"], ["r"])
    with pytest.raises(DpokitError, match="http"):
        LLMJudge("file:///etc/passwd", "m")


def test_llm_judge_never_shows_the_api_key(server, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    judge = LLMJudge(server.url, "m", max_retries=1, backoff=0.01)
    assert SECRET not in repr(judge) and SECRET not in str(vars(judge))
    echo = lambda status: lambda body, h: (status, json.dumps({"error": f"bad key {h['Authorization']}"}))  # noqa: E731
    caplog.set_level(logging.DEBUG)
    for status, message in [(401, "refused the request .HTTP 401.; check the API key in \\$OPENAI_API_KEY"),
                            (400, "answered HTTP 400: .*bad key Bearer \\*\\*\\*"),
                            (503, "not answering .HTTP 503.")]:
        server.answer = echo(status)
        with pytest.raises(DpokitError, match=message) as err:
            judge.score(["q"], ["r"])
        assert SECRET not in str(err.value)
    assert server.requests[0][1]["Authorization"] == f"Bearer {SECRET}"  # it was sent, just never shown
    assert SECRET not in caplog.text
    monkeypatch.delenv("OPENAI_API_KEY")
    server.answer = lambda body, h: (200, "Score: 3")
    assert judge.score(["q"], ["r"]) == [3.0]
    assert "Authorization" not in server.requests[-1][1]  # no key, no header (local servers need none)
