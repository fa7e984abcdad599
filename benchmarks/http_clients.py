"""Streaming clients for the serving benchmarks, in a process of their own (standard library only).

A server's users run their clients elsewhere: clients in the server's own process would take its interpreter lock
while it parses requests and streams tokens, and their time would count as the server's. This process reads one
JSON job per line on stdin, ``{"url": ..., "prompts": [...], "new": n}``, sends the prompts at once (one thread
each, streaming ``/api/generate``) and writes one JSON line back: ``{"wall_s": ..., "results": [[eval_count,
ttft_s], ...]}``.

    python -m benchmarks.http_clients   # then a job per line on stdin
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time


def stream_once(url: str, prompt: str, new: int) -> tuple[int, float]:
    """One streaming /api/generate request: (eval_count, seconds to the first piece)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    body = {
        "model": "bench",
        "prompt": prompt,
        "raw": True,
        "stream": True,
        "options": {"temperature": 0, "num_predict": new, "seed": 0},
    }
    start = time.perf_counter()
    conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    ttft, count = None, 0
    for line in response:
        msg = json.loads(line)
        if ttft is None and msg.get("response"):
            ttft = time.perf_counter() - start
        if msg.get("done"):
            count = msg["eval_count"]
    conn.close()
    return count, ttft if ttft is not None else time.perf_counter() - start


def run_job(job: dict) -> dict:
    """Every prompt of ``job`` sent at once, one thread each; the wall clock runs from the first request sent to the
    last stream closed."""
    prompts = job["prompts"]
    results: list[tuple[int, float]] = [(0, 0.0)] * len(prompts)

    def client(i: int) -> None:
        results[i] = stream_once(job["url"], prompts[i], job["new"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - start, "results": results}


def main() -> int:
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(run_job(json.loads(line))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
