"""Rank helpers: who this process is, the one rank-aware logger, and small collectives.

Nothing else in the runtime reads RANK or WORLD_SIZE. The launcher (deepspeed's pdsh/local runner,
OpenMPI, or SLURM's srun) sets them before Python starts, so rank and world size are known before
the process group exists, which is what lets configs be checked before any rank waits on another.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

# Where each launcher puts rank, world size and local rank: deepspeed's launcher, OpenMPI, srun.
RANK_VARIABLES = {
    "RANK": ("OMPI_COMM_WORLD_RANK", "SLURM_PROCID"),
    "WORLD_SIZE": ("OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS"),
    "LOCAL_RANK": ("OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"),
}


def in_slurm_step() -> bool:
    """Started by srun as one task of a job step. (A batch script also sees SLURM_PROCID=0 and the
    allocation's SLURM_NTASKS, but it is not a rank: only a step has SLURM_STEP_ID.)"""
    return "SLURM_STEP_ID" in os.environ


def _env_int(name: str, default: int) -> int:
    for key in (name, *RANK_VARIABLES[name]):
        if key in os.environ and (not key.startswith("SLURM_") or in_slurm_step()):
            return int(os.environ[key])
    return default


def rank() -> int:
    return _env_int("RANK", default=0)


def world_size() -> int:
    return _env_int("WORLD_SIZE", default=1)


def local_rank() -> int:
    """This rank's index on its node: the GPU it owns."""
    return _env_int("LOCAL_RANK", default=0)


def is_main() -> bool:
    return rank() == 0


def import_deepspeed() -> None:
    """Import DeepSpeed without the mlflow its autotuner imports when mlflow is installed (1.6 s of
    every rank's start and of the runner's, py-spy on a 2-core machine): it serves only `deepspeed
    --autotuning`'s own trial logging, which this pipeline never asks for. A run that tracks with
    MLflow imports it later as usual."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        return
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, which the autotuner expects
    try:
        import deepspeed  # noqa: F401
    finally:
        del sys.modules["mlflow"]


class _StdoutHandler(logging.StreamHandler):
    """Writes to the `sys.stdout` of the moment, not the one the handler was made with: a caller
    that replaces stdout (a test's capture, a second command in one process) gets the lines."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass


def get_logger() -> logging.Logger:
    """INFO on rank 0, warnings and errors only on the others, so console lines are not repeated."""
    logger = logging.getLogger("pipeline")
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s" if is_main() else f"[rank {rank()}] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if is_main() else logging.WARNING)
        logger.propagate = False
    return logger


class Progress:
    """Progress of a long stage on rank 0 (tokenizing, evaluating): a tqdm bar with the rate and ETA
    on a terminal; into a log file (stderr not a terminal) one line when the stage ends, not a
    stream of bar redraws (to `log`, default the rank-aware logger). `update(n)` counts items; use as
    a context manager."""

    def __init__(self, desc: str, total: int | None, unit: str = "records", log=None):
        from tqdm import tqdm

        self.desc, self.unit, self.count, self.start = desc, unit, 0, time.perf_counter()
        self.log = log or get_logger().info
        self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", disable=not (is_main() and sys.stderr.isatty()), leave=False)

    def update(self, n: int, estimated_total: int | None = None) -> None:
        """Count `n` more; `estimated_total` revises the total where it is not known ahead (an ETA)."""
        self.count += n
        if estimated_total is not None:
            self.bar.total = max(estimated_total, self.count)
        self.bar.update(n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if exc[0] is None:
            elapsed = time.perf_counter() - self.start
            self.log(
                f"{self.desc}: {self.count} {self.unit} in {elapsed:.1f} s ({self.count / max(elapsed, 1e-9):.0f} {self.unit}/s)"
            )


# A gloo group with its own, longer timeout, for the other ranks waiting on rank 0's one-off work
# (`main_first`): tokenizing a million records must not trip the training collectives' timeout.
_rank0_work = None


def init(timeout_minutes: float, rank0_wait_minutes: float | None = None) -> None:
    """Start the process group (gloo on the CPU, NCCL on GPUs) with a bounded collective timeout,
    and the group `main_first` waits in (`rank0_wait_minutes`, default the same bound)."""
    global _rank0_work
    import deepspeed
    import torch.distributed as td

    if "OMPI_COMM_WORLD_RANK" in os.environ and "RANK" not in os.environ:
        _mpi_discovery()
    elif in_slurm_step() and "RANK" not in os.environ:
        # DeepSpeed's init_distributed reads these (MASTER_ADDR/PORT come from `launch.sh --launcher slurm`).
        os.environ.update({name: str(_env_int(name, default=0)) for name in RANK_VARIABLES})
    device = bind_device()
    note = build_note(comm_ops()) if is_main() else None
    if note:
        print(note, flush=True)
    # One line per rank (in its rank log when the launcher keeps them): where each rank runs.
    print(f"rank {rank()} of {world_size()}: host {socket.gethostname()}, pid {os.getpid()}, device {device}", flush=True)
    timeout = timedelta(minutes=timeout_minutes)
    # DeepSpeed creates its ZeRO process groups without a timeout, so they get torch's default
    # (30 minutes on gloo) instead of this one: a frozen rank would outlast the bound. Make the
    # default ours.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(timeout=timeout, verbose=False)
    # Gloo connects every pair of ranks while the group is created, within the group's timeout: a rank
    # whose host name resolves to loopback would make the others wait that long. Create it with the
    # collective timeout, so a bad address fails as fast as the default group, then let it wait longer.
    _rank0_work = td.new_group(backend="gloo", timeout=timeout)
    c10d._set_pg_timeout(timedelta(minutes=rank0_wait_minutes or timeout_minutes), _rank0_work)
    release_shared_memory()


def bind_device() -> str:
    """Make this rank's accelerator the current device, before the first collective of any kind.

    NCCL's object collectives (`broadcast_object_list`, used by `main_first` before the engine
    exists) stage their tensors on `torch.cuda.current_device()`, which is cuda:0 on every rank
    until someone calls `set_device`; DeepSpeed binds the process group to cuda:LOCAL_RANK, so any
    other rank would fail ("backend constrained to cuda:N"). The engine binds the device too, but
    only later, in `deepspeed.initialize`.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return "cpu"
    index = device_index(local_rank(), accelerator.device_count(), in_slurm_step())
    if index is None:  # said by the rank that finds it: it may not be rank 0, which prints config errors
        print(
            f"[rank {rank()}] error: local rank {local_rank()} on {socket.gethostname()} but only "
            f"{accelerator.device_count()} {accelerator.device_name()} device(s) visible there: "
            "the hostfile or allocation gives this host more ranks than GPUs",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(2)
    # DeepSpeed takes the device from LOCAL_RANK (init_distributed's device_id, the engine's set_device).
    os.environ["LOCAL_RANK"] = str(index)
    accelerator.set_device(index)
    return accelerator.device_name(index)


def device_index(local: int, visible: int, slurm_step: bool) -> int | None:
    """The device a rank with local rank `local` uses among the `visible` ones, or None if it has none.

    Every launcher shows each rank all of the node's GPUs, and local rank N takes GPU N, except
    SLURM with --gpus-per-task=1 or --gpu-bind=single:1: it narrows CUDA_VISIBLE_DEVICES to the
    task's own GPU, which the task sees as device 0 whatever its SLURM_LOCALID."""
    if local < visible:
        return local
    if slurm_step and visible == 1:
        return 0
    return None


def comm_ops() -> list[str]:
    """The op DeepSpeed's CPU accelerator JIT-builds in `init_distributed`: its shared-memory all-reduce."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return [accelerator.create_op_builder("ShareMemCommBuilder").NAME] if accelerator.device_name() == "cpu" else []


def unbuilt_ops(names: list[str]) -> list[str]:
    """Those of DeepSpeed's ops `names` that loading will JIT-build now: neither installed prebuilt
    (`DS_BUILD_*=1 pip install deepspeed`) nor built in torch's extension directory (ops/op_builder/builder.py `load`)."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory  # the directory torch's JIT loader uses

    return [
        name
        for name in names
        if not installed_ops.get(name) and not Path(_get_build_directory(name, verbose=False), f"{name}.so").is_file()
    ]


def build_note(names: list[str]) -> str | None:
    """The line rank 0 prints before DeepSpeed builds any of `names`, which it does silently for a minute or more.

    A build killed before it ends leaves its `lock`, on which every later load of the op waits with no
    timeout (torch/utils/file_baton.py `FileBaton.wait`, from cpp_extension's `_jit_compile`): the
    note says where to look if the wait does not end."""
    missing = unbuilt_ops(names)
    if not missing:
        return None
    return (
        f"note: first DeepSpeed run here: building its {', '.join(missing)} op (a minute or a few, once per machine; "
        "prebuilding: docs/troubleshooting.md); far longer means a lock left by an interrupted build: "
        "`python -m pipeline doctor` names it"
    )


def release_shared_memory() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from /dev/shm once every rank has mapped it.

    DeepSpeed's CPU backend gives each rank of a single-node job a ~70 MB shared-memory buffer named
    after the master address, port and rank, and never unlinks it: each run leaves its buffers
    behind until the machine runs out of memory. `init_distributed` returns once this rank has
    mapped every other rank's buffer; after a barrier all have, and the names can go (the mappings
    stay valid, and the memory is freed when the last rank exits, however it exits).
    """
    import torch.distributed as td

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port and td.is_initialized()):
        return
    td.barrier()
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank()}").unlink(missing_ok=True)


def _mpi_discovery() -> None:
    """Under OpenMPI, DeepSpeed's discovery (mpi4py) sets rank, world size and local rank, but takes
    the master address from rank 0's `hostname -I` and port 29500: keep those launch.sh exported."""
    from deepspeed.comm.comm import mpi_discovery

    chosen = {key: os.environ[key] for key in ("MASTER_ADDR", "MASTER_PORT") if key in os.environ}
    mpi_discovery(verbose=False)
    os.environ.update(chosen)


def shutdown(wait_for_others: bool = True) -> None:
    """Leave the process group; exiting with it alive aborts in gloo's threads (SIGABRT).

    After an error, wait only briefly: the other ranks may never arrive. Ranks that raised the same
    error together (a full disk, a bad checkpoint) then leave together; one tearing its connections
    down while another's gloo threads still use them has aborted both (seen on CPU ranks)."""
    import torch.distributed as td

    if td.is_initialized():
        if wait_for_others:
            td.barrier()
        elif _rank0_work is not None:
            with contextlib.suppress(Exception):  # a rank that never arrives: leave anyway
                td.monitored_barrier(group=_rank0_work, timeout=timedelta(seconds=10))
        # DeepSpeed's own teardown also drops its cached groups (its clone of the world group among
        # them): a process that starts another run (an in-process test after a refusal) would otherwise
        # build its engine on the destroyed group.
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


def barrier() -> None:
    import torch.distributed as td

    td.barrier()


def broadcast_object(obj, group=None):
    """Rank 0's value of `obj` on every rank (of `group`, default all)."""
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0, group=group)
    return box[0]


def all_gather_objects(obj) -> list:
    import torch.distributed as td

    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor):
    import torch.distributed as td

    td.all_reduce(tensor, op=td.ReduceOp.SUM)
    return tensor


def main_first(fn):
    """Run `fn` on rank 0 while the other ranks wait; every rank gets its result or its error.

    Used for work that must happen once (data checks and caching, writing the export, rank 0's
    files). A failure on rank 0 becomes an error on every rank instead of leaving the others
    waiting; a full disk becomes a ConfigError (one line, exit 2). The others wait
    in their own group, bounded by `init`'s rank0_wait_minutes, not the collective timeout.
    """
    from .base import ConfigError, disk_full
    from .stop import Stopped  # here, not at the top: stop.py imports this module

    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # re-raised below on every rank
            error = e
            if disk_full(e):  # the user can fix it: one line on every rank, not a traceback
                error = ConfigError(f"no space left on the output file system: {e.filename or e}; free some space and resume")
    # What the other ranks raise: the same kind for a user's error and a stop request, else "rank 0 failed".
    kind = next((k for k in (ConfigError, Stopped) if isinstance(error, k)), None)
    shared = broadcast_object((result, None if error is None else (kind and kind.__name__, f"{error}")), _rank0_work)
    if error is not None:
        raise error
    result, failure = shared
    if failure is not None:
        kind_name, message = failure
        known = {k.__name__: k for k in (ConfigError, Stopped)}
        raise known[kind_name](message) if kind_name else RuntimeError(f"rank 0 failed: {message}")
    return result
