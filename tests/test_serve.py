"""``dsearch serve``: a real server process on a free local port, with the hashing encoder injected
(``DSEARCH_TEST_ENCODER``), except the slow test that serves the bundled model."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, SAMPLE

TESTS = Path(__file__).resolve().parent
QUERIES = ["volcano on mars", "the deepest ocean", "salt in cooking"]


class Served:
    """A running ``dsearch serve``: its URL, its stderr so far, and the process."""

    def __init__(self, process: subprocess.Popen, url: str, lines: list[str]) -> None:
        self.process, self.url, self.lines = process, url, lines

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def request(
        self,
        path: str,
        body: object = None,
        method: str | None = None,
        headers: dict | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any, dict]:
        """(status, headers, JSON body) of one request; HTTP errors are answers too."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        parts = urllib.parse.urlsplit(self.url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            try:
                connection.request(method or ("POST" if data is not None else "GET"), path, data, headers or {})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered before reading the whole body (413): the answer is still there
            response = connection.getresponse()
            return response.status, response.headers, json.loads(response.read())
        finally:
            connection.close()

    def search(self, **params: object) -> tuple[int, dict]:
        status, _, body = self.request("/search?" + urllib.parse.urlencode(params))
        return status, body

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def server_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(TESTS)]),
        "DSEARCH_TEST_ENCODER": "fakes:hashing_encoder",
        **extra,
    }


def start(*args: object, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "dsearch", "serve", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or server_env())


@contextmanager
def serving(*args: object, env: dict | None = None, port: str = "0") -> Iterator[Served]:
    """Start a server on a free port, wait until it says where it listens, stop it (SIGTERM) afterwards."""
    process = start(*args, "--port", port, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stderr:
            lines.append(line)
            if " at http://" in line:
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert ready.wait(60), "the server never said it was ready"
    url = next((line.split(" at ")[-1].strip() for line in lines if " at http://" in line), None)
    assert url, "".join(lines)
    served = Served(process, url, lines)
    try:
        yield served
    finally:
        if process.poll() is None:
            served.stop()
        reader.join(10)
        assert process.stdout.read() == ""  # stdout is for results; a server has none


def hits_of(body: dict) -> list[dict]:
    return [hit for result in body["results"] for hit in result["hits"]]


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


BLAS_THREADS = """
from threadpoolctl import threadpool_info
from dsearch import serve
limited = serve.limit_blas_threads()
print(limited, sorted({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS starts one thread per core: needs 2+")
def test_the_server_runs_blas_on_one_thread_unless_told_otherwise(sample_index):
    # OpenBLAS's helper threads busy-wait between searches; that cost the server half its CPU per query under load.
    base = {k: v for k, v in server_env().items() if k != "OPENBLAS_NUM_THREADS"}

    def blas_threads(**extra: str) -> str:
        done = subprocess.run([sys.executable, "-c", BLAS_THREADS], env={**base, **extra}, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert blas_threads() == "1 [1]"
    assert blas_threads(OPENBLAS_NUM_THREADS="2") == "2 [2]"  # the user's setting wins
    # The real server applies it before it answers anything (its -vv log says so).
    with serving(sample_index, "-vv", env=base) as served:
        assert served.search(q=QUERIES[0], k=2)[0] == 200
    assert "BLAS threads: 1\n" in served.stderr


FAISS_THREADS = """
import threading, faiss
from dsearch import serve
seen = {}
def worker():
    serve.limit_faiss_threads()
    seen["worker"] = faiss.omp_get_max_threads()
thread = threading.Thread(target=worker)
thread.start()
thread.join()
print(seen["worker"], faiss.omp_get_max_threads())
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenMP starts one thread per core: needs 2+")
def test_the_worker_searches_ann_indexes_on_one_openmp_thread_unless_told_otherwise(cli, sample_index):
    # FAISS's idle OpenMP threads spin: two threads doubled an HNSW search's CPU for the same wall time.
    base = {k: v for k, v in server_env().items() if k != "OMP_NUM_THREADS"}

    def threads(**extra: str) -> str:
        done = subprocess.run([sys.executable, "-c", FAISS_THREADS], env={**base, **extra}, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    cores = os.cpu_count()
    assert threads() == f"1 {cores}"  # the calling thread only: the setting is per thread
    assert threads(OMP_NUM_THREADS="2") == "2 2"  # the user's setting wins
    assert cli("reindex", sample_index, "--index-type", "hnsw").exit_code == 0
    with serving(sample_index, "-vv", env=base) as served:
        assert served.search(q=QUERIES[0], k=2)[0] == 200
    assert "FAISS OpenMP threads of the worker: 1\n" in served.stderr


# --- results -------------------------------------------------------------------------------------------------


def test_results_equal_dsearch_query_jsonl(cli, sample_index):
    with serving(sample_index) as served:
        expected = cli("query", sample_index, *QUERIES, "-k", "5", "--format", "jsonl")
        assert expected.exit_code == 0, expected.stderr
        status, _, body = served.request("/search", {"queries": QUERIES, "k": 5})
        assert status == 200
        assert hits_of(body) == jsonl(expected.stdout)
        assert [r["qid"] for r in body["results"]] == ["1", "2", "3"]
        # GET, one query: the same as the command line with that one query.
        one = cli("query", sample_index, QUERIES[0], "-k", "3", "--format", "jsonl")
        status, body = served.search(q=QUERIES[0], k=3)
        assert status == 200 and hits_of(body) == jsonl(one.stdout)
        assert body["index"] == "sample-index" and len(body["version"]) > 8
        # The other modes and the filters give what the command line gives with the same options.
        for options in (
            {"mode": "lexical"},
            {"mode": "hybrid"},
            {"mode": "hybrid", "alpha": 0.3},
            {"where": "topic = 'geography'"},
            {"min_score": 0.2},
        ):
            flags = [x for name, value in options.items() for x in (f"--{name.replace('_', '-')}", str(value))]
            expected = cli("query", sample_index, *QUERIES, "-k", "4", "--format", "jsonl", *flags)
            assert expected.exit_code == 0, expected.stderr
            status, _, body = served.request("/search", {"queries": QUERIES, "k": 4, **options})
            assert status == 200, body
            assert hits_of(body) == jsonl(expected.stdout), options
        status, _, body = served.request("/search", {"queries": [{"qid": "q7", "text": QUERIES[1]}], "k": 2})
        assert status == 200 and {h["qid"] for h in hits_of(body)} == {"q7"}
    assert "Traceback" not in served.stderr


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_an_ann_index_serves_what_query_prints_whatever_the_batch(cli, sample_index, index_type):
    # The server searches many requests' queries in one FAISS call (one OpenMP thread): each query's hits must
    # still be those `dsearch query` prints for it alone.
    assert cli("reindex", sample_index, "--index-type", index_type).exit_code == 0
    queries = [*QUERIES, "bread dough yeast", "a marathon race", "northern lights"]
    with serving(sample_index, env=server_env(DSEARCH_TEST_QUERY_DELAY="0.2")) as served:
        expected = {q: jsonl(cli("query", sample_index, q, "-k", "4", "--format", "jsonl").stdout) for q in queries}
        answers: dict[str, tuple[int, dict]] = {}

        def ask(query: str) -> None:
            answers[query] = served.search(q=query, k=4)

        threads = [threading.Thread(target=ask, args=(q,)) for q in queries]
        for thread in threads:
            thread.start()
            time.sleep(0.02)
        for thread in threads:
            thread.join()
        for query in queries:
            status, body = answers[query]
            assert status == 200 and expected[query]
            assert [{**h, "qid": "1"} for h in hits_of(body)] == expected[query], query
        status, _, body = served.request("/search", {"queries": queries, "k": 4})
        assert status == 200
        assert [[{**h, "qid": "1"} for h in r["hits"]] for r in body["results"]] == [expected[q] for q in queries]


def test_a_stored_nan_field_is_served_as_null(cli, tmp_path):
    # Hits skip the second NaN walk on the way out: the user's own fields are still made valid JSON.
    corpus = tmp_path / "odd.jsonl"
    corpus.write_text('{"id": "a", "text": "volcano one", "x": NaN, "y": [Infinity, 1.5]}\n')
    assert cli("index", corpus, "-o", tmp_path / "idx").exit_code == 0
    with serving(tmp_path / "idx") as served:
        parts = urllib.parse.urlsplit(served.url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        connection.request("GET", "/search?q=volcano")
        response = connection.getresponse()
        raw = response.read().decode("utf-8")
        connection.close()
    assert response.status == 200
    strict = {"parse_constant": lambda c: pytest.fail(f"non-JSON constant {c}")}
    [hit] = hits_of(json.loads(raw, **strict))
    assert hit["fields"] == {"x": None, "y": [None, 1.5]} and hit["id"] == "a"


def test_info_health_and_openapi(cli, sample_index):
    with serving(sample_index) as served:
        status, _, body = served.request("/info")
        expected = json.loads(cli("info", sample_index, "--json").stdout)
        assert status == 200
        [entry] = body["indexes"]
        assert entry["name"] == "sample-index" and entry["info"] == expected
        status, _, health = served.request("/health")
        assert status == 200 and health["status"] == "ok" and health["indexes"]["sample-index"]["ok"] is True
        status, _, spec = served.request("/openapi.json")
        assert (
            status == 200 and spec["openapi"].startswith("3.") and {"/search", "/info", "/health"} <= set(spec["paths"])
        )
        with urllib.request.urlopen(served.url + "/docs") as page:
            assert b"/search" in page.read()


def test_health_is_503_when_the_index_goes(cli, sample_index, tmp_path):
    with serving(sample_index) as served:
        (sample_index / "manifest.json").rename(tmp_path / "manifest.json")
        status, _, health = served.request("/health")
        assert status == 503 and health["status"] == "unavailable"
        assert "manifest.json" in health["indexes"]["sample-index"]["error"]
        # It still answers from the version it has open.
        status, body = served.search(q="volcano")
        assert status == 200 and hits_of(body)
        (tmp_path / "manifest.json").rename(sample_index / "manifest.json")
        status, _, health = served.request("/health")
        assert status == 200


def test_a_version_that_does_not_open_keeps_the_old_one_serving(cli, sample_index):
    with serving(sample_index) as served:
        status, before = served.search(q="volcano", k=3)
        broken = sample_index / "manifest.tmp"
        broken.write_text("{not a manifest")
        broken.replace(sample_index / "manifest.json")  # as a publish swaps it
        status, after = served.search(q="volcano", k=3)
        assert status == 200 and after == before  # the version it has, whole
        status, _, health = served.request("/health")
        assert status == 503 and "manifest" in health["indexes"]["sample-index"]["error"]
        assert cli("index", SAMPLE / "passages.jsonl", "-o", sample_index).exit_code == 0  # a good publish
        status, _, health = served.request("/health")
        assert status == 200
        status, now = served.search(q="volcano", k=3)
        assert status == 200 and now["version"] != before["version"] and hits_of(now) == hits_of(before)
    warnings = [line for line in served.lines if "still serving the version opened before" in line]
    assert len(warnings) == 1, served.stderr  # said once, not on every request
    assert "Traceback" not in served.stderr


def test_several_indexes(cli, sample_index, tmp_path):
    other = tmp_path / "other"
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "only", "text": "a lonely passage about volcanoes"}) + "\n")
    assert cli("index", corpus, "-o", other).exit_code == 0
    with serving(sample_index, other) as served:
        status, body = served.search(q="volcano", index="other")
        assert status == 200 and [h["id"] for h in hits_of(body)] == ["only"]
        status, body = served.search(q="volcano")
        assert status == 400 and "index=" in body["error"] and "other" in body["error"]
        status, body = served.search(q="volcano", index="nope")
        assert status == 400 and "unknown index 'nope'" in body["error"]


# --- micro-batching ------------------------------------------------------------------------------------


def test_a_query_does_not_depend_on_its_batch_mates(sample_index):
    # A slow encoder keeps the worker busy, so the requests sent meanwhile wait and go out as one batch.
    with serving(sample_index, "-vv", env=server_env(DSEARCH_TEST_QUERY_DELAY="0.3")) as served:
        alone = {q: served.search(q=q, k=5)[1] for q in QUERIES}
        answers: dict[int, tuple[int, dict]] = {}

        def ask(number: int) -> None:
            answers[number] = served.search(q=QUERIES[number % len(QUERIES)], k=5)

        threads = [threading.Thread(target=ask, args=(n,)) for n in range(9)]
        for thread in threads:
            thread.start()
            time.sleep(0.02)
        for thread in threads:
            thread.join()
        for number, (status, body) in answers.items():
            assert status == 200
            assert hits_of(body) == hits_of(alone[QUERIES[number % len(QUERIES)]])  # same hits, same scores
        # And inside one POST with other queries.
        status, _, body = served.request("/search", {"queries": ["unrelated words", QUERIES[1], "more"], "k": 5})
        mixed = body["results"][1]["hits"]
        assert [(h["id"], h["score"]) for h in mixed] == [(h["id"], h["score"]) for h in hits_of(alone[QUERIES[1]])]
    batched = [line for line in served.lines if "batch of" in line]
    assert any(int(line.split("batch of ")[1].split()[0]) > 1 for line in batched), batched


def test_requests_arriving_while_a_batch_is_encoded_join_its_search(sample_index):
    # A flat index is read whole by every search call: requests that came in while the worker was encoding are
    # encoded too and searched with the batch, not left for a scan of their own (and answered as if alone).
    with serving(sample_index, "-vv", env=server_env(DSEARCH_TEST_QUERY_DELAY="0.4")) as served:
        alone = {q: served.search(q=q, k=3)[1] for q in QUERIES}
        answers: dict[str, tuple[int, dict]] = {}

        def ask(query: str) -> None:
            answers[query] = served.search(q=query, k=3)

        first = threading.Thread(target=ask, args=(QUERIES[0],))
        first.start()
        time.sleep(0.15)  # the worker is encoding the first request now
        late = [threading.Thread(target=ask, args=(q,)) for q in QUERIES[1:]]
        for thread in late:
            thread.start()
        for thread in [first, *late]:
            thread.join()
        for query in QUERIES:
            status, body = answers[query]
            assert status == 200 and hits_of(body) == hits_of(alone[query])
    sizes = [line.split("batch of ")[1].split(" queries")[0] for line in served.lines if "batch of" in line]
    assert sizes[:3] == ["1", "1", "1"] and sizes[3:] == ["3"], sizes  # three alone, then one batch of three


def test_the_worker_stops_even_when_a_batch_fails_after_taking_the_stop_marker():
    # A top-up may take the stop marker; a bug in that batch must not make the worker forget it (and hang SIGTERM).
    from dsearch import serve

    answered: list[int] = []

    class Request:
        queries = ["q"]

        def finish(self, status: int, body: dict, checked: bool = False) -> None:
            answered.append(status)

    class Failing(serve.Batcher):
        def _batch(self, jobs):  # type: ignore[no-untyped-def]
            self.queue.put(serve._STOP)  # SIGTERM while the batch is encoded
            self._take_waiting(jobs, 1)  # the top-up takes it
            raise RuntimeError("a bug")

    batcher = Failing([], serve.Limits())
    batcher.queue.put(Request())
    batcher.start()
    batcher.thread.join(5)
    assert not batcher.thread.is_alive() and answered == [500]


def test_full_queue_is_503_with_retry_after(sample_index):
    with serving(sample_index, "--queue", "1", env=server_env(DSEARCH_TEST_QUERY_DELAY="0.6")) as served:
        answers: list[tuple[int, dict, dict]] = []

        def ask() -> None:
            answers.append(served.request("/search?q=volcano"))

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
            time.sleep(0.1)
        for thread in threads:
            thread.join()
        refused = [a for a in answers if a[0] == 503]
        assert refused and all(a[1]["Retry-After"] == "1" and "try again" in a[2]["error"] for a in refused)
        assert any(a[0] == 200 for a in answers)
    assert "Traceback" not in served.stderr


# --- auth, limits and bad requests ---------------------------------------------------------------------


def test_bearer_token(sample_index, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    with serving(sample_index, "--token-file", token) as served:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
            status, response_headers, body = served.request("/search?q=volcano", headers=headers)
            assert status == 401 and response_headers["WWW-Authenticate"] == "Bearer"
            assert "bearer token" in body["error"]
        status, _, body = served.request("/search?q=volcano", headers={"Authorization": "Bearer s3cret-token"})
        assert status == 200 and hits_of(body)
        assert served.request("/info")[0] == 401
        assert served.request("/health")[0] == 200  # for load balancers, which carry no token


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/search?q=volcano&k=101", None, 400, "1 to 100 (the server's --max-k)"),
        ("/search?q=volcano&k=0", None, 400, "out of range"),
        ("/search?q=volcano&k=ten", None, 400, "not a whole number"),
        ("/search?k=3", None, 400, "missing parameter 'q'"),
        ("/search?q=%20", None, 400, "q is empty"),
        ("/search?q=volcano&query=x", None, 400, "unknown parameter 'query'"),
        ("/search?q=volcano&k=1&k=2", None, 400, "more than once"),
        ("/search?q=volcano&mode=fuzzy", None, 400, "unknown mode 'fuzzy'; choose one of dense, lexical, hybrid"),
        ("/search?q=volcano&mode=dense&alpha=0.5", None, 400, "alpha"),
        ("/search?q=volcano&alpha=2", None, 400, "between 0 and 1"),
        ("/search?q=volcano&min_score=nan", None, 400, "not a finite number"),
        ("/search?q=volcano&where=year%20%3E", None, 400, "where 'year >'"),
        ("/search?q=volcano&where=colour%20%3D%201", None, 400, "unknown field 'colour'"),
        ("/search?q=volcano&index=nope", None, 400, "unknown index 'nope'"),
        ("/search", b"{not json", 400, "not valid JSON"),
        ("/search", b"\xff\xfe", 400, "not UTF-8"),
        ("/search", b"[1, 2]", 400, "must be a JSON object"),
        ("/search", b'{"query": "a", "queries": ["b"]}', 400, "either 'query'"),
        ("/search", b'{"queries": []}', 400, "non-empty list"),
        ("/search", b'{"queries": [3]}', 400, "queries[0] must be a text"),
        ("/search", b'{"query": "a", "top_k": 3}', 400, "unknown field 'top_k'"),
        ("/search", b'{"query": "a", "k": true}', 400, "'k' must be a whole number"),
        ("/search", b'{"query": "a", "k": 2.5}', 400, "'k' must be a whole number"),
        ("/search", b'{"query": "a", "mode": 3}', 400, "'mode' must be a string"),
        ("/search", b'{"queries": [{"qid": "a", "text": "x"}, {"qid": "a", "text": "y"}]}', 400, "same qid"),
        ("/search", b'{"queries": [{"qid": "2", "text": "x"}, "y"]}', 400, "same qid"),  # "y" answers as qid 2
        ("/search", json.dumps({"queries": ["q"] * 101}).encode(), 400, "at most 100 (the server's --max-queries)"),
        ("/search", json.dumps({"query": "x" * 2_000_000}).encode(), 413, "larger than 1000000 bytes"),
        ("/nowhere", None, 404, "no such endpoint '/nowhere'"),
    ],
)
def test_bad_requests_get_one_json_error(served_sample, path, body, status, message):
    got, headers, answer = served_sample.request(path, raw=body, method="POST" if body is not None else "GET")
    assert got == status, answer
    assert headers["Content-Type"] == "application/json" and set(answer) == {"error"}
    assert message in answer["error"]
    assert "Traceback" not in answer["error"] and "\n" not in answer["error"]


def test_method_not_allowed_and_client_errors_leave_no_traceback(served_sample):
    status, _, body = served_sample.request("/info", method="POST", raw=b"{}")
    assert status == 405 and body == {"error": "method not allowed"}
    assert "Traceback" not in served_sample.stderr and "error" not in served_sample.stderr.lower()


@pytest.fixture(scope="module")
def served_sample(tmp_path_factory) -> Iterator[Served]:
    """One server for the many bad-request cases (they change nothing)."""
    target = tmp_path_factory.mktemp("served") / "sample-index"
    done = subprocess.run(
        [sys.executable, "-m", "dsearch", "index", str(SAMPLE / "passages.jsonl"), "-o", str(target), "-q"],
        env=server_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    with serving(target) as served:
        yield served


# --- starting and stopping ---------------------------------------------------------------------------------


def test_help_and_import_leave_the_server_stack_alone():
    code = (
        "import sys; from dsearch.cli import run; run(['serve', '--help']); import dsearch; "
        "print([m for m in ('starlette', 'uvicorn', 'anyio') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], env=server_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--token-file" in done.stdout and done.stdout.strip().splitlines()[-1] == "[]"


def test_without_the_serve_extra_it_says_what_to_install(sample_index, tmp_path):
    # Hide starlette, as a plain `pip install dsearch` (without the serve extra) would.
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'starlette': raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    env = server_env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT / "src"), str(TESTS)]))
    done = subprocess.run(
        [sys.executable, "-m", "dsearch", "serve", str(sample_index), "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "dsearch: error: dsearch serve needs starlette, which is not installed; "
        "install it with: pip install 'dsearch[serve]'"
    ]


def run_serve(*args: object, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsearch", "serve", *map(str, args)],
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_startup_errors_are_one_line(sample_index, tmp_path):
    done = run_serve(tmp_path / "missing", "--port", "0")
    assert done.returncode == 1 and done.stdout == ""
    missing = f"{tmp_path / 'missing'}: not a dsearch index (no manifest.json); build one with 'dsearch index'"
    assert done.stderr.strip().splitlines() == [f"dsearch: error: {missing}"]
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    done = run_serve(sample_index, "--port", "0", "--token-file", empty)
    assert done.returncode == 2 and done.stderr.startswith("dsearch: error: --token-file") and "no token" in done.stderr
    with serving(sample_index) as served:
        port = served.url.rsplit(":", 1)[1]
        done = run_serve(sample_index, "--port", port)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1].startswith(f"dsearch: error: cannot listen on 127.0.0.1:{port}")
        assert "choose another --port" in done.stderr


def test_listening_beyond_loopback_without_a_token_warns(sample_index):
    with serving(sample_index, "--host", "0.0.0.0") as served:
        assert "without --token-file" in served.stderr
        assert served.url.startswith("http://0.0.0.0:")
    with serving(sample_index) as served:
        assert "without --token-file" not in served.stderr and served.url.startswith("http://127.0.0.1:")


def test_sigterm_finishes_requests_in_flight_and_exits_0(sample_index):
    with serving(sample_index, env=server_env(DSEARCH_TEST_QUERY_DELAY="1.0")) as served:
        answers: list[tuple[int, dict]] = []

        def ask(q: str) -> None:
            answers.append(served.search(q=q, k=2))

        threads = [threading.Thread(target=ask, args=(q,)) for q in QUERIES]
        for thread in threads:
            thread.start()
        time.sleep(0.4)  # all three are in, the first batch is being encoded
        served.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join()
        code = served.process.wait(30)
        assert code == 0, served.stderr
        assert [status for status, _ in answers] == [200, 200, 200]
        assert all(hits_of(body) for _, body in answers)
        with pytest.raises(urllib.error.URLError):  # no longer accepting
            urllib.request.urlopen(served.url + "/health", timeout=5)
    assert served.stderr.strip().splitlines()[-1] == "dsearch: stopped"
    assert "Traceback" not in served.stderr


# --- hot swap ----------------------------------------------------------------------------------------------


def write_generation(path: Path, generation: int, count: int = 40) -> Path:
    """A corpus whose every passage says which generation it is from (text and a field)."""
    with open(path, "w") as fh:
        for i in range(count):
            text = f"shared words about topic{i % 5} in generation gen{generation} number {i}"
            fh.write(json.dumps({"id": f"p{i}", "text": text, "gen": generation}) + "\n")
    return path


def test_publish_during_a_stream_of_requests(cli, tmp_path):
    index = tmp_path / "live.idx"
    assert cli("index", write_generation(tmp_path / "g1.jsonl", 1), "-o", index).exit_code == 0
    with serving(index) as served:
        stop = threading.Event()
        answers: list[tuple[int, dict]] = []
        requests = [
            {"queries": ["shared words", "topic3 generation"], "k": 10},
            {"query": "shared words topic1", "k": 20, "mode": "hybrid"},
            {"query": "generation number", "k": 5, "where": "gen >= 1", "mode": "lexical"},
        ]

        def stream(offset: int) -> None:
            n = offset
            while not stop.is_set():
                status, _, body = served.request("/search", requests[n % len(requests)])
                answers.append((status, body))
                n += 1

        threads = [threading.Thread(target=stream, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        # A full rebuild, then an --update that changes every passage, so its publish collects the rebuild's segment.
        assert cli("index", write_generation(tmp_path / "g2.jsonl", 2), "-o", index).exit_code == 0
        time.sleep(0.5)
        assert cli("index", write_generation(tmp_path / "g3.jsonl", 3), "-o", index, "--update").exit_code == 0
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join()
    failures = [(status, body) for status, body in answers if status != 200]
    assert not failures, failures[:3]
    generation_of: dict[str, set[int]] = {}
    for _, body in answers:
        generations = {hit["fields"]["gen"] for hit in hits_of(body)}
        assert len(generations) == 1, generations  # one response, one version
        assert all(f"gen{hit['fields']['gen']}" in hit["text"] for hit in hits_of(body))
        generation_of.setdefault(body["version"], set()).update(generations)
    assert all(len(g) == 1 for g in generation_of.values()), generation_of  # a version string names one version
    assert sorted(g.pop() for g in generation_of.values()) == [1, 2, 3]  # moved to each without a restart
    assert len(answers) > 30
    assert "Traceback" not in served.stderr and "error" not in served.stderr.lower()


def test_an_old_version_stays_whole_after_its_files_are_collected(cli, tmp_path):
    """In process: a version opened before a publish still searches (dense, hybrid, where) after the publish
    deleted its segment files; closing it leaves nothing behind."""
    from fakes import HashingEncoder

    from dsearch.search import Query
    from dsearch.serve import Slot, version_opener

    index = tmp_path / "idx"
    assert cli("index", write_generation(tmp_path / "g1.jsonl", 1), "-o", index).exit_code == 0
    encoder = HashingEncoder()
    slot = Slot("idx", index, version_opener(lambda info: encoder))
    old = slot.acquire()
    old_segments = {path for path, _ in old.segments}
    assert cli("index", write_generation(tmp_path / "g2.jsonl", 2), "-o", index).exit_code == 0
    assert not any((index / path).exists() for path in old_segments)  # the publish collected them
    for options in ({}, {"mode": "hybrid"}, {"mode": "lexical", "where": "gen = 1"}):
        [hits] = old.searcher.search([Query("1", "shared words topic2")], 5, **options)
        assert hits and {h.fields["gen"] for h in hits} == {1}, options
    slot.refresh()
    new = slot.acquire()
    [hits] = new.searcher.search([Query("1", "shared words")], 5)
    assert {h.fields["gen"] for h in hits} == {2} and new.id != old.id
    shadow = old.files.shadow
    assert shadow is not None and shadow.exists()
    slot.release(old)  # its last user: now it closes
    assert not shadow.exists() and old.files.fds == []
    slot.release(new)
    slot.close()
    assert new.files.shadow is None


# --- the real model -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_model_serves_what_query_prints(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DSEARCH_TEST_ENCODER"}
    env["PYTHONPATH"] = str(ROOT / "src")
    index = tmp_path / "bundled.idx"
    done = subprocess.run(
        [sys.executable, "-m", "dsearch", "index", str(SAMPLE / "passages.jsonl"), "-o", str(index), "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    expected = subprocess.run(
        [sys.executable, "-m", "dsearch", "query", str(index), *QUERIES, "-k", "5", "--format", "jsonl"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert expected.returncode == 0, expected.stderr
    with serving(index, env=env) as served:
        status, _, body = served.request("/search", {"queries": QUERIES, "k": 5})
        assert status == 200 and hits_of(body) == jsonl(expected.stdout)
        # Concurrent single queries, batched by the server, give the same hits and scores.
        answers: dict[str, dict] = {}
        threads = [
            threading.Thread(target=lambda q=q: answers.__setitem__(q, served.search(q=q, k=5)[1])) for q in QUERIES
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        served_hits = [(h["query"], h["id"], h["rank"], h["score"]) for q in QUERIES for h in hits_of(answers[q])]
        assert served_hits == [(h["query"], h["id"], h["rank"], h["score"]) for h in jsonl(expected.stdout)]


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="the README's examples use curl and jq")
def test_readme_serving_examples_run_as_shown(tmp_path):
    """The ```console-serve blocks of README.md, against `dsearch serve sample.idx` (the bundled model)."""
    text = (ROOT / "README.md").read_text()
    examples: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console-serve\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                examples.append((line[2:], []))
            elif examples:
                examples[-1][1].append(line)
    assert len(examples) >= 4
    env = {k: v for k, v in os.environ.items() if k != "DSEARCH_TEST_ENCODER"}
    env["PYTHONPATH"] = str(ROOT / "src")
    (tmp_path / "sample_corpus").symlink_to(SAMPLE)
    done = subprocess.run(
        [sys.executable, "-m", "dsearch", "index", "sample_corpus/passages.jsonl", "-o", "sample.idx", "-q"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with serving(tmp_path / "sample.idx", env=env) as served:
        for command, shown in examples:
            result = subprocess.run(
                ["bash", "-o", "pipefail", "-c", command.replace("http://127.0.0.1:8000", served.url)],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert result.returncode == 0, f"{command}\n{result.stderr}"
            assert result.stdout.splitlines() == shown, command


@pytest.mark.parametrize("damage", ["missing", "fifo"])
def test_a_damaged_version_is_refused_at_once(sample_index, damage):
    """A listed file that is gone, or a FIFO in its place (which would block a plain open), is a one-line
    IndexDirError; nothing is left open."""
    from dsearch.errors import IndexDirError
    from dsearch.serve import PinnedFiles

    [segment] = [p for p in sample_index.iterdir() if p.name.startswith("seg-")]
    (segment / "passages.parquet").unlink()
    if damage == "fifo":
        os.mkfifo(segment / "passages.parquet")
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(IndexDirError, match="missing|not a regular file"):
        PinnedFiles(sample_index)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_killed_servers_private_directories_are_swept_at_the_next_start(sample_index, tmp_path):
    """SIGKILL leaves a version's private directory in the temp folder; the next server removes it (and leaves
    a live server's alone)."""
    env = server_env(TMPDIR=str(tmp_path))
    killed = start(sample_index, "--port", "0", env=env)
    deadline = time.time() + 60
    while not list(tmp_path.glob("dsearch-serve-*")) and time.time() < deadline:
        time.sleep(0.1)
    killed.kill()
    killed.wait(30)
    [left] = list(tmp_path.glob("dsearch-serve-*"))
    assert left.name.startswith(f"dsearch-serve-{killed.pid}-")
    with serving(sample_index, env=env) as served:
        assert not left.exists()
        [mine] = list(tmp_path.glob("dsearch-serve-*"))
        assert mine.name.startswith(f"dsearch-serve-{served.process.pid}-")
    assert not list(tmp_path.glob("dsearch-serve-*"))  # a clean stop leaves nothing
    killed.stdout.close()
    killed.stderr.close()


def test_lexical_or_hybrid_on_an_index_without_bm25_is_the_clients_400_not_a_503(cli, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "text": f"volcano {i}"}) + "\n" for i in range(5)))
    assert cli("index", corpus, "-o", tmp_path / "dense.idx", "--no-lexical", "-q").exit_code == 0
    with serving(tmp_path / "dense.idx") as served:
        for params in ({"mode": "lexical"}, {"mode": "hybrid"}, {"alpha": "0.5"}):
            status, body = served.search(q="volcano", **params)
            assert status == 400, body
            assert body == {"error": "dense.idx: this index has no lexical (BM25) index (built with --no-lexical); "
                            "search it with mode dense"}  # fmt: skip
        status, body = served.search(q="volcano", k=2)
        assert status == 200 and len(hits_of(body)) == 2
        assert served.request("/health")[0] == 200  # the index itself is fine


def test_a_new_version_that_cannot_load_its_model_names_the_cli_flag(cli, tmp_path):
    """In process: a publish whose model cannot be loaded here (a new model, not in this machine's cache) keeps the
    old version serving; the error the server logs and /health shows names `dsearch`'s flags (--model PATH), not
    the Python API's parameters (model=PATH)."""
    from fakes import HashingEncoder

    from dsearch.encoder import MODEL_PATH
    from dsearch.errors import ModelError
    from dsearch.serve import Slot, version_opener

    index = tmp_path / "idx"
    assert cli("index", write_generation(tmp_path / "g1.jsonl", 1), "-o", index).exit_code == 0
    encoder, loads = HashingEncoder(), []

    def load_encoder(info):
        loads.append(info.name)
        if len(loads) > 1:
            raise ModelError(f"cannot load model {info.name!r}: copy the model folder here and pass {MODEL_PATH}")
        return encoder

    slot = Slot("idx", index, version_opener(load_encoder))
    first = slot.current.id
    assert cli("index", write_generation(tmp_path / "g2.jsonl", 2), "-o", index).exit_code == 0
    slot.refresh()
    assert slot.current.id == first and len(loads) == 2
    assert slot.error == (
        "cannot load model 'hash-test': copy the model folder here and pass --model PATH; "
        "still serving the version opened before"
    )
    slot.close()


def test_a_top_up_with_an_encoding_error_and_mixed_modes_answers_every_request_once_from_one_version():
    # Requests that arrive while the first one is encoded join the batch: an encoding error answers only the
    # dense ones it was encoded with, a lexical one is searched anyway, and every request is encoded and searched
    # with the version acquired for the batch, even when a new one is published meanwhile.
    from types import SimpleNamespace

    import numpy as np

    from dsearch import serve
    from dsearch.search import Query

    answers: dict[int, list[int]] = {}

    class Loop:
        def call_soon_threadsafe(self, settle, future, value):  # type: ignore[no-untyped-def]
            answers.setdefault(future, []).append(value[0])

    class Searcher:
        def __init__(self, name: str) -> None:
            self.version, self.encoded, self.searched = name, 0, []

        def encode_queries(self, texts):  # type: ignore[no-untyped-def]
            self.encoded += 1
            if self.encoded == 1:
                for job in late:  # these arrive while the first request is encoded
                    batcher.queue.put(job)
            if any("bad" in text for text in texts):
                raise serve.InputError("bad", "cannot encode this", "rephrase it")
            return np.full((len(texts), 4), self.encoded, np.float32)

        def search(self, queries, k, mode=None, alpha=None, where=None, min_score=None, vectors=None):  # type: ignore[no-untyped-def]
            assert (vectors is None) == (mode == "lexical") and (vectors is None or len(vectors) == len(queries))
            self.searched.append([q.text for q in queries])
            return [[] for _ in queries]

    versions = []

    class Slot:
        name, directory = "a", "/nowhere"

        def refresh(self) -> None:
            pass

        def acquire(self):  # type: ignore[no-untyped-def]
            searcher = Searcher(f"v{len(versions) + 1}")  # every acquire sees a newly published version
            versions.append(searcher)
            return SimpleNamespace(
                searcher=searcher, files=SimpleNamespace(shadow=None), info={"lexical": True}, id=searcher.version
            )

        def release(self, version) -> None:  # type: ignore[no-untyped-def]
            pass

    slot = Slot()

    def job(number: int, text: str, mode: str | None = None) -> serve.Job:
        return serve.Job(slot, [Query(str(number), text)], 3, mode, None, None, None, Loop(), number)  # type: ignore[arg-type]

    late = [job(2, "bad query"), job(3, "words", "lexical"), job(4, "good"), job(5, "hybrid words", "hybrid")]
    batcher = serve.Batcher([], serve.Limits())
    batcher.queue.put(job(1, "first"))
    batcher.start()
    deadline = time.monotonic() + 5
    while len(answers) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    batcher.stop()
    assert answers == {1: [200], 2: [400], 3: [200], 4: [400], 5: [400]}  # 2, 4 and 5 were encoded together
    assert len(versions) == 1 and sorted(versions[0].searched) == [["first"], ["words"]]
