"""The `serve` binary driven by the official `openai` client (tests/serve/run.sh
starts the servers): chat and text completions, streamed and not, the `hass`
statistics, speculative vs vanilla equality at T = 0, stop strings, seeds, OpenAI-style
400s, and a client that disconnects mid-stream.

HASS_SERVE_URL: a server decoding with a draft head; HASS_SERVE_VANILLA_URL: the same
model decoded without one."""

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

import openai
import pytest

BASE = os.environ["HASS_SERVE_URL"]
VANILLA = os.environ["HASS_SERVE_VANILLA_URL"]
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in two sentences."}]


def client(base=BASE):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def get(path, base=BASE):
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def model():
    return client().models.list().data[0].id


def chat(model, base=BASE, **kw):
    args = dict(model=model, messages=QUESTION, temperature=0, max_tokens=32)
    args.update(kw)
    return client(base).chat.completions.create(**args)


def test_models_and_health(model):
    assert model == "SmolLM2-135M-Instruct"
    health = get("/health")
    assert health["status"] == "ok" and health["speculative"] is True
    assert get("/health", VANILLA)["speculative"] is False


def test_chat_reports_usage_and_tau(model):
    r = chat(model)
    assert r.object == "chat.completion" and r.model == model
    text = r.choices[0].message.content
    assert "Paris" in text, text
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 10 and 0 < u.completion_tokens <= 32
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    stats = r.model_extra["hass"]
    assert stats["speculative"] is True and stats["tau"] >= 1.0 and stats["rounds"] >= 1


def test_stream_matches_non_stream(model):
    whole = chat(model)
    chunks = list(chat(model, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert finals[0].model_extra["hass"]["tau"] >= 1.0
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_speculative_equals_vanilla_at_temperature_zero(model):
    for messages in (QUESTION, [{"role": "user", "content": "Write a haiku about the sea."}]):
        spec = chat(model, messages=messages, max_tokens=48)
        plain = chat(model, base=VANILLA, messages=messages, max_tokens=48)
        assert plain.model_extra["hass"]["speculative"] is False
        assert spec.choices[0].message.content == plain.choices[0].message.content
        assert spec.usage == plain.usage
    c = client().completions.create(model=model, prompt="The three primary colors are", temperature=0, max_tokens=24)
    v = client(VANILLA).completions.create(model=model, prompt="The three primary colors are", temperature=0, max_tokens=24)
    assert c.choices[0].text == v.choices[0].text and c.choices[0].text


def test_text_completion_stream_and_not(model):
    kw = dict(model=model, prompt="Once upon a time", temperature=0, max_tokens=20)
    whole = client().completions.create(**kw)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 20
    assert whole.choices[0].finish_reason == "length"
    parts = [c.choices[0].text for c in client().completions.create(stream=True, **kw) if c.choices]
    assert "".join(parts) == whole.choices[0].text


def test_stop_strings_cut_the_text(model):
    full = chat(model, max_tokens=48).choices[0].message.content
    words = full.split()
    stop = words[len(words) // 2]
    expected = full[: full.index(stop)]
    r = chat(model, max_tokens=48, stop=[stop])
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(model, max_tokens=48, stop=stop, stream=True) if c.choices)
    assert streamed == expected


def test_seed_makes_sampling_reproducible(model):
    kw = dict(temperature=1.0, top_p=0.9, max_tokens=24, seed=1234)
    a = chat(model, **kw).choices[0].message.content
    b = chat(model, **kw).choices[0].message.content
    assert a == b


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"model": "gpt-4"}, "model"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 100000}, "max_tokens"),
    ],
)
def test_bad_requests_get_openai_400s(model, kw, param):
    args = {"model": model}
    args.update(kw)
    with pytest.raises(openai.BadRequestError) as e:
        chat(**args)
    assert e.value.status_code == 400
    err = e.value.response.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_malformed_json_gets_a_400():
    req = urllib.request.Request(
        BASE + "/v1/chat/completions",
        data=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400
    assert json.loads(e.value.read())["error"]["type"] == "invalid_request_error"


def test_disconnect_mid_stream_stops_generation(model):
    before = get("/health")["engine"]
    url = urllib.parse.urlparse(BASE)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    body = {"model": model, "messages": QUESTION, "max_tokens": 2000, "stream": True, "temperature": 0}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen = 0
    while seen < 3:  # the role chunk, then generated text
        line = resp.fp.readline()
        assert line, "stream ended early"
        seen += line.startswith(b"data: ")
    conn.sock.close()
    conn.close()
    # 2000 tokens would take about a minute; the cancelled generation ends within a
    # token or two of the disconnect.
    deadline = time.time() + 20
    while time.time() < deadline:
        after = get("/health")["engine"]
        if after["cancelled"] > before["cancelled"] and not after["busy"]:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"generation still running 20 s after the disconnect: {get('/health')}")
    assert after["completed"] == before["completed"]
    assert chat(model, max_tokens=4).usage.completion_tokens <= 4
