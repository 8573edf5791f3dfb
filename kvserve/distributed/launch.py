"""Start, watch and stop the ranks of a tensor-parallel engine.

Two ways in:

- `LLM(..., tensor_parallel_size=N)` / `kvserve ... --tensor-parallel-size N` on one machine:
  the calling process is rank 0 and spawns ranks 1..N-1 (multiprocessing "spawn"), each with a
  pipe that carries one message back: `("ready",)` or `("failed", traceback text)`.
- `torchrun` (any number of machines): every process reads RANK / WORLD_SIZE / LOCAL_RANK /
  MASTER_ADDR / MASTER_PORT from the environment; rank 0 continues into the engine, CLI or
  server, the others run the worker loop and exit when rank 0 shuts down.

Rank 0 schedules; before every step it broadcasts the step's plan (the `SchedulerOutput` and
whether it is an ahead step) over a gloo group; every rank then runs the same forward, and
rank 0 broadcasts the ids it sampled on the device (`ModelRunner._sample`). Model collectives
run on NCCL (CUDA) or gloo (CPU).

Failure handling. A monitor thread on rank 0 waits on the spawned workers' process sentinels
and pipes. When a worker dies it logs which rank and its exit code at once and terminates the
other workers. On gloo, a collective blocked on the dead peer fails immediately ("connection
closed by peer"); the engine turns that into `RankFailedError` naming the rank and exit code.
An NCCL collective does not notice a dead peer, so the monitor aborts the NCCL group and, as
a last resort if a step of rank 0 is still blocked `_ABORT_GRACE_S` later, ends the process
with the error (a hung process is worse). Workers watch
their parent and exit if it disappears; under torchrun, torchrun itself stops the other ranks
when one fails.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from kvserve.distributed import one_shot as _one_shot
from kvserve.distributed import parallel_state as ps

logger = logging.getLogger(__name__)

# Model collectives: ranks run in lockstep, so a long wait means a stuck peer.
_COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# The plan broadcast waits as long as the engine is idle (a server may idle for days).
_PLAN_TIMEOUT = timedelta(days=365)
_ABORT_GRACE_S = 10.0
_PLAN_HEAD = 4096  # bytes of the first plan broadcast (a decode step's plan fits)
_NOTICE_WAIT_S = 3.0
# Test hook: a rank listed here raises during start-up (after joining the group).
FAIL_AT_START_ENV = "KVSERVE_TP_FAIL_AT_START"


class RankFailedError(RuntimeError):
    """A tensor-parallel rank failed to start or died; the engine has shut every rank down."""


def torchrun_env() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def rank_device(device: str, local_rank: int, tp_size: int, spawned: bool) -> torch.device:
    """This rank's device: 'cpu', or 'cuda:<local rank>' for 'auto' / 'cuda' with GPUs."""
    from kvserve.platform import resolve_device

    name = f"tensor_parallel_size={tp_size}"
    if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{name} on device {device!r} needs {tp_size} CUDA GPUs, but CUDA is not available")
    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev
    if dev.index is not None:
        raise ValueError(f"{name}: pass device 'cuda' (rank r uses cuda:<local rank r>), not {device!r}")
    count = torch.cuda.device_count()
    need = tp_size if spawned else local_rank + 1
    if count < need:
        raise ValueError(f"{name} needs {need} CUDA GPUs on this machine, found {count}")
    return torch.device("cuda", local_rank)


@dataclass
class _Worker:
    rank: int
    process: Any  # multiprocessing.Process
    conn: Any  # parent end of the pipe
    ready: bool = False
    error: str | None = None  # traceback text sent by the worker


class TPGroup:
    """This process's handle on the tensor-parallel group (see the module docstring)."""

    def __init__(self, rank: int, size: int, device: torch.device, workers: list[_Worker] | None = None,
                 conn: Any = None) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.workers = workers or []
        self._conn = conn  # spawned worker: pipe to rank 0
        self.failure: str | None = None  # first failure seen, as a message
        self._failed_event = threading.Event()
        self._stopping = False
        self._busy = 0  # > 0 while rank 0 is inside a step (collectives may block)
        self._step_started = 0.0
        self._closed = False
        self._close_done = False  # close() has returned (it can block on the GPU after a failure)
        self._serving = False  # rank 0: every worker is in its loop, waiting for plans
        self._monitor: threading.Thread | None = None
        # Run by close() before the group is destroyed (the engine releases its CUDA graphs).
        self.before_destroy: list[Callable[[], None]] = []

    # -- rank 0 ----------------------------------------------------------------------------------
    @property
    def worker_pids(self) -> dict[int, int]:
        return {w.rank: w.process.pid for w in self.workers}

    def start_monitor(self) -> None:
        if self.workers and self._monitor is None:
            self._monitor = threading.Thread(target=self._watch, name="kvserve-tp-monitor", daemon=True)
            self._monitor.start()

    def _watch(self) -> None:
        waiting = {w.process.sentinel: w for w in self.workers}
        pipes = {w.conn: w for w in self.workers}
        while (waiting or pipes) and not self._stopping:
            ready = mpc.wait(list(waiting) + list(pipes), timeout=0.5)
            for obj in ready:
                if obj in pipes:
                    w = pipes[obj]
                    try:
                        msg = obj.recv()
                    except (EOFError, OSError):
                        del pipes[obj]
                        continue
                    if msg[0] == "ready":
                        w.ready = True
                    elif msg[0] == "failed":
                        w.error = msg[1]
                elif obj in waiting:
                    w = waiting.pop(obj)
                    if self._stopping:
                        continue
                    # Drain a failure message that raced with the exit.
                    with contextlib.suppress(EOFError, OSError):
                        while w.conn.poll(0.2):
                            msg = w.conn.recv()
                            if msg[0] == "failed":
                                w.error = msg[1]
                    self._on_worker_death(w)

    def _on_worker_death(self, w: _Worker) -> None:
        w.process.join(2.0)  # the sentinel can fire a moment before the exit code is reapable
        code = w.process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        head = f"tensor-parallel rank {w.rank} (pid {w.process.pid}) {how}"
        msg = f"{head}; its error:\n{w.error.rstrip()}" if w.error else head
        if self.failure is None:
            self.failure = msg
            logger.error("%s; shutting down all ranks", head)
            self._failed_event.set()
            self._terminate_workers()
            threading.Thread(target=self._unblock, args=(msg,), name="kvserve-tp-unblock", daemon=True).start()

    def _unblock(self, msg: str) -> None:
        """A step of rank 0 may be waiting on the dead rank: the one in progress, or (on CUDA,
        where the next step is launched before the last one's outputs are built) one whose
        NCCL kernels were queued before the death. gloo fails such collectives by itself;
        NCCL needs an abort, and if even that leaves a step blocked for `_ABORT_GRACE_S`, the
        process ends with the error. The abort runs on its own thread: it can block too (the
        one-shot all-reduce kernel spins on the dead peer's signal and NCCL cannot stop it),
        and the deadline must still fire. The deadline also covers `close()` after the failure:
        with asynchronous scheduling rank 0 usually meets the death in the plan broadcast (gloo,
        which fails at once) and then closes, and the close waits for the GPU, where a kernel
        may spin on the dead peer for good. No new step starts after a failure (`step_guard`)."""
        failed_at = time.monotonic()
        tp = ps.get_tp()
        if tp.group is not None and dist.is_initialized() and dist.get_backend(tp.group) == "nccl":
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None:

                def run_abort() -> None:
                    with contextlib.suppress(Exception):
                        abort(tp.group)

                threading.Thread(target=run_abort, name="kvserve-tp-abort", daemon=True).start()
        while not self._close_done:
            blocked = self._busy or self._closed  # inside a step, or closing
            if blocked and time.monotonic() - max(failed_at, self._step_started) > _ABORT_GRACE_S:
                print(f"kvserve: fatal: {msg}\nkvserve: a collective is still blocked; exiting",
                      file=sys.stderr, flush=True)
                os._exit(1)
            time.sleep(0.1)

    def _terminate_workers(self) -> None:
        for w in self.workers:
            if w.process.is_alive():
                w.process.terminate()
        deadline = time.monotonic() + 3.0
        for w in self.workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(1.0)

    def wait_ready(self) -> None:
        """Rank 0, after its own start-up: every worker must report ready (or its failure)."""
        while not all(w.ready for w in self.workers):
            if self.failure is not None:
                self.raise_failure()
            self._failed_event.wait(0.05)
        self._serving = True

    def raise_failure(self, cause: BaseException | None = None) -> None:
        self.close()
        raise RankFailedError(self.failure) from cause

    def startup_failed(self, exc: BaseException) -> None:
        """Rank 0's own start-up raised. If a worker failed (its collective then fails here),
        raise that worker's error; otherwise stop the workers and let `exc` propagate."""
        # A collective failing (RuntimeError) may mean a worker died: wait for its report.
        # Anything else (a ValueError about the options, ...) is rank 0's own and is raised
        # as is; the workers, which hit the same error or wait in a collective, are stopped.
        if self.rank == 0 and self.workers and isinstance(exc, RuntimeError):
            self._failed_event.wait(_NOTICE_WAIT_S)
        if self.failure is not None and not isinstance(exc, (ValueError, FileNotFoundError)):
            self.raise_failure(exc)
        self._stopping = True
        self.close()

    @contextlib.contextmanager
    def step_guard(self):
        """Around every step on rank 0: a collective error caused by a dead rank becomes a
        `RankFailedError` naming it."""
        if self.failure is not None:
            self.raise_failure()
        self._busy += 1
        self._step_started = time.monotonic()
        try:
            yield
        except Exception as e:
            error: Exception | None = e
        else:
            error = None
        finally:
            self._busy -= 1
        if error is None:
            return
        if self.rank == 0 and self.workers and isinstance(error, RuntimeError):
            self._failed_event.wait(_NOTICE_WAIT_S)
        if self.failure is None and _looks_like_peer_failure(error):
            self.failure = f"tensor-parallel collective failed (did a rank die?): {error}"
        if self.failure is not None:
            self.raise_failure(error)
        raise error

    def send_plan(self, plan: Any) -> None:
        """Broadcast one step's plan. A decode step's plan is a few hundred bytes: it goes out
        in ONE fixed-size gloo broadcast (broadcast_object_list takes two round trips, one
        for the size); a larger plan (new prompts) follows in a second one."""
        data = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
        head = torch.zeros(_PLAN_HEAD, dtype=torch.uint8)
        head[:8] = torch.frombuffer(bytearray(len(data).to_bytes(8, "little")), dtype=torch.uint8)
        first = min(len(data), _PLAN_HEAD - 8)
        head[8 : 8 + first] = torch.frombuffer(bytearray(data[:first]), dtype=torch.uint8)
        group = ps.get_tp().cpu_group
        dist.broadcast(head, src=0, group=group)
        if len(data) > first:
            dist.broadcast(torch.frombuffer(bytearray(data[first:]), dtype=torch.uint8), src=0, group=group)

    # -- workers -----------------------------------------------------------------------------------
    def recv_plan(self) -> Any:
        group = ps.get_tp().cpu_group
        head = torch.empty(_PLAN_HEAD, dtype=torch.uint8)
        dist.broadcast(head, src=0, group=group)
        raw = head.numpy().tobytes()
        n = int.from_bytes(raw[:8], "little")
        first = min(n, _PLAN_HEAD - 8)
        data = raw[8 : 8 + first]
        if n > first:
            rest = torch.empty(n - first, dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=group)
            data += rest.numpy().tobytes()
        return pickle.loads(data)

    def report_ready(self) -> None:
        if self._conn is not None:
            self._conn.send(("ready",))

    # -- every rank ----------------------------------------------------------------------------
    def barrier(self) -> None:
        """A gloo barrier (which fails at once if a peer died, unlike NCCL)."""
        dist.barrier(group=ps.get_tp().cpu_group)

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=ps.get_tp().cpu_group)
        return int(t.item())

    def close(self) -> None:
        """Stop every rank (rank 0: tell the workers, then wait for them) and leave the group."""
        if self._closed:
            return
        self._closed = True
        if self.rank == 0 and self._serving and self.failure is None and dist.is_initialized():
            with contextlib.suppress(Exception):
                self.send_plan(None)  # the workers' loop ends
        self._stopping = True
        deadline = time.monotonic() + (10.0 if self._serving else 0.0)
        for fn in self.before_destroy:
            with contextlib.suppress(Exception):
                fn()
        if self.device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
        # Every rank destroys the group at the same time: NCCL's teardown is not purely local,
        # and a rank 0 that first waited for the workers to exit left them blocked in theirs.
        if dist.is_initialized():
            _destroy_group(timeout_s=10.0)
        # Serving workers leave their loop and exit by themselves; others are terminated.
        for w in self.workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
        self._terminate_workers()
        ps.reset_tp()
        self._close_done = True

    shutdown = close


def _destroy_group(timeout_s: float) -> None:
    """`destroy_process_group`, given up after `timeout_s`: with NCCL it can block for good,
    e.g. once the peers are gone or while captured CUDA graphs still hold the communicator
    (pytorch#115388; `close` releases the engine's graphs first). It runs on a daemon thread so
    a stuck destroy cannot keep the process alive."""

    def destroy() -> None:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()

    t = threading.Thread(target=destroy, name="kvserve-tp-destroy", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        logger.warning("tensor parallel: destroy_process_group still blocked after %.0f s; leaving it", timeout_s)


def _looks_like_peer_failure(e: BaseException) -> bool:
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset", "NCCL", "Broken pipe"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(rank: int, size: int, device: torch.device, init_method: str | None) -> None:
    """Join the default group (NCCL on CUDA, gloo on CPU) and create the gloo plan group."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = dict(backend=backend, rank=rank, world_size=size, timeout=_COLLECTIVE_TIMEOUT)
    if init_method is not None:
        kwargs["init_method"] = init_method
    if device.type == "cuda":
        # Binds the communicator to this GPU and creates it now, not lazily inside the first
        # collective (which may be a CUDA graph capture).
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    cpu_group = dist.new_group(backend="gloo", timeout=_PLAN_TIMEOUT)
    one_shot = _one_shot.create(dist.group.WORLD, cpu_group, device) if device.type == "cuda" else None
    ps.set_tp(ps.TPState(rank=rank, size=size, group=dist.group.WORLD, cpu_group=cpu_group, one_shot=one_shot))


def _fail_hook(rank: int) -> None:
    ranks = os.environ.get(FAIL_AT_START_ENV, "")
    if str(rank) in ranks.split(","):
        raise RuntimeError(f"injected start-up failure on rank {rank} ({FAIL_AT_START_ENV}={ranks})")


def start(args: Any, worker_main: Callable[[Any, TPGroup], None]) -> TPGroup:
    """Join or create the tensor-parallel group for `args.tensor_parallel_size` ranks.

    Returns rank 0's handle. Under torchrun, ranks other than 0 run `worker_main(args, group)`
    here and exit the process when it returns (they never come back to the caller)."""
    size = args.tensor_parallel_size
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process; "
                           "shut the other tensor-parallel engine down first")
    if torchrun_env():
        world = int(os.environ["WORLD_SIZE"])
        if world != size:
            raise ValueError(f"tensor_parallel_size={size} but torchrun started WORLD_SIZE={world} processes")
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = rank_device(args.device, local, size, spawned=False)
        _init_group(rank, size, device, None)  # env:// rendezvous
        group = TPGroup(rank, size, device)
        if rank == 0:
            return group
        code = 0
        try:
            _fail_hook(rank)
            worker_main(args, group)
        except BaseException:
            logger.error("tensor-parallel rank %d failed:\n%s", rank, traceback.format_exc())
            code = 1
        finally:
            group.close()
        # os._exit, not SystemExit: the engine may be built on a thread (the server's engine
        # thread), where SystemExit would end only that thread.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    device = rank_device(args.device, 0, size, spawned=True)
    port = _free_port()
    init = f"tcp://127.0.0.1:{port}"
    ctx = mp.get_context("spawn")
    workers = []
    for rank in range(1, size):
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_spawned_main, args=(args, rank, size, init, child, worker_main, logging.getLogger().level),
            name=f"kvserve-tp-rank{rank}", daemon=True,
        )
        proc.start()
        child.close()
        workers.append(_Worker(rank, proc, parent))
    group = TPGroup(0, size, device, workers)
    group.start_monitor()
    # Joining blocks until every rank has joined: do it on a helper thread, so a worker that
    # dies before joining is reported instead of hanging rank 0.
    joined: list[BaseException | None] = []

    def join() -> None:
        try:
            _init_group(0, size, device, init)
            joined.append(None)
        except BaseException as e:  # pragma: no cover - reported below
            joined.append(e)

    t = threading.Thread(target=join, name="kvserve-tp-join", daemon=True)
    t.start()
    while t.is_alive():
        if group.failure is not None:
            group._stopping = True
            group._terminate_workers()
            raise RankFailedError(group.failure)
        t.join(0.05)
    if joined and joined[0] is not None:
        group.close()
        raise joined[0]
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the join thread's setting is per thread
    return group


def _spawned_main(args: Any, rank: int, size: int, init: str, conn: Any,
                  worker_main: Callable[[Any, TPGroup], None], log_level: int) -> None:
    logging.basicConfig(level=log_level, format=f"%(levelname)s [rank {rank}] %(name)s: %(message)s")
    parent = os.getppid()

    def watch_parent() -> None:  # rank 0 gone (killed): nobody will send a plan again
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch_parent, name="kvserve-tp-parent", daemon=True).start()
    # Ranks share the machine's cores on CPU.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    group = None
    try:
        device = rank_device(args.device, rank, size, spawned=True)
        _init_group(rank, size, device, init)
        group = TPGroup(rank, size, device, conn=conn)
        _fail_hook(rank)
        worker_main(args, group)
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("failed", traceback.format_exc()))
        sys.stderr.flush()
        os._exit(1)
    if group is not None:
        group.close()
    os._exit(0)
