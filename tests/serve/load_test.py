"""Bounded load test of `serve`: CLIENTS concurrent clients (threads of the official
`openai` client, no retries) each send REQUESTS short chat requests, half of them
streamed, to a server on a loopback address. Every request must complete or get a
clean 503 (queue full); anything else is an error. The server must still answer
/health afterwards. Stops by itself: a fixed number of requests, each with a timeout,
and an overall deadline.

    python3 tests/serve/load_test.py http://127.0.0.1:PORT [CLIENTS] [REQUESTS]

Prints one JSON line of counts and exits non-zero on any error."""

import json
import sys
import threading
import time
import urllib.request

import openai

DEADLINE_S = 300


def main():
    base = sys.argv[1]
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    per_client = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    if not base.startswith(("http://127.", "http://localhost", "http://[::1]")):
        sys.exit(f"refusing a non-loopback target: {base}")
    api = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = api.models.list().data[0].id
    counts = {"requests": 0, "completed": 0, "rejected_503": 0, "errors": 0}
    errors = []
    lock = threading.Lock()
    start = time.time()

    def one(i, j):
        kw = dict(
            model=model,
            messages=[{"role": "user", "content": f"Count from {i} to {i + j + 3}."}],
            max_tokens=16,
            temperature=0,
        )
        try:
            if (i + j) % 2:
                chunks = list(api.chat.completions.create(stream=True, **kw))
                ok = any(c.choices and c.choices[0].finish_reason for c in chunks)
            else:
                r = api.chat.completions.create(**kw)
                ok = r.usage.completion_tokens > 0 and r.choices[0].finish_reason in ("stop", "length")
            outcome = "completed" if ok else "errors"
            if not ok:
                errors.append(f"client {i} request {j}: incomplete response")
        except openai.APIStatusError as e:
            clean = e.status_code == 503 and e.response.json()["error"]["code"] == "overloaded"
            outcome = "rejected_503" if clean else "errors"
            if not clean:
                errors.append(f"client {i} request {j}: HTTP {e.status_code} {e.response.text[:200]}")
        except Exception as e:  # noqa: BLE001 (any other failure is counted, not raised)
            outcome = "errors"
            errors.append(f"client {i} request {j}: {type(e).__name__}: {e}")
        with lock:
            counts["requests"] += 1
            counts[outcome] += 1

    def client(i):
        for j in range(per_client):
            if time.time() - start > DEADLINE_S:
                return
            one(i, j)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, DEADLINE_S + 130 - (time.time() - start)))
    with urllib.request.urlopen(base + "/health", timeout=30) as r:
        health = json.loads(r.read())
    counts["expected"] = clients * per_client
    counts["seconds"] = round(time.time() - start, 1)
    counts["server_after"] = health
    print(json.dumps(counts))
    for e in errors[:10]:
        print(e, file=sys.stderr)
    ok = (
        counts["errors"] == 0
        and counts["requests"] == counts["expected"]
        and counts["completed"] + counts["rejected_503"] == counts["requests"]
        and counts["completed"] > 0
        and health["status"] == "ok"
    )
    print(f"load-test: {'1 passed, 0 failed' if ok else '0 passed, 1 failed'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
