"""``dsearch index --ray`` against a real local Ray cluster: the same index as a local build, a killed worker
retried, a killed driver resumed, ``--update`` sending only what changed, the GPU path's plumbing.

The cluster is started once per session (``ray start --head`` on 127.0.0.1 with two CPUs and one declared GPU, a
resource with no device behind it: benchmarks/ray_cluster.py) and exactly its processes are killed afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE

pytest.importorskip("ray", reason='the ray extra is not installed (pip install "dsearch[ray]")')

from ray_cluster import free_port, local_cluster  # noqa: E402 (benchmarks/, on sys.path through conftest)

from dsearch.store import OpenIndex  # noqa: E402

pytestmark = pytest.mark.slow
DSEARCH = [sys.executable, "-m", "dsearch"]


@pytest.fixture(scope="session")
def ray_cluster():
    try:
        with local_cluster(cpus=2, gpus=1) as address:
            yield address
    except RuntimeError as exc:
        pytest.fail(str(exc))


def _corpus(n: int, long_every: int = 10) -> str:
    """``n`` passages from the sample corpus's texts; every ``long_every``-th is long enough to be split."""
    texts = [json.loads(line)["text"] for line in (SAMPLE / "passages.jsonl").read_text().splitlines()]
    rows = []
    for i in range(n):
        parts = 12 if i % long_every == 0 else 1
        text = " ".join(texts[(i * 7 + j) % len(texts)] for j in range(parts))
        rows.append({"_id": f"p{i}", "title": f"T{i % 7}", "text": text})
    return "".join(json.dumps(row) + "\n" for row in rows)


def _finish(process: subprocess.Popen, timeout: float, hung: str) -> tuple[str, str]:
    """The process's stdout and stderr once it ends; a test failure saying ``hung`` (the process killed) if it
    has not ended within ``timeout`` seconds."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(hung)


def _index(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*DSEARCH, "index", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def _assert_same_index(a: Path, b: Path) -> None:
    """The same ids and windows in the same rows, and vectors equal to fp32 rounding."""
    first, second = OpenIndex(a), OpenIndex(b)
    columns = ("id", "content_hash", "window_start", "window_end")
    assert list(first.iter_rows(columns)) == list(second.iter_rows(columns))
    rows = list(range(first.manifest.rows))
    assert first.manifest.rows == second.manifest.rows > 0
    np.testing.assert_allclose(first.vectors_at(rows), second.vectors_at(rows), rtol=0, atol=1e-6)
    assert first.manifest.model.precision == second.manifest.model.precision == "fp32"


@pytest.fixture(scope="module")
def ray_setup(tmp_path_factory, tiny_seed_model):
    """A corpus, the model options, and its local build to compare every Ray build with."""
    root = tmp_path_factory.mktemp("ray")
    corpus = root / "corpus.jsonl"
    corpus.write_text(_corpus(800))
    common = ["--model", tiny_seed_model, "--precision", "fp32", "--batch-size", "16"]
    local = root / "local.idx"
    result = _index(corpus, "-o", local, *common)
    assert result.returncode == 0, result.stderr
    return root, corpus, common, local


def test_ray_build_equals_the_local_build(ray_cluster, ray_setup):
    root, corpus, common, local = ray_setup
    target = root / "ray.idx"
    result = _index(corpus, "-o", target, *common, "--ray", "--ray-address", ray_cluster, "--workers", "2", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # stdout holds the summary only: nothing of Ray's
    assert summary["indexed"] == 800 and summary["encoded"] == 800 and summary["windows"] > 800
    assert summary["precision"] == "fp32"
    assert "error" not in result.stderr.lower()
    _assert_same_index(local, target)
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["stats"]["workers"] == 2
    assert "workers" not in json.loads((local / "manifest.json").read_text())["stats"]


def test_a_killed_worker_is_retried_and_the_index_is_complete(ray_cluster, ray_setup):
    root, corpus, common, local = ray_setup
    target = root / "killed-worker.idx"
    marker = root / "worker-killed"
    env = {**os.environ, "DSEARCH_TEST_FAULT": f"worker-killed:{marker}"}
    args = (corpus, "-o", target, *common, "--ray", "--ray-address", ray_cluster, "--workers", "2", "-v")
    result = _index(*args, env=env)
    assert marker.exists()  # a worker did kill itself mid-run (SIGKILL, on its second chunk)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # Ray prints a worker's death on stdout: dsearch routes it to its log
    assert "WARNING: ray (raylet): A worker died or was killed" in result.stderr
    # Ray Data's actor pool (map_batches with dsearch's callable class) retried the killed worker's chunk.
    assert "Task MapWorker(MapBatches(_Worker)).submit failed. There are 3 retries remaining" in result.stderr
    _assert_same_index(local, target)


def test_a_killed_read_task_is_retried_and_the_index_is_complete(ray_cluster, ray_setup):
    """The Dataset's one read task (it hands the workers the driver's chunks) killed mid-run: Ray retries it from
    chunk 0, the chunks the driver already has go on empty, and the build neither hangs nor loses a chunk."""
    root, corpus, common, local = ray_setup
    target = root / "killed-reader.idx"
    marker = root / "reader-killed"
    env = {**os.environ, "DSEARCH_TEST_FAULT": f"reader-killed:{marker}", "DSEARCH_RAY_IN_FLIGHT": "2"}
    args = (corpus, "-o", target, *common, "--ray", "--ray-address", ray_cluster, "--workers", "2", "-v")
    result = _index(*args, env=env)
    assert marker.exists()  # the read task did kill itself (SIGKILL, before handing on chunk 2)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    _assert_same_index(local, target)


def test_a_worker_that_keeps_dying_ends_the_run_with_exit_3(ray_cluster, ray_setup):
    root, corpus, common, local = ray_setup
    target = root / "dying.idx"
    shutil.copytree(local, target)
    old_manifest = (target / "manifest.json").read_bytes()
    env = {**os.environ, "DSEARCH_TEST_FAULT": "worker-killed-always", "DSEARCH_CHECKPOINT_SECONDS": "0"}
    ray_args = ("--ray", "--ray-address", ray_cluster, "--workers", "1")
    result = _index(corpus, "-o", target, *common, *ray_args, env=env)
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    error = [line for line in result.stderr.splitlines() if line.startswith("dsearch: error: ")]
    assert len(error) == 1 and error[0].startswith("dsearch: error: a Ray worker died 4 times (")
    assert error[0].endswith("nothing was published (rerun the same command to resume from the last checkpoint)")
    assert result.stderr.splitlines()[-1] == error[0]
    assert (target / "manifest.json").read_bytes() == old_manifest
    # What the message promises: the chunks written before the worker gave up are not encoded again.
    resumed = _index(corpus, "-o", target, *common, *ray_args, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_at"] > 0
    _assert_same_index(local, target)


def test_a_killed_driver_leaves_the_index_and_the_rerun_resumes(ray_cluster, ray_setup):
    root, corpus, common, local = ray_setup
    target = root / "killed-driver.idx"
    old = _index(SAMPLE / "passages.jsonl", "-o", target, *common)
    assert old.returncode == 0, old.stderr
    old_manifest = (target / "manifest.json").read_bytes()
    ray_args = ("--ray", "--ray-address", ray_cluster, "--workers", "2")
    env = {**os.environ, "DSEARCH_CHECKPOINT_SECONDS": "0", "DSEARCH_TEST_FAULT": "checkpointed"}
    killed = _index(corpus, "-o", target, *common, *ray_args, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (target / "manifest.json").read_bytes() == old_manifest  # the published index is untouched

    resumed = _index(corpus, "-o", target, *common, *ray_args, "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert 0 < summary["resumed_at"] < 800 and summary["indexed"] == 800
    assert summary["encoded"] == 800 - summary["resumed_at"]  # only what the checkpoint did not hold was sent
    # Chunks in flight when the driver died were counted once they were read, but checkpointed only once written:
    # the resumed counts must not hold them twice.
    assert summary["added"] == 800
    _assert_same_index(local, target)


def test_update_with_ray_sends_only_new_and_changed_passages(ray_cluster, ray_setup):
    root, corpus, common, local = ray_setup
    target = root / "update.idx"
    shutil.copytree(local, target)
    lines = corpus.read_text().splitlines()
    changed = [json.loads(line) for line in lines]
    for i in (3, 10, 500):  # p10 and p500 are long: split into windows
        changed[i]["text"] += " A sentence that was not there before."
    changed.append({"_id": "new-1", "text": "A passage about volcanoes and lava."})
    new_corpus = root / "changed.jsonl"
    new_corpus.write_text("".join(json.dumps(row) + "\n" for row in changed))

    # The cluster from RAY_ADDRESS, as on a node of an existing cluster, where Ray sets it.
    args = (new_corpus, "-o", target, *common, "--update", "--ray", "--workers", "2")
    result = _index(*args, "--json", "-v", env={**os.environ, "RAY_ADDRESS": ray_cluster})
    assert result.returncode == 0, result.stderr
    # dsearch's lines only: not Ray Data's warning (with its source line) about a pool of two workers for one chunk
    assert [line for line in result.stderr.splitlines() if not re.match(r"\S+ dsearch |updated ", line)] == []
    summary = json.loads(result.stdout)
    assert (summary["added"], summary["updated"], summary["encoded"]) == (1, 3, 4)
    # The driver counts the texts it shipped: the windows of the 4 passages, nothing else.
    windows = sum(1 for row in OpenIndex(target).iter_rows(("id",)) if row["id"] in {"p3", "p10", "p500", "new-1"})
    assert f"ray: connected to {ray_cluster} " in result.stderr
    assert f"ray: sent {windows} texts to 2 workers\n" in result.stderr
    rebuilt = root / "update-local.idx"
    assert _index(new_corpus, "-o", rebuilt, *common).returncode == 0
    _assert_same_index(rebuilt, target)


def test_one_dataset_streams_the_whole_build_in_corpus_order(ray_cluster, ray_setup):
    """The build is one Ray Dataset (one actor pool), fed chunk by chunk while the driver reads; with the driver
    holding only two chunks at a time (DSEARCH_RAY_IN_FLIGHT=2), each chunk must travel through Ray Data on its own
    as soon as it is submitted, or the build would wait for ever; the rows still come back in corpus order."""
    root, corpus, common, local = ray_setup
    target = root / "in-flight.idx"
    env = {**os.environ, "DSEARCH_RAY_IN_FLIGHT": "2"}  # 7 chunks of 128 passages for 800, two at a time
    args = (corpus, "-o", target, *common, "--ray", "--ray-address", ray_cluster, "--workers", "2", "-vv", "--json")
    result = _index(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["indexed"] == 800
    assert result.stderr.count("first vectors back") == 1  # one Dataset for the whole build
    _assert_same_index(local, target)


def test_the_actor_pool_lasts_the_whole_build(ray_cluster, tiny_seed_model):
    """Chunks submitted one at a time, each after the previous one's vectors came back (as the driver does once it
    holds its in-flight bound), all go to the same actors: the pool starts once per build, not per batch of chunks.
    The workers here answer with their process id in place of vectors."""
    from dsearch.distributed import RayEncoder
    from dsearch.encoder import load_encoder

    class PidWorker:
        def __init__(self, spec) -> None:
            self.dim = spec.dim

        def __call__(self, batch):
            import pyarrow as pa

            sizes = [len(texts) for texts in batch["texts"].to_pylist()]
            vectors = [np.full((size, self.dim), os.getpid(), dtype=np.float32).tobytes() for size in sizes]
            return pa.table({"chunk": batch["chunk"], "vectors": vectors, "error": [""] * len(sizes)})

    driver = load_encoder(str(tiny_seed_model), "fp32")
    chunks = type("PidRay", (RayEncoder,), {"worker_class": PidWorker})(ray_cluster, 2)
    pids = []
    try:
        for i in range(8):
            vectors = chunks.result(chunks.submit(driver, [f"passage {i}-{j}" for j in range(i + 1)]))
            assert vectors.shape == (i + 1, driver.dim)
            pids.append(int(vectors[0, 0]))
    finally:
        chunks.close()
    assert len(set(pids)) <= 2  # two actors for the eight chunks (a pool per chunk would have made eight)
    assert all(pid > 0 for pid in pids)


def test_gpu_workers_get_a_gpu_and_the_manifest_records_fp16(ray_cluster, ray_setup):
    """No GPU here (none is lent to these tests): ``DSEARCH_TEST_FAULT=fake-cuda`` makes the workers' CUDA probe
    say yes and runs the GPU worker's fp16 model on the CPU. What is real: ``--precision auto`` choosing fp16, the
    actor asking Ray for a GPU (a worker given none refuses, so the run would fail), the manifest recording fp16,
    and fp16 vectors within cosine 0.999 of the fp32 build's."""
    root, corpus, common, local = ray_setup
    target = root / "gpu.idx"
    model = common[common.index("--model") + 1]
    args = (corpus, "-o", target, "--model", model, "--batch-size", "16", "--ray", "--ray-address", ray_cluster)
    env = {**os.environ, "DSEARCH_TEST_FAULT": "fake-cuda"}
    result = _index(*args, "--gpus-per-worker", "1", "--json", "-v", env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["indexed"] == 800 and summary["precision"] == "fp16"
    # One GPU in the cluster, one per worker: one worker, whatever the CPUs would allow.
    assert "(2 CPUs, 1 GPUs); 1 workers of 1 CPUs, 1 GPUs each" in result.stderr
    assert "ray: 1 workers will load " in result.stderr and "(fp16, cuda)" in result.stderr
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["model"]["precision"] == "fp16" and manifest["stats"]["workers"] == 1
    gpu, cpu = OpenIndex(target), OpenIndex(local)
    columns = ("id", "window_start", "window_end")
    assert list(gpu.iter_rows(columns)) == list(cpu.iter_rows(columns))
    rows = list(range(cpu.manifest.rows))
    a, b = gpu.vectors_at(rows), cpu.vectors_at(rows)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.999
    assert not np.array_equal(a, b)  # they did go through fp16


def test_a_worker_with_other_model_files_refuses_through_ray_data(ray_cluster, tiny_seed_model):
    """A worker whose model files are not the driver's refuses its chunk; the driver gets that one-line
    ModelError back out of Ray Data (which would otherwise pass on only a traceback's text)."""
    from dsearch.distributed import RayEncoder
    from dsearch.encoder import load_encoder
    from dsearch.errors import ModelError

    driver = load_encoder(str(tiny_seed_model), "fp32")
    real = driver.fingerprint
    driver.fingerprint = "0" * 32  # what the driver has; the worker loads the real files
    chunks = RayEncoder(ray_cluster, 1)
    try:
        handle = chunks.submit(driver, ["a passage about volcanoes"])
        assert chunks.spec.fingerprint != real
        with pytest.raises(ModelError) as caught:
            chunks.result(handle)
    finally:
        chunks.close()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"model {str(tiny_seed_model)!r} on worker ")
    assert "where the driver has 00000000000000000000000000000000" in message
    assert message.endswith("install the same model files on every node")


def test_an_unreachable_address_fails_in_seconds(tmp_path):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    result = _index(SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", "--ray", "--ray-address", f"127.0.0.1:{port}")
    assert time.monotonic() - started < 20  # ray.init alone would retry for minutes
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"dsearch: error: cannot reach a Ray cluster at 127.0.0.1:{port} (Connection refused); start one "
        "(ray start --head) or give the address of its head node with --ray-address"
    ]
    assert not (tmp_path / "idx").exists()


def test_a_bad_line_read_after_chunks_were_sent_ends_the_run_at_once(ray_cluster, ray_setup):
    """An error in the driver between a submit and its result (a bad corpus line, read once chunks are on their
    way): close() ends the Dataset and the run exits 1 with the parser's one line, without waiting on the workers."""
    root, corpus, common, local = ray_setup
    lines = corpus.read_text().splitlines(keepends=True)
    broken = root / "broken.jsonl"
    broken.write_text("".join(lines[:600]) + "{not json\n" + "".join(lines[600:]))
    target = root / "broken.idx"
    env = {**os.environ, "DSEARCH_RAY_IN_FLIGHT": "2"}
    started = time.monotonic()
    args = (broken, "-o", target, *common, "--ray", "--ray-address", ray_cluster, "--workers", "2", "-v")
    result = _index(*args, env=env)
    assert time.monotonic() - started < 120
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    error = [line for line in result.stderr.splitlines() if line.startswith("dsearch: error: ")]
    assert len(error) == 1 and "601" in error[0], result.stderr
    assert result.stderr.splitlines()[-1] == error[0]
    sent = [line for line in result.stderr.splitlines() if "ray: sent " in line]
    assert sent and int(sent[0].split("ray: sent ")[1].split()[0]) > 0  # chunks were on their way to the workers
    assert not (target / "manifest.json").exists()


def test_ctrl_c_during_a_ray_build_exits_3_without_a_hang(ray_cluster, ray_setup):
    """Ctrl-C while the driver waits for vectors: close() ends the Dataset's read task and the run exits 3."""
    root, corpus, common, local = ray_setup
    big = root / "big.jsonl"
    big.write_text(_corpus(6000))
    target = root / "interrupted.idx"
    args = [big, "-o", target, *common, "--ray", "--ray-address", ray_cluster, "--workers", "2", "-v"]
    process = subprocess.Popen([*DSEARCH, "index", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    lines = []
    for line in process.stderr:  # type: ignore[union-attr]
        lines.append(line)
        if "workers will load" in line:
            break
    time.sleep(3)  # chunks are on their way to the workers
    process.send_signal(signal.SIGINT)
    stdout, stderr = _finish(process, 60, "the interrupted Ray build hung")
    assert process.returncode == 3, stderr
    assert stdout == ""
    assert stderr.splitlines()[-1].startswith("dsearch: error: "), stderr
    assert not (target / "manifest.json").exists()


def test_sigterm_during_a_ray_build_exits_3_and_keeps_the_checkpoint(ray_cluster, ray_setup):
    """ray.init installs a SIGTERM handler of its own (sys.exit(15)): cron's timeout or systemd stopping a --ray
    build must still end it as Ctrl-C does, with exit 3 and the one line, nothing published, and the checkpoint
    kept, so that the rerun resumes instead of encoding everything again."""
    root, corpus, common, local = ray_setup
    target = root / "terminated.idx"
    ray_args = ("--ray", "--ray-address", ray_cluster, "--workers", "2")
    env = {**os.environ, "DSEARCH_CHECKPOINT_SECONDS": "0", "DSEARCH_TEST_FAULT": "checkpointed:TERM"}
    result = _index(corpus, "-o", target, *common, *ray_args, env=env)  # SIGTERM right after the first checkpoint
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "dsearch: error: interrupted; nothing was published (run the same command again to resume)"
    )
    assert not (target / "manifest.json").exists()

    resumed = _index(corpus, "-o", target, *common, *ray_args, "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert 0 < summary["resumed_at"] < 800 and summary["encoded"] == 800 - summary["resumed_at"]
    _assert_same_index(local, target)


@pytest.mark.parametrize(
    ("flags", "size"),
    [(("--cpus-per-worker", "3"), "3 CPUs and 0 GPUs"), (("--gpus-per-worker", "2"), "1 CPUs and 2 GPUs")],
)
def test_a_worker_no_node_can_hold_is_refused_at_once(ray_cluster, tmp_path, flags, size):
    """The test cluster has one node of 2 CPUs and 1 GPU: a worker of 3 CPUs or 2 GPUs can never be placed, and
    Ray keeps it pending until the cluster grows. The build waited for ever; it must end with one line, exit 1."""
    target = tmp_path / "idx"
    args = ("index", SAMPLE / "passages.jsonl", "-o", target, "--ray", "--ray-address", ray_cluster, *flags)
    try:
        result = subprocess.run([*DSEARCH, *map(str, args)], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"index --ray {' '.join(flags)} on a cluster that cannot hold one worker hung")
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"dsearch: error: no node of the Ray cluster at {ray_cluster} can hold a worker of {size} (its nodes have "
        "at most 2 CPUs and 1 GPUs); lower --cpus-per-worker or --gpus-per-worker, or add such a node to the cluster"
    ]
    assert not target.exists()  # refused before the corpus was read or the index folder made


def test_a_cluster_lost_mid_run_ends_it_with_exit_3_and_keeps_the_checkpoint(ray_setup):
    """The cluster stopped under a build (``ray stop``, a lost head pod): Ray's core ended the driver 60 s later
    with exit 1 and not a line on stderr, and an error here removed the checkpoint. The driver notices that the
    head node stopped answering: one line, exit 3, the checkpoint kept for the rerun (``status`` says so)."""
    root, corpus, common, local = ray_setup
    big = root / "lost.jsonl"
    big.write_text(_corpus(8000))
    target = root / "lost.idx"
    env = {**os.environ, "DSEARCH_CHECKPOINT_SECONDS": "0"}
    with local_cluster(cpus=2) as address:  # a cluster of its own: this test stops it
        args = [big, "-o", target, *common, "--ray", "--ray-address", address, "--workers", "2", "-v"]
        process = subprocess.Popen([*DSEARCH, "index", *map(str, args)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        deadline = time.monotonic() + 120
        while not list(target.glob(".staging-*/progress.json")):  # chunks encoded, written and checkpointed
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint while the cluster ran"
            time.sleep(0.2)
    started = time.monotonic()  # the cluster's processes are killed
    stdout, stderr = _finish(process, 120, "the Ray build hung after its cluster was stopped")
    assert time.monotonic() - started < 55  # before Ray's own 60 s, which ends the process without a word
    assert process.returncode == 3, stderr
    assert stdout == ""
    assert re.fullmatch(
        r"dsearch: error: lost the Ray cluster: its head node \(\S+:\d+\) has not answered for 15 s; nothing was "
        r"published \(rerun the same command once the cluster is back to resume from the last checkpoint\)",
        stderr.splitlines()[-1],
    ), stderr
    assert not (target / "manifest.json").exists()
    checkpoints = list(target.glob(".staging-*/progress.json"))
    assert checkpoints and json.loads(checkpoints[0].read_text())["passages"] > 0  # an error used to remove it
