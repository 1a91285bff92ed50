"""`dsearch serve` under load: latency and throughput at 1, 4 and 16 concurrent clients, and a soak with publishes.

    flock /work/notes/bench.lock python benchmarks/serve_bench.py [--passages 100000] [--seconds 20]
        [--clients 1,4,16] [--soak 180] [--publish-every 5] [--index-type hnsw] [--baseline-src SRC]
        [--vectors /work/ann-data/scifact_sentences.npy]

Builds a 100k-passage index for the bundled all-MiniLM-L6-v2 at its default precision (int8): SciFact sentences
with random unit vectors, written through dsearch's own writer (benchmarks/synthetic.py), or with --vectors the
real vectors of real SciFact texts (what an ANN index needs to be measured: see ``build``); the queries are SciFact's
1,109 real questions, encoded by the real int8 model in the server. Starts `dsearch serve` as its own process,
then for each client count runs that many client threads, each with one keep-alive connection sending
`GET /search?q=…&k=10` back to back, for --seconds after a short warm-up: p50/p99 latency and queries/s. The load
generator shares the machine's cores with the server: its own CPU time and the server's are both reported (per
request), so the figures can be read with that in mind. As baselines from the same run: a cold
`dsearch query DIR "text"` (what a program pays per question without a server), and with --baseline-src the same
load against a server running another checkout's src/ (an earlier version of serve). With --index-type, the
recall@10 of the served answers against the exact index's, on 300 of the real queries.

Soak: --soak seconds of 4 clients while another thread republishes the index every --publish-every seconds (a
full rebuild of the same passages: every publish collects the previous version's files);
counts failed requests and responses from each version, and samples the server's open files and memory (VmRSS,
and RssAnon: memory that is not a mapped file) at the start, every 10 s, and at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import synthetic  # noqa: E402
from synthetic import scifact_sentences, write_random_index  # noqa: E402

from dsearch.corpus import Passage  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
TICKS = os.sysconf("SC_CLK_TCK")


def real_texts(limit: int) -> list[str]:
    """The texts whose vectors /work/ann-data/scifact_sentences.npy holds, in its row order (the recipe of the
    script that encoded them, RESULTS.md "Approximate and compressed indexes"): SciFact titles and sentences,
    then consecutive sentence pairs, then triples."""
    docs = [json.loads(line) for line in open(synthetic.SCIFACT / "corpus.jsonl")]
    split = [[s.strip() for s in re.split(r"(?<=[.!?])\s+", d["text"]) if len(s.strip()) > 20] for d in docs]
    texts: list[str] = []
    for doc, sentences in zip(docs, split, strict=True):
        texts += [doc["title"], *sentences]
    for width in (2, 3):
        for sentences in split:
            texts += [" ".join(sentences[i : i + width]) for i in range(len(sentences) - width + 1)]
    return texts[:limit]


def build(target: Path, n: int, vectors: Path | None = None) -> None:
    """The benchmark's index; called again on an existing one it republishes (a new manifest and segment).

    Without ``vectors``: SciFact sentences with random unit vectors. Random 384-d vectors have no neighbourhood
    structure, so an ANN index built on them needs its largest search effort (HNSW tuned itself to efSearch 1024
    and still reached only 0.86 recall@10) and says nothing about ANN speed on real embeddings. With ``vectors``
    (the real int8 all-MiniLM-L6-v2 vectors of ``real_texts``): real passages with their real vectors, so the
    real queries find real neighbours and an ANN index is tuned as it would be in use.
    """
    if vectors is None:
        passages = (Passage(pid, text, None, "scifact-sentences") for pid, text in scifact_sentences(n))
        write_random_index(target, passages)
        return
    import numpy as np

    from dsearch.encoder import load_encoder
    from dsearch.indexer import describe_sources, model_info, new_manifest
    from dsearch.store import SegmentWriter, content_hash, passage_row, publish, staging_area

    stored = np.load(vectors, mmap_mode="r")
    texts = real_texts(n)
    if len(stored) < n or len(texts) < n:
        raise SystemExit(f"{vectors}: holds {len(stored)} vectors for {len(texts)} texts; --passages asks {n}")
    info = model_info(load_encoder(None, "auto"))
    with staging_area(target) as staging:
        writer = SegmentWriter(staging.segment_dir, info.dim)
        for start in range(0, n, 5000):
            chunk = [Passage(f"s{row}", texts[row], None, "scifact-real") for row in range(start, min(n, start + 5000))]
            rows = [passage_row(p, content_hash(p.encoder_text)) for p in chunk]
            writer.add(rows, np.asarray(stored[start : start + len(chunk)], dtype=np.float32))
        segment = writer.close()
        publish(staging, new_manifest(info, segment, {"sources": describe_sources([])}, {}))


def start_server(index: Path, src: Path | None = None) -> tuple[subprocess.Popen, str, list[str]]:
    """``dsearch serve`` on a free port; ``src``: another checkout's src/ (the baseline) instead of this one."""
    env = {**ENV, "PYTHONPATH": str(src)} if src else ENV
    process = subprocess.Popen(
        [sys.executable, "-m", "dsearch", "serve", str(index), "--port", "0", "--queue", "1024"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stderr:
            lines.append(line)
            if " at http://" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(120) or process.poll() is not None:
        raise SystemExit("the server did not start:\n" + "".join(lines))
    url = next(line.split(" at ")[-1].strip() for line in lines if " at http://" in line)
    return process, url, lines


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def memory(pid: int) -> dict[str, int]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {
        "open_files": len(os.listdir(f"/proc/{pid}/fd")),
        "vm_rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
        "rss_anon_mib": round(int(status["RssAnon"].split()[0]) / 1024, 1),
    }


class Client:
    """One keep-alive connection sending GET /search back to back."""

    def __init__(self, url: str, queries: list[str], offset: int) -> None:
        parts = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.queries, self.n = queries, offset
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.versions: dict[str, int] = {}

    def one(self) -> None:
        q = self.queries[self.n % len(self.queries)]
        self.n += 7
        started = time.perf_counter()
        try:
            self.connection.request("GET", "/search?" + urllib.parse.urlencode({"q": q, "k": 10}))
            response = self.connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
            self.connection.close()
            return
        self.latencies.append(time.perf_counter() - started)
        if response.status != 200:
            self.failures.append(f"{response.status}: {body[:200]!r}")
        else:
            version = json.loads(body)["version"]
            self.versions[version] = self.versions.get(version, 0) + 1

    def run_until(self, deadline: float) -> None:
        while time.perf_counter() < deadline:
            self.one()


def load(url: str, pid: int, queries: list[str], clients: int, seconds: float, warmup: float = 3.0) -> dict:
    pool = [Client(url, queries, n * 101) for n in range(clients)]
    threads = [threading.Thread(target=c.run_until, args=(time.perf_counter() + warmup,)) for c in pool]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for c in pool:
        c.latencies.clear()
    own, server = os.times(), process_cpu(pid)
    started = time.perf_counter()
    threads = [threading.Thread(target=c.run_until, args=(started + seconds,)) for c in pool]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    after = os.times()
    latencies = sorted(x for c in pool for x in c.latencies)
    n = len(latencies)
    return {
        "clients": clients,
        "requests": n,
        "failed": sum(len(c.failures) for c in pool),
        "p50_ms": round(1000 * latencies[n // 2], 2),
        "p99_ms": round(1000 * latencies[min(n - 1, int(n * 0.99))], 2),
        "queries_per_s": round(n / elapsed, 1),
        "server_cpu_ms_per_query": round(1000 * (process_cpu(pid) - server) / n, 2),
        "loadgen_cpu_ms_per_query": round(1000 * ((after.user - own.user) + (after.system - own.system)) / n, 2),
    }


def soak(url: str, pid: int, index: Path, queries: list[str], seconds: float, every: float, passages: int) -> dict:
    pool = [Client(url, queries, n * 101) for n in range(4)]
    samples = [{"t": 0, **memory(pid)}]
    deadline = time.perf_counter() + seconds
    threads = [threading.Thread(target=c.run_until, args=(deadline,)) for c in pool]
    for thread in threads:
        thread.start()
    publishes, started = 0, time.perf_counter()
    next_sample = started + 10
    while time.perf_counter() < deadline - every:
        time.sleep(every)
        build(index, passages)
        publishes += 1
        if time.perf_counter() >= next_sample:
            samples.append({"t": round(time.perf_counter() - started), **memory(pid)})
            next_sample += 10
    for thread in threads:
        thread.join()
    time.sleep(2)  # the idle poll lets go of the last old version
    samples.append({"t": round(time.perf_counter() - started), **memory(pid)})
    versions: dict[str, int] = {}
    for c in pool:
        for v, count in c.versions.items():
            versions[v] = versions.get(v, 0) + count
    return {
        "seconds": round(time.perf_counter() - started),
        "publishes": publishes,
        "requests": sum(len(c.latencies) for c in pool),
        "failed": sum(len(c.failures) for c in pool),
        "failures": [f for c in pool for f in c.failures][:5],
        "versions_answered": len(versions),
        "samples": samples,
    }


RECALL_QUERIES = 300  # queries whose served top-10 is compared with the exact top-10


def exact_top10(index: Path, queries: list[str]) -> list[list[str]]:
    """The exact (flat) top-10 passage ids of each query, in-process, before the index is made approximate."""
    from dsearch.api import Searcher

    with Searcher(index, load_encoder=True) as searcher:
        return [[h.id for h in hits] for hits in searcher.search(queries, 10)]


def served_top10(url: str, queries: list[str]) -> list[list[str]]:
    """The served top-10 passage ids of each query (one POST of many queries at a time)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    out: list[list[str]] = []
    for start in range(0, len(queries), 50):
        body = json.dumps({"queries": queries[start : start + 50], "k": 10})
        connection.request("POST", "/search", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise SystemExit(f"recall queries failed: {response.status} {answer}")
        out += [[h["id"] for h in result["hits"]] for result in answer["results"]]
    connection.close()
    return out


def recall_at_10(exact: list[list[str]], served: list[list[str]]) -> float:
    return round(sum(len(set(e) & set(s)) for e, s in zip(exact, served, strict=True)) / (10 * len(exact)), 4)


def cold_query(index: Path, query: str, runs: int = 3) -> float:
    dsearch = str(Path(sys.executable).with_name("dsearch"))
    times = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        subprocess.run([dsearch, "query", str(index), query, "-f", "jsonl"], env=ENV, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--soak", type=float, default=0, help="seconds of soak with publishes (0: none)")
    parser.add_argument("--publish-every", type=float, default=5)
    parser.add_argument("--index-type", help="rebuild the ANN structure with `dsearch reindex --index-type` first")
    parser.add_argument("--baseline-src", type=Path, help="also measure a server running this src/ (same run)")
    parser.add_argument("--scifact", type=Path, default=synthetic.SCIFACT, help="the SciFact folder (corpus, queries)")
    parser.add_argument(
        "--vectors",
        type=Path,
        help="real vectors of the texts real_texts() lists (/work/ann-data/scifact_sentences.npy) instead of random",
    )
    args = parser.parse_args()
    synthetic.SCIFACT = args.scifact  # a git worktree sits elsewhere than ../shared
    queries = [json.loads(line)["text"] for line in open(args.scifact / "queries.jsonl")]
    with tempfile.TemporaryDirectory() as name:
        index = Path(name) / "idx"
        build(index, args.passages, args.vectors)
        results: dict = {
            "passages": args.passages,
            "cpus": os.cpu_count(),
            "index_type": "flat",
            "vectors": str(args.vectors) if args.vectors else "random",
            "load_average_start": os.getloadavg(),
        }
        exact = exact_top10(index, queries[:RECALL_QUERIES]) if args.index_type else None
        if args.index_type:
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "dsearch", "reindex", str(index), "--index-type", args.index_type, "-q"],
                env=ENV,
                check=True,
            )
            results["index_type"] = args.index_type
            results["reindex_s"] = round(time.perf_counter() - started, 1)
        results["cold_dsearch_query_s"] = round(cold_query(index, queries[0]), 3)
        levels = [int(c) for c in args.clients.split(",") if c]
        if args.baseline_src:
            process, url, _ = start_server(index, args.baseline_src)
            try:
                results["baseline_load"] = [load(url, process.pid, queries, c, args.seconds) for c in levels]
            finally:
                process.terminate()
                process.wait(60)
        process, url, lines = start_server(index)
        try:
            results["load"] = [load(url, process.pid, queries, c, args.seconds) for c in levels]
            if exact is not None:  # what the served answers lose against the exact index, on real queries
                results["recall_at_10_vs_exact"] = recall_at_10(exact, served_top10(url, queries[:RECALL_QUERIES]))
            if args.soak:
                results["soak"] = soak(url, process.pid, index, queries, args.soak, args.publish_every, args.passages)
        finally:
            process.terminate()
            results["server_exit"] = process.wait(60)
        results["server_stderr_tail"] = "".join(lines[-5:])
        results["load_average_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
