"""Where the CPU goes when `dsearch index --ray` runs on the same cores as a local build, and what Ray Data alone
costs: the arithmetic behind the `--ray` overhead on one machine.

    python benchmarks/ray_cpu.py [--passages 5000] [--corpus sentences|abstracts] [--workers 2] [--repeat 3]
        [--scifact DIR]

On one warm local cluster (`ray start --head`, as many CPUs as this machine, workers at nice 0, a small Ray build
run first so that Ray Data's detached helper actors are up), `--repeat` rounds of:

1. a local build of the passages (whole `dsearch index` process);
2. the same build with `--ray --workers N`;
3. the floor: a process that only joins the cluster and runs the smallest Ray Data job of the same shape (one
   one-row block per 256 passages, `map_batches` over an actor pool of N actors that do nothing) — the work any
   `--ray` build on Ray Data pays besides encoding, whatever its code.

For each: wall seconds and the CPU seconds the whole machine spent meanwhile (/proc/stat, every process: the
build, the cluster's daemons and workers, anything else running), so cores busy = CPU s / wall s. For the Ray build
also the CPU seconds per process (sampled every 0.1 s; a process that lives less than that is missed). When both
builds keep every core busy, the Ray build's extra wall time is its extra CPU seconds over the cores, and the
floor's CPU seconds over the cores is what no Ray Data implementation can get under on this machine.

With ``--tokenizer-pairs N``, first N alternated pairs of: two one-thread encoders side by side (each a process
encoding half the passages, as two one-CPU Ray workers do, without Ray), once with the tokenizer's own thread pool
(``TOKENIZERS_PARALLELISM=true``) and once without (``false``, what a one-thread worker sets): their CPU seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import synthetic  # noqa: E402
from ray_cluster import local_cluster  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
DSEARCH = [sys.executable, "-m", "dsearch", "index"]
CHUNK = 256  # passages per chunk at the default batch size (indexer: batch_size × BATCHES_PER_CHUNK)

# The floor's process: join, then the smallest Ray Data job shaped like a build's (one-row blocks, an actor pool).
FLOOR = textwrap.dedent(
    """
    import sys, ray
    ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
    import ray.data
    class Nothing:
        def __call__(self, batch):
            return batch
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.target_max_block_size = 1
    blocks, workers = int(sys.argv[2]), int(sys.argv[3])
    dataset = ray.data.from_items([{"chunk": i} for i in range(blocks)], override_num_blocks=blocks).map_batches(
        Nothing, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1
    )
    assert sum(len(b["chunk"]) for b in dataset.iter_batches(batch_size=None, prefetch_batches=0)) == blocks
    ray.shutdown()
    """
)


# One of the two side-by-side encoders: half the passages at one thread, chunk by chunk; prints its CPU seconds.
HALF = textwrap.dedent(
    """
    import json, sys, time
    from dsearch.encoder import load_encoder
    texts = [json.loads(line)["text"] for line in open(sys.argv[1])]
    half = int(sys.argv[2])
    texts = texts[: len(texts) // 2] if half == 0 else texts[len(texts) // 2 :]
    encoder = load_encoder(None, "int8")
    encoder.workers = 1  # what _limit_threads gives a one-CPU worker
    encoder.encode_documents(texts[:32])
    started = time.process_time()
    for at in range(0, len(texts), 256):
        encoder.encode_documents(texts[at : at + 256])
    print(time.process_time() - started)
    """
)


def side_by_side(corpus: Path, env: dict[str, str], parallel: str) -> float:
    """CPU seconds of two one-thread encoders run at once on the two halves of ``corpus``."""
    env = {**env, "TOKENIZERS_PARALLELISM": parallel}
    command = [sys.executable, "-c", HALF, str(corpus)]
    halves = [subprocess.Popen([*command, str(half)], stdout=subprocess.PIPE, env=env, text=True) for half in (0, 1)]
    return sum(float(process.communicate()[0]) for process in halves)


def busy_cpu_seconds() -> float:
    """CPU seconds the machine has spent not idle (all processes, since boot)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK  # minus idle and iowait


def processes() -> dict[int, tuple[float, str]]:
    """pid -> (CPU seconds so far, command line) for every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found[int(entry.name)] = ((int(fields[11]) + int(fields[12])) / TICK, command)
    return found


def kind(command: str) -> str:
    """A process's role, from its command line (Ray names its workers after their actor or task)."""
    for name in ("MapWorker", "_Inbox", "_StatsActor", "Autoscaling", "ActorLocation", "gcs_server", "raylet"):
        if name in command:
            return name
    if "-m dsearch" in command:
        return "dsearch (the driver)"
    if "ray::" in command or "default_worker" in command:
        return "other Ray workers (the read task, idle workers)"
    return "other processes (daemons, this script, the rest of the machine)"


class Measured:
    """Wall seconds, the machine's busy CPU seconds, and (``per_process``) CPU seconds by process kind."""

    def __init__(self, per_process: bool = False) -> None:
        self.per_process = per_process
        self.by_kind: dict[str, float] = defaultdict(float)

    def run(self, command: list[str], env: dict[str, str]) -> Measured:
        before, seen, stop = processes(), {}, threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for pid, (seconds, command_line) in processes().items():
                    # A process about to exit has an empty command line: keep the one it had.
                    seen[pid] = (seconds, command_line or seen.get(pid, (0.0, ""))[1])
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        if self.per_process:
            sampler.start()
        cpu, started = busy_cpu_seconds(), time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        self.wall = time.perf_counter() - started
        self.cpu = busy_cpu_seconds() - cpu
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed: {result.stderr}")
        if self.per_process:
            stop.set()
            sampler.join()
            for pid, (seconds, command_line) in seen.items():
                spent = seconds - before.get(pid, (0.0, ""))[0]
                if spent > 0:
                    self.by_kind[kind(command_line)] += spent
        return self


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=5000)
    parser.add_argument(
        "--corpus", choices=["sentences", "abstracts"], default="sentences", help="SciFact sentences or documents"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scifact", type=Path, default=synthetic.SCIFACT, help="BEIR SciFact folder")
    parser.add_argument("--tokenizer-pairs", type=int, default=0, help="first, pairs of the tokenizer comparison")
    args = parser.parse_args()
    synthetic.SCIFACT = args.scifact
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cpus = os.cpu_count() or 2
    rounds = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        rows = synthetic.corpus_rows(args.corpus, args.passages)
        corpus, small = tmp / "corpus.jsonl", tmp / "small.jsonl"
        corpus.write_text("".join(rows))
        small.write_text("".join(rows[:64]))
        Measured().run([*DSEARCH, str(small), "-o", str(tmp / "warm")], env)  # caches the ONNX export
        tokenizer = [(side_by_side(corpus, env, "true"), side_by_side(corpus, env, "false"))
                     for _ in range(args.tokenizer_pairs)]  # fmt: skip
        with local_cluster(cpus=cpus, env={"RAY_worker_niceness": "0"}) as address:
            ray_args = ["--ray", "--ray-address", address, "--workers", str(args.workers)]
            Measured().run([*DSEARCH, str(small), "-o", str(tmp / "warm-ray"), *ray_args], env)  # Ray Data's actors
            blocks = -(-args.passages // CHUNK)
            for i in range(args.repeat):
                local = Measured().run([*DSEARCH, str(corpus), "-o", str(tmp / f"local{i}")], env)
                ray_build = [*DSEARCH, str(corpus), "-o", str(tmp / f"ray{i}"), *ray_args]
                ray = Measured(per_process=True).run(ray_build, env)
                floor = Measured().run([sys.executable, "-c", FLOOR, address, str(blocks), str(args.workers)], env)
                rounds.append((local, ray, floor, os.getloadavg()[0]))
    for i, (pool, alone) in enumerate(tokenizer, 1):
        print(f"tokenizer pair {i}: two one-thread encoders, CPU s with the tokenizer's thread pool {pool:.2f}, "
              f"without {alone:.2f} ({100 * (alone / pool - 1):+.1f}%)")  # fmt: skip
    print(f"machine: {cpus} CPUs; {args.passages} SciFact {args.corpus}; --workers {args.workers}; warm cluster")
    print("| round | local wall s | local CPU s (cores busy) | --ray wall s | --ray CPU s (cores busy) | Ray vs local |"
          " Ray Data floor wall s | floor CPU s | load after |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for i, (local, ray, floor, load) in enumerate(rounds, 1):
        print(
            f"| {i} | {local.wall:.2f} | {local.cpu:.1f} ({local.cpu / local.wall:.2f}) | {ray.wall:.2f} | "
            f"{ray.cpu:.1f} ({ray.cpu / ray.wall:.2f}) | {100 * (ray.wall / local.wall - 1):+.1f}% | "
            f"{floor.wall:.2f} | {floor.cpu:.1f} | {load:.2f} |"
        )
    n = len(rounds)
    local_wall, local_cpu = sum(r[0].wall for r in rounds) / n, sum(r[0].cpu for r in rounds) / n
    ray_wall, ray_cpu = sum(r[1].wall for r in rounds) / n, sum(r[1].cpu for r in rounds) / n
    floor_cpu = sum(r[2].cpu for r in rounds) / n
    print(f"means: local {local_wall:.2f} s / {local_cpu:.1f} CPU s; --ray {ray_wall:.2f} s / {ray_cpu:.1f} CPU s "
          f"({100 * (ray_wall / local_wall - 1):+.1f}%); Ray Data floor {floor_cpu:.1f} CPU s")  # fmt: skip
    extra = ray_cpu - local_cpu
    print(f"--ray's extra CPU: {extra:.1f} s, over {cpus} cores {extra / cpus:.2f} s = "
          f"{100 * extra / cpus / local_wall:+.1f}% of the local wall time")  # fmt: skip
    print(f"the floor over {cpus} cores: {floor_cpu / cpus:.2f} s = {100 * floor_cpu / cpus / local_wall:+.1f}% "
          "of the local wall time, before any model is loaded or any passage encoded")  # fmt: skip
    print("CPU s by process in the --ray builds (mean):")
    kinds = sorted({k for r in rounds for k in r[1].by_kind}, key=lambda k: -sum(r[1].by_kind[k] for r in rounds))
    for k in kinds:
        print(f"  {sum(r[1].by_kind[k] for r in rounds) / n:6.2f}  {k}")


if __name__ == "__main__":
    main()
