"""Locust mix for mint_proxy: small GET, small POST, a ~1 MB streamed download, a short SSE stream.

Headless, from the repository root, against a proxy (or the backend directly) on 127.0.0.1::

    .venv/bin/locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 30s --host http://127.0.0.1:8000

Against ``mint-proxy demo`` (its plugins have their own paths, under ``/api``)::

    MINT_BENCH_TARGET=demo .venv/bin/locust -f loadtests/locustfile.py --headless -u 20 -r 5 -t 30s \
        --host http://127.0.0.1:8000

Environment:

- ``MINT_BENCH_TARGET`` (default ``bench``): ``bench`` for the benchmark backend
  (``loadtests/backend.py``), ``demo`` for ``mint-proxy demo``.
- ``MINT_BENCH_PREFIX`` (default ``/bench``): the route prefix; the backend matches the last segment,
  so any prefix the proxy forwards unchanged works.
- ``MINT_BENCH_STREAM_BYTES`` (default 1048576): size of the streamed download.
- ``MINT_BENCH_SSE_EVENTS`` (default 5): events per SSE request.

For the streamed download and the SSE request the reported response time covers the whole
body, not just the headers, and the reported size is the number of bytes actually read.
"""

import os
import time

from locust import FastHttpUser, between, task

_PREFIX_PATH = os.environ.get("MINT_BENCH_PREFIX", "/bench").strip("/")
PREFIX = f"/{_PREFIX_PATH}" if _PREFIX_PATH else ""
STREAM_BYTES = int(os.environ.get("MINT_BENCH_STREAM_BYTES", str(1024 * 1024)))
SSE_EVENTS = int(os.environ.get("MINT_BENCH_SSE_EVENTS", "5"))
ECHO_BODY = "m" * 512  # ASCII: 512 characters, 512 bytes
READ_SIZE = 64 * 1024
TARGET = os.environ.get("MINT_BENCH_TARGET", "bench")
if TARGET not in ("bench", "demo"):
    raise SystemExit(f"MINT_BENCH_TARGET={TARGET!r}: use 'bench' or 'demo'")
# The demo's paths, by task (tests/test_loadtests.py checks the demo still answers each).
DEMO_PATHS = {
    "peaks": "/api/peak-picking/peaks?n=3",
    "run": "/api/peak-picking/run",
    "events": "/api/peak-picking/events",
    "status": "/api/lcms-sequence/status",
}


class MintProxyUser(FastHttpUser):
    """One platform client: mostly small calls, now and then a download or an event stream."""

    abstract = TARGET != "bench"
    wait_time = between(0.01, 0.1)
    network_timeout = 30.0
    connection_timeout = 5.0

    @task(10)
    def small_get(self) -> None:
        with self.client.get(f"{PREFIX}/small", name="GET small", catch_response=True) as resp:
            if resp.status_code == 200 and resp.content != b"Hello, world!":
                resp.failure(f"unexpected body {resp.content!r:.80}")

    @task(5)
    def small_post(self) -> None:
        with self.client.post(f"{PREFIX}/echo", data=ECHO_BODY, name="POST echo", catch_response=True) as resp:
            if resp.status_code == 200 and resp.content != str(len(ECHO_BODY)).encode():
                resp.failure(f"echo answered {resp.content!r:.80}, expected {len(ECHO_BODY)}")

    @task(1)
    def stream_download(self) -> None:
        start = time.perf_counter()
        url = f"{PREFIX}/stream?bytes={STREAM_BYTES}"
        with self.client.get(url, name="GET stream", stream=True, catch_response=True) as resp:
            if resp.status_code != 200:
                return  # reported as a failure by the status code
            received = sum(len(chunk) for chunk in resp.iter_content(READ_SIZE, decode_content=False))
            resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            resp.request_meta["response_length"] = received
            if received != STREAM_BYTES:
                resp.failure(f"stream gave {received} bytes, expected {STREAM_BYTES}")

    @task(1)
    def sse(self) -> None:
        start = time.perf_counter()
        url = f"{PREFIX}/sse?events={SSE_EVENTS}"
        with self.client.get(url, name="GET sse", stream=True, catch_response=True) as resp:
            if resp.status_code != 200:
                return
            body = b"".join(
                c if isinstance(c, bytes) else c.encode() for c in resp.iter_content(READ_SIZE, decode_content=False)
            )
            resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            resp.request_meta["response_length"] = len(body)
            events = body.count(b"\ndata: ")
            content_type = (resp.headers or {}).get("content-type", "")
            if not content_type.startswith("text/event-stream") or events != SSE_EVENTS:
                resp.failure(f"sse gave {events} events with content-type {content_type!r}, expected {SSE_EVENTS}")


class DemoUser(FastHttpUser):
    """A client of ``mint-proxy demo``: peak lists, uploads, a status poll, now and then the event stream."""

    abstract = TARGET != "demo"
    wait_time = between(0.01, 0.1)
    network_timeout = 30.0
    connection_timeout = 5.0

    @task(10)
    def peaks(self) -> None:
        self.client.get(DEMO_PATHS["peaks"], name="GET peaks")

    @task(5)
    def status(self) -> None:
        self.client.get(DEMO_PATHS["status"], name="GET status")

    @task(3)
    def upload(self) -> None:
        self.client.post(DEMO_PATHS["run"], data=ECHO_BODY, name="POST run")

    @task(1)
    def events(self) -> None:
        with self.client.get(DEMO_PATHS["events"], name="GET events", stream=True, catch_response=True) as resp:
            if resp.status_code == 200:
                body = b"".join(
                    c if isinstance(c, bytes) else c.encode()
                    for c in resp.iter_content(READ_SIZE, decode_content=False)
                )
                if body.count(b"event: progress") == 0:
                    resp.failure("the demo's event stream sent no progress event")
