"""A pool of gloo worker processes kept alive across tests, with hard timeouts.

Starting W Python processes that import torch costs seconds on two shared cores, so each world
size gets one pool per test session; a test sends a task (an importable function and keyword
arguments) to every rank and waits for all results with a deadline. Any failure or timeout kills
the pool (a rank stuck in a collective cannot be trusted afterwards); the next test starts a
fresh one. Collectives themselves time out after `COLLECTIVE_TIMEOUT_S`, so a hang turns into an
error in seconds instead of blocking CI.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from datetime import timedelta

COLLECTIVE_TIMEOUT_S = 20.0
START_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        results.put((rank, "ready", None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        item = tasks.get()
        if item is None:
            break
        module, name, kwargs = item
        try:
            fn = getattr(importlib.import_module(module), name)
            results.put((rank, "ok", fn(**kwargs)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    def __init__(self, world: int):
        self.world = world
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        port = _free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world, port, self.tasks[r], self.results), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self.alive = True
        self._collect("ready", START_TIMEOUT_S, what="start-up")

    def _collect(self, kind: str, timeout: float, what: str) -> list:
        out: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        while len(out) < self.world:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close(kill=True)
                raise TimeoutError(f"{what}: ranks {sorted(set(range(self.world)) - set(out))} did not answer "
                                   f"within {timeout:.0f} s (hang?)")
            try:
                rank, status, value = self.results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    self.close(kill=True)
                    raise RuntimeError(f"{what}: worker rank(s) {dead} died") from None
                continue
            if status == "error":
                # Peers of a failed rank are likely blocked in a collective: do not wait for them.
                self.close(kill=True)
                raise AssertionError(f"{what}: rank {rank} of {self.world} failed:\n{value}")
            out[rank] = value
        return [out[r] for r in range(self.world)]

    def run(self, fn, timeout: float = 60.0, **kwargs) -> list:
        """Run `fn(**kwargs)` on every rank; returns the per-rank results in rank order."""
        if not self.alive:
            raise RuntimeError("worker pool is closed")
        for q in self.tasks:
            q.put((fn.__module__, fn.__name__, kwargs))
        return self._collect("ok", timeout, what=f"{fn.__name__}({kwargs})")

    def close(self, kill: bool = False) -> None:
        if not self.alive:
            return
        self.alive = False
        if not kill:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


_POOLS: dict[int, WorkerPool] = {}


def get_pool(world: int) -> WorkerPool:
    pool = _POOLS.get(world)
    if pool is None or not pool.alive:
        pool = _POOLS[world] = WorkerPool(world)
    return pool


def close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
