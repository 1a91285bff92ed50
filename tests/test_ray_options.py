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
