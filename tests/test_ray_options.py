"""``--ray`` options that need no cluster: usage errors, the missing extra, and the choice of GPU path."""

from __future__ import annotations

import logging
import os
import sys

import pytest
from conftest import SAMPLE

from dsearch.distributed import RAY_MISSING, choose_device


@pytest.mark.parametrize(
    "flags",
    [("--workers", "2"), ("--ray-address", "127.0.0.1:6379"), ("--gpus-per-worker", "1"), ("--cpus-per-worker", "2")],
)
def test_ray_options_without_ray_are_a_usage_error(cli, tmp_path, flags):
    result = cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", *flags)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == f"dsearch: error: {flags[0]} sets up encoding on a Ray cluster: add --ray\n"
    assert not (tmp_path / "idx").exists()


def test_ray_without_the_extra_names_the_install_command(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without the extra looks like to import
    result = cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", "--ray")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"dsearch: error: {RAY_MISSING}\n"
    assert 'pip install "dsearch[ray]"' in result.stderr
    assert not (tmp_path / "idx").exists() and cli.loaded == []  # refused before any model was loaded


def test_gpu_workers_encode_in_fp16_only_when_auto_and_cuda(caplog):
    assert choose_device(None, 1, cuda_available=True) == ("cuda", "fp16")
    assert choose_device("auto", 0.5, cuda_available=True) == ("cuda", "fp16")
    # An explicit precision is the user's: it stays on the CPU path that gives it.
    assert choose_device("fp32", 1, cuda_available=True) == ("cpu", None)
    assert choose_device("int8", 1, cuda_available=True) == ("cpu", None)
    # No GPUs asked for: the driver's CPU choice, even where CUDA exists.
    assert choose_device(None, 0, cuda_available=True) == ("cpu", None)
    with caplog.at_level(logging.WARNING, logger="dsearch"):
        assert choose_device("auto", 1, cuda_available=False) == ("cpu", None)
    assert "torch sees no CUDA device" in caplog.text


@pytest.mark.slow
def test_a_worker_with_other_model_files_refuses_in_one_line(tiny_seed_model):
    """A worker whose copy of the model differs from the driver's (another version at the same path) must not
    mix its vectors into the index: its first chunk fails with one line naming the model and what to do."""
    from dsearch.distributed import EncoderSpec, _Worker
    from dsearch.encoder import load_encoder
    from dsearch.errors import ModelError

    driver = load_encoder(str(tiny_seed_model), "fp32")
    spec = EncoderSpec.of(driver, batch_size=16, trust_remote_code=False, threads=1, device="cpu")
    good = _Worker(spec)
    assert good.error is None
    assert good.encode(["a passage"]).tolist() == driver.encode_documents(["a passage"]).tolist()

    other = _Worker(EncoderSpec(**{**spec.__dict__, "fingerprint": "0" * 32}))
    with pytest.raises(ModelError) as caught:
        other.encode(["a passage"])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"model {str(tiny_seed_model)!r} on worker ")
    assert message.endswith("install the same model files on every node")


def test_the_fake_cuda_hook_reports_cuda_without_torch(monkeypatch):
    """The CPU-only stand-in for a GPU node (tests/test_ray.py's fp16 test): the workers' probe says CUDA without
    asking torch, so ``--precision auto`` takes the fp16 path on a machine without a GPU."""
    from dsearch.distributed import FAKE_CUDA, _cuda_available

    monkeypatch.setenv("DSEARCH_TEST_FAULT", FAKE_CUDA)
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch would fail: the hook must not need it
    assert _cuda_available() is True
    assert choose_device("auto", 1, cuda_available=_cuda_available()) == ("cuda", "fp16")


def test_a_workers_dsearch_error_is_found_inside_ray_datas_wrapping():
    """Ray Data wraps a worker's exception (RayTaskError → UserCodeException → the cause): the driver must find
    dsearch's one-line error in there rather than report Ray's traceback."""
    from dsearch.distributed import _dsearch_cause
    from dsearch.errors import ModelError

    original = ModelError("model 'm' on worker w is not the driver's")
    try:
        try:
            raise original
        except ModelError as exc:
            raise RuntimeError("UDF failed to process a data block") from exc
    except RuntimeError as wrapped:
        outer = Exception("ray::MapWorker(MapBatches(_Worker)).submit()")
        outer.cause = wrapped  # what RayTaskError carries
        assert _dsearch_cause(outer) is original
    assert _dsearch_cause(RuntimeError("no dsearch error in here")) is None


@pytest.mark.slow
def test_an_int8_worker_keeps_to_its_threads(tiny_seed_model, monkeypatch):
    """int8 runs texts side by side on a thread pool as wide as the node's cores; a Ray worker given one CPU must
    run one thread, or two workers on a 2-core node run four threads and slow each other down. Its tokenizer
    runs on that one thread too, unless the cluster says otherwise."""
    from dsearch.distributed import EncoderSpec, load_worker_encoder
    from dsearch.encoder import load_encoder

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)  # restored after the test
    driver = load_encoder(str(tiny_seed_model), "int8")
    assert driver.workers == (os.cpu_count() or 1)  # what a local build uses
    assert "TOKENIZERS_PARALLELISM" not in os.environ  # loading a model does not touch it: only a worker does
    spec = EncoderSpec.of(driver, batch_size=16, trust_remote_code=False, threads=1, device="cpu")
    worker = load_worker_encoder(spec)
    assert worker.workers == 1
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # set on the cluster: kept
    load_worker_encoder(spec)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    two = load_worker_encoder(EncoderSpec.of(driver, batch_size=16, trust_remote_code=False, threads=2, device="cpu"))
    assert two.workers == 2
    assert worker.encode_documents(["a passage", "another one"]).tolist() == driver.encode_documents(
        ["a passage", "another one"]
    ).tolist()


def test_a_workers_error_keeps_the_cli_and_api_spellings(monkeypatch):
    """A worker's dsearch error travels back to the driver as text (a model that cannot load, or fails a chunk):
    the CLI must still print its flags (--trust-remote-code) and the API its parameters (trust_remote_code=True),
    not whichever spelling str() gave on the worker."""
    import pyarrow as pa

    import dsearch.distributed as distributed
    from dsearch.errors import ModelError, option

    def refuse(spec):
        raise ModelError(f"cannot load model 'm': pass {option('trust_remote_code', True)} if you trust it")

    monkeypatch.setattr(distributed, "load_worker_encoder", refuse)
    worker = distributed._Worker(distributed.EncoderSpec("m", "fp32", 8, False, "0" * 32, 4))
    batch = {"chunk": pa.array([0]), "texts": pa.array([["a passage"]])}
    out = worker(batch)
    assert out["chunk"].to_pylist() == [0] and out["vectors"].to_pylist() == [b""]  # no vectors, the error instead
    error = distributed.worker_error(out["error"][0].as_py())  # what the driver raises
    assert type(error) is ModelError
    assert error.for_cli() == "cannot load model 'm': pass --trust-remote-code if you trust it"
    assert str(error) == "cannot load model 'm': pass trust_remote_code=True if you trust it"

    class Failing:
        def encode_documents(self, texts):
            raise ModelError(f"chunk refused; pass {option('max_remove', 5)}")

    monkeypatch.setattr(distributed, "load_worker_encoder", lambda spec: Failing())
    out = distributed._Worker(distributed.EncoderSpec("m", "fp32", 8, False, "0" * 32, 4))(batch)
    error = distributed.worker_error(out["error"][0].as_py())
    assert (error.for_cli(), str(error)) == ("chunk refused; pass --max-remove 5", "chunk refused; pass max_remove=5")

    def crash(spec):
        raise RuntimeError("first line\r\nsecond line")

    monkeypatch.setattr(distributed, "load_worker_encoder", crash)
    with pytest.raises(ModelError) as raised:
        distributed._Worker(distributed.EncoderSpec("m", "fp32", 8, False, "0" * 32, 4)).encode(["a passage"])
    assert str(raised.value).endswith(": RuntimeError: first line") and str(raised.value).startswith("cannot load")


def test_an_empty_ray_address_is_a_usage_error(cli, tmp_path):
    """``--ray-address "$HEAD"`` with HEAD unset (a crontab) must not quietly start a new local Ray instead."""
    result = cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", "--ray", "--ray-address", "")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        "dsearch: error: --ray-address is empty; give the head node's HOST:PORT, or leave the option out\n"
    )
    assert not (tmp_path / "idx").exists() and cli.loaded == []


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1:0", "head:", "junk"])
def test_a_malformed_ray_address_is_a_usage_error(cli, tmp_path, address):
    """A port out of range was an OverflowError from the socket module: "unexpected ..., report it", exit 1."""
    pytest.importorskip("ray", reason='the ray extra is not installed (pip install "dsearch[ray]")')
    result = cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", "--ray", "--ray-address", address)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"dsearch: error: --ray-address {address!r} is not HOST:PORT (or ray://HOST:PORT, or auto)\n"
    )
    assert not (tmp_path / "idx").exists() and cli.loaded == []


def test_a_bad_ray_address_variable_is_named_as_such(cli, tmp_path, monkeypatch):
    """An address from RAY_ADDRESS (no --ray-address given): the message names the variable to fix, not a flag
    the user never passed."""
    pytest.importorskip("ray", reason='the ray extra is not installed (pip install "dsearch[ray]")')
    from ray_cluster import free_port

    monkeypatch.setenv("RAY_ADDRESS", "junk")
    result = cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", "--ray")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == "dsearch: error: RAY_ADDRESS 'junk' is not HOST:PORT (or ray://HOST:PORT, or auto)\n"

    port = free_port()  # nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    result = cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", "--ray")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"dsearch: error: cannot reach a Ray cluster at 127.0.0.1:{port} (RAY_ADDRESS; Connection refused); start "
        "one (ray start --head) or set RAY_ADDRESS to the address of its head node\n"
    )
    assert not (tmp_path / "idx").exists() and cli.loaded == []


def test_a_worker_must_fit_on_one_live_node():
    """A Ray actor runs on one node: two nodes of 1 CPU cannot hold a worker of 2 CPUs, and a dead node holds
    nothing. Such a worker would stay pending, and the build wait for ever."""
    from dsearch.distributed import check_fits
    from dsearch.errors import DsearchError

    small = [{"Alive": True, "Resources": {"CPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 1.0}}]
    dead = {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 1.0}}
    check_fits(small, 1, 0, "the Ray cluster at head:6379")  # fits: nothing raised
    check_fits([*small, {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 2.0}}], 2, 1, "the Ray cluster at head:6379")
    with pytest.raises(DsearchError) as caught:
        check_fits([*small, dead], 2, 0, "the Ray cluster at head:6379")
    assert str(caught.value) == (
        "no node of the Ray cluster at head:6379 can hold a worker of 2 CPUs and 0 GPUs (its nodes have at most 1 "
        "CPUs and 0 GPUs); lower --cpus-per-worker or --gpus-per-worker, or add such a node to the cluster"
    )
    with pytest.raises(DsearchError, match=r"a worker of 1 CPUs and 0\.5 GPUs \(its nodes have at most 1 CPUs and 0"):
        check_fits(small, 1, 0.5, "the Ray cluster at head:6379")


@pytest.mark.parametrize(
    ("reply", "grpc"),
    [
        (b"HTTP/1.0 400 Bad Request\r\n\r\n", False),  # a web server (Ray's dashboard port, say)
        (b"-ERR unknown command\r\n", False),  # Redis
        (b"", False),  # a port that closes at once
        (bytes([0, 0, 24, 4, 0, 0, 0, 0, 0]), True),  # a gRPC server's SETTINGS frame: what Ray's GCS sends
    ],
)
def test_an_address_that_answers_but_not_as_ray_fails_in_seconds(cli, tmp_path, request, reply, grpc):
    """ray.init retried a port that answers but is not Ray's head node for a quarter of an hour, deaf to Ctrl-C:
    dsearch checks that the port speaks gRPC (HTTP/2) before handing it to Ray."""
    import socket
    import threading
    import time

    from dsearch.distributed import _answers_http2

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    request.addfinalizer(server.close)

    def answer() -> None:
        for _ in range(2):
            connection, _ = server.accept()
            with connection:
                connection.recv(64)
                connection.sendall(reply)

    threading.Thread(target=answer, daemon=True).start()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        assert _answers_http2(connection) is grpc
    if grpc:
        return  # a real head node's answer: tests/test_ray.py connects to one
    pytest.importorskip("ray", reason='the ray extra is not installed (pip install "dsearch[ray]")')
    started = time.monotonic()
    address = f"127.0.0.1:{port}"
    result = cli("index", SAMPLE / "passages.jsonl", "-o", tmp_path / "idx", "--ray", "--ray-address", address)
    assert time.monotonic() - started < 10
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"dsearch: error: 127.0.0.1:{port} answers, but not as a Ray cluster's head node; give the address of its "
        "head node with --ray-address (the port `ray start --head` printed, 6379 by default)\n"
    )
    assert not (tmp_path / "idx").exists() and cli.loaded == []


def test_ray_datas_warning_about_a_pool_larger_than_the_work_stays_off_stderr(monkeypatch):
    """Ray Data warns (a Python warning: two lines on stderr, its source line included) whenever a build has fewer
    chunks than --workers, as a nightly --update of a few passages always has on a cluster. The quiet setup
    drops that warning, and that one only."""
    import warnings

    from dsearch.distributed import _quiet_ray

    monkeypatch.setattr(warnings, "filters", list(warnings.filters))  # the filters as they were, after the test
    for name in ("RAY_DATA_LOG_LEVEL", "RAY_BACKEND_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    _quiet_ray()
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn(
            "The minimum number of concurrent actors for 'MapBatches(_Worker)' is set to 2, but the operator only "
            "received 1 input(s).",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(warning.message) for warning in caught] == ["something else"]


def test_a_worker_without_the_model_folder_says_so(tmp_path):
    """A node of the cluster without the driver's --model folder: the loader's own "no such directory" named
    the folder only, and the user found it in place on the driver. The worker says that it is the one lacking it."""
    import socket

    from dsearch.distributed import EncoderSpec, _Worker
    from dsearch.errors import ModelError

    missing = tmp_path / "model"  # what the driver loaded from, absent on this "node"
    worker = _Worker(EncoderSpec(str(missing), "int8", 8, False, "0" * 32, 4))
    with pytest.raises(ModelError) as caught:
        worker.encode(["a passage"])
    assert str(caught.value) == (
        f"model folder {missing} does not exist on Ray worker {socket.gethostname()}; a --model folder must be at "
        "the same path on every node (a shared mount, or a copy)"
    )


def test_the_head_node_watched_while_waiting_for_vectors():
    """The driver checks that the head node (Ray's GCS) still answers while it waits; never through Ray Client,
    whose driver is outside the cluster, where the head's own address may not answer even when all is well."""
    from types import SimpleNamespace

    from dsearch.distributed import _head_to_watch

    def ray_at(gcs):
        return SimpleNamespace(get_runtime_context=lambda: SimpleNamespace(gcs_address=gcs))

    assert _head_to_watch("head:6379", ray_at("10.0.0.5:6379")) == ("10.0.0.5", 6379)
    assert _head_to_watch(None, ray_at("[::1]:6380")) == ("::1", 6380)
    assert _head_to_watch("ray://head:10001", ray_at("10.0.0.5:6379")) is None

    def broken():
        raise RuntimeError("no runtime context")

    assert _head_to_watch("head:6379", SimpleNamespace(get_runtime_context=broken)) is None
