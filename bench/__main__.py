"""`python -m bench [--quick]`: the trial-time table, measured in one run.

Contenders alternate within each repeat (the order rotates between repeats) and every number is
the median over repeats; the matmul ceiling is measured before and after, and the higher is kept.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

import torch
from threadpoolctl import threadpool_limits

from bench import contenders as c
from selector import worker


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def time_contenders(
    w: c.Workload, repeats: int, warm: bool
) -> dict[str, tuple[list[float], float]]:
    names = list(c.CONTENDERS)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    accuracy: dict[str, float] = {}
    if warm:  # one short untimed round: thread pools, allocator, first-call costs
        short = c.Workload(w.name, w.X, w.y, w.splits, w.folds, w.n_classes, w.config, 1)
        for n in names:
            c.CONTENDERS[n](short, 0)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t = time.perf_counter()
            acc = c.CONTENDERS[n](w, r)
            seconds[n].append(time.perf_counter() - t)
            accuracy.setdefault(n, 0.0)
            accuracy[n] += acc / repeats
        print(f"  repeat {r + 1}/{repeats} done (load {_load()})", file=sys.stderr, flush=True)
    return {n: (seconds[n], accuracy[n]) for n in names}


def print_table(
    w: c.Workload, results: dict[str, tuple[list[float], float]], ceiling: float
) -> None:
    gflop = w.flops() / 1e9
    base = statistics.median(results[next(iter(results))][0])
    print(
        f"\n{w.name}: {len(w.folds)} folds, {w.epochs} epochs, {gflop:.1f} GFLOP of training arithmetic"
    )
    head = f"{'way to run the trial':44s} {'median s':>9s} {'runs':>18s} {'vs (a)':>7s} {'GFLOP/s':>8s} {'ceiling':>8s} {'CV acc':>7s}"
    print(head)
    print("-" * len(head))
    for name, (secs, acc) in results.items():
        med = statistics.median(secs)
        runs = "/".join(f"{s:.2f}" for s in secs)
        rate = gflop / med
        print(
            f"{name:44s} {med:9.2f} {runs:>18s} {base / med:6.2f}x {rate:8.1f} {rate / ceiling:7.0%} {acc:7.4f}"
        )
    print(
        f"{'the limit: this arithmetic at the ceiling':44s} {gflop / ceiling:9.2f} {'':>18s} {base / (gflop / ceiling):6.2f}x {ceiling:8.1f} {1:7.0%}"
    )


def cores_table(epochs: int) -> None:
    """Trials per minute of the stacked engine on digits: one worker with all cores' threads,
    one worker with one thread, and one single-threaded worker per core at once."""
    cores = worker.torch_threads(1)
    ctx = mp.get_context("spawn")
    layouts = sorted({(1, cores), (1, 1), (cores, 1)})
    print(f"\ncores: the stacked engine on digits ({epochs} epochs), {cores} cores")
    print(f"{'workers x threads':18s} {'s per trial':>12s} {'trials/min':>11s}")
    for workers, threads in layouts:
        barrier, queue = ctx.Barrier(workers), ctx.Queue()
        procs = [
            ctx.Process(target=c.worker, args=(threads, epochs, barrier, queue))
            for _ in range(workers)
        ]
        for p in procs:
            p.start()
        times = [queue.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
        wall = max(times)
        print(
            f"{workers} x {threads:<14d} {statistics.mean(times):12.2f} {60 * workers / wall:11.1f}"
        )
    print(
        f"selector run's default on the CPU: {cores} workers (one per core), "
        f"{worker.torch_threads(cores)} thread each"
    )


def memory_table(workloads: list[str], device: str, threads: int) -> None:
    """Peak memory of one run (1 epoch) of each contender, each in a fresh process."""
    ctx = mp.get_context("spawn")
    gpu = device == "cuda"
    print("\npeak memory of one trial (1 epoch), each contender in a fresh process, MiB")
    cols = "".join(f" {w:>16s}" for w in workloads)
    print(
        f"{'contender':44s}{cols}"
        + (" (host RSS / GPU allocator)" if gpu else " (RSS over the loaded data)")
    )
    for name in c.CONTENDERS:
        cells = []
        for w in workloads:
            queue = ctx.Queue()
            p = ctx.Process(target=c.peak_memory, args=(w, name, device, threads, queue))
            p.start()
            host, dev = queue.get(timeout=900)
            p.join()
            mib = 1 << 20
            cell = f"{host / mib:.0f} / {dev / mib:.0f}" if gpu else f"{host / mib:.0f}"
            cells.append(f" {cell:>16s}")
        print(f"{name:44s}{''.join(cells)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one repeat, fewer epochs (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per contender")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--no-large", action="store_true", help="skip the 50000 x 100 set")
    ap.add_argument("--no-cores", action="store_true", help="skip the workers x threads table")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak memory table")
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the torch contenders train (scikit-learn always runs on the CPU)",
    )
    args = ap.parse_args(argv)
    c.DEVICE = args.device
    threads = args.threads or worker.torch_threads(1)
    torch.set_num_threads(threads)
    # scikit-learn's BLAS (OpenBLAS) and OpenMP pools get the same number of threads as torch
    with threadpool_limits(limits=threads):
        _run(args, threads)


def _run(args: argparse.Namespace, threads: int) -> None:
    repeats = args.repeats or (1 if args.quick else 3)
    print(
        f"bench: torch {torch.__version__}, {threads} threads, {os.cpu_count()} cpus, "
        f"{platform.processor() or platform.machine()}, load {_load()}, {repeats} repeat(s)"
    )
    busy = _load()
    if busy != "?" and float(busy) > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {busy} on {os.cpu_count()} cpus: other processes share the "
            "cores, and multi-threaded contenders suffer most; rerun on an idle machine"
        )
    cuda = args.device == "cuda"
    if cuda:
        print(f"device: {torch.cuda.get_device_name()}; (b) runs on the CPU")
    ceiling = c.matmul_gflops()
    print(f"float32 matmul ceiling ({8192 if cuda else 2048}^3): {ceiling:.1f} GFLOP/s")

    digits = c.digits(epochs=5 if args.quick else 20)
    if not cuda:
        t = c.step_times(digits.config, digits.X.shape[1], digits.n_classes)
        print(
            f"one training step of 5 stacked digits models (batch {digits.config.batch_size}): "
            f"baddbmm {t['baddbmm']:.2f} ms, torch.func vmap + functional_call {t['vmap']:.2f} ms "
            f"-> the engine uses {'baddbmm' if t['baddbmm'] <= t['vmap'] else 'vmap (update the engine!)'}"
        )
    tables = [(digits, time_contenders(digits, repeats, warm=True))]
    if not args.no_large:
        large = c.synthetic(epochs=1 if args.quick else 5)
        tables.append(
            (large, time_contenders(large, 1 if args.quick else max(1, repeats - 1), warm=False))
        )
    ceiling = max(ceiling, c.matmul_gflops())
    where = torch.cuda.get_device_name() if cuda else f"{threads} threads"
    print(f"\nfloat32 matmul ceiling, best of before and after: {ceiling:.1f} GFLOP/s on {where}")
    for w, results in tables:
        print_table(w, results, ceiling)
    if not args.no_memory:
        memory_table(["digits"] if args.no_large else ["digits", "large"], args.device, threads)
    if not args.no_cores and not cuda:
        cores_table(epochs=5 if args.quick else 20)
    print(f"\nload average at the end: {_load()} (numbers from a busy machine are not comparable)")


if __name__ == "__main__":
    main()
