"""`python -m pipeline doctor --hostfile H`: check every host of a launch before any rank starts.

Each host gets one non-interactive ssh (BatchMode: a password or host-key prompt is a failure, as it
would be for pdsh or mpirun) that runs `probe.py` (standard library only) with this machine's
Python path, from stdin, so nothing has to be installed there first. Its answer is compared with this machine's:
Python, torch, deepspeed and transformers versions, the project importable at the same path, the
host's GPUs (count, compute capability, and whether its torch build has kernels for them) against
its slots, free disk for the output directory, that the output and cache directories are one shared
file system (a marker written on the first host must be read on every other), and, on the first
host (where rank 0 opens the rendezvous store), the master port. One row per host; every problem is
named. The accelerator of the ranks (CUDA or DeepSpeed's CPU accelerator) is decided here, per
host, not from the machine that launches.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..core.base import unique_suffix
from ..core.options import cache_directory
from . import probe as probe_module
from .hosts import active_hosts, is_local, slurm_allocation
from .probe import MARKER, PACKAGES

ACCELERATORS = ("auto", "cuda", "cpu")
SOCKET_IFNAMES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
V100_INSTALL = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
# The oldest Linux driver each CUDA major version runs on (NVIDIA's CUDA compatibility guide: minor
# version compatibility within a major version).
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
# Below this, NCCL's shared-memory transport between a node's ranks fails (NCCL's troubleshooting
# guide: Docker's default /dev/shm of 64 MB; it suggests --shm-size=1g).
MIN_SHM_GB = 1.0


def remote_probe(host: str, request: dict, timeout: float, transport: str = "ssh") -> dict:
    """`probe` on `host` over ssh, or as a one-task SLURM job step there; {"error": ...} when it cannot be run."""
    if transport == "srun":
        cmd = ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={host}", "--overlap", sys.executable, "-", json.dumps(request)]
    else:
        command = shlex.join([sys.executable, "-", json.dumps(request)])
        connect = min(10, max(1, int(timeout)))  # a dead host fails fast; the probe itself may take longer
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect}", host, command]
    # The probe step counts the node's GPUs: without the job's per-task binding, which srun would
    # otherwise read from the environment (SLURM_GPUS_PER_TASK, SLURM_GPU_BIND) and show it one GPU.
    env = {key: value for key, value in os.environ.items() if key not in ("SLURM_GPUS_PER_TASK", "SLURM_GPU_BIND")}
    try:  # probe.py arrives on stdin
        result = subprocess.run(
            cmd, input=Path(probe_module.__file__).read_bytes(), capture_output=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {timeout:g} s (host down, or a firewall dropping {transport}?)"}
    stderr = result.stderr.decode(errors="replace").strip().splitlines()
    last = stderr[-1] if stderr else ""
    if transport == "ssh" and result.returncode == 255:
        return {"error": f"ssh failed non-interactively: {last} (set up key login: see docs 'Multi-node')"}
    if result.returncode == 127 or "No such file or directory" in last:
        return {"error": f"{sys.executable} not found there (every host needs the same Python at the same path)"}
    if result.returncode != 0:
        return {"error": f"probe over {transport} failed with exit code {result.returncode}: {last}"}
    return json.loads(result.stdout.decode().strip().splitlines()[-1])  # shell start-up files may print first


def probe_on(host: str, request: dict, timeout: float, transport: str) -> dict:
    """The facts of `host`: here directly, over ssh, or (SLURM: every node, this one too) in a job step."""
    if transport == "ssh" and is_local(host):
        return probe_module.probe(request)
    return remote_probe(host, request, timeout, transport)


def _capability(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def arch_problem(capability: str, arch_list: list[str], torch_version: str | None) -> str | None:
    """Why this torch build cannot run kernels on a GPU of `capability` ("7.0"), or None.

    A cubin for sm_XY runs on the same major version with minor >= Y; PTX (compute_XY) is
    compiled by the driver for any GPU of capability >= X.Y."""
    have = _capability(capability)
    if not arch_list:
        return (
            f"torch {torch_version} has no CUDA kernels (a CPU build) but the host has GPUs of compute capability "
            f"{capability}: install a CUDA build (docs/gpu-clusters.md)"
        )
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        built = (int(digits[:-1]), int(digits[-1])) if digits.isdigit() and len(digits) >= 2 else None
        if built and ((kind == "sm" and built[0] == have[0] and built[1] <= have[1]) or (kind == "compute" and built <= have)):
            return None
    hint = f": {V100_INSTALL} (CUDA 12.6 builds still carry sm_70)" if have == (7, 0) else ""
    return (
        f"GPU compute capability {capability} (sm_{have[0]}{have[1]}) is not among torch {torch_version}'s CUDA "
        f"architectures ({' '.join(arch_list)}); every kernel would fail with 'no kernel image is available'; "
        f"install a torch build that includes it{hint}"
    )


def driver_problem(facts: dict) -> str | None:
    """Why torch cannot use this host's GPUs at all, or None: no compute capability to check the
    build against, or a driver too old for torch's CUDA (then is_available() is False and the
    architecture list is empty)."""
    if not facts["capabilities"]:
        return (
            f"nvidia-smi lists {facts['gpus']} GPUs but no compute capability (drivers older than 510 do not "
            "report it): update the NVIDIA driver"
        )
    if facts.get("cuda_available") is False:
        major = int(str(facts.get("torch_cuda") or "0").split(".")[0])
        needed = f"; CUDA {major}.x needs driver {MIN_DRIVER[major]} or newer" if major in MIN_DRIVER else ""
        return (
            f"torch {facts['torch']} (CUDA {facts.get('torch_cuda')}) cannot use the GPUs here "
            f"(torch.cuda.is_available() is False) with NVIDIA driver {facts.get('driver')}{needed}"
        )
    return None


def build_problem(ops: list[str], facts: dict) -> str | None:
    """What stops this host from building `ops` at the first step (then every rank dies inside
    `deepspeed.initialize`), or None: JIT builds need ninja and a C++ compiler, CUDA ops also
    CUDA_HOME with an nvcc of torch's CUDA major version (op_builder/builder.py)."""
    missing = [op for op in ops if op not in facts.get("built_ops", [])]
    if not missing:
        return None
    lacks = [] if facts.get("ninja") else ["ninja (pip install ninja)"]
    lacks += [] if facts.get("cxx") else ["a C++ compiler (c++)"]
    torch_major = str(facts.get("torch_cuda") or "").split(".")[0]
    if any(not op.startswith("cpu_") for op in missing):
        if not facts.get("cuda_home"):
            lacks.append(f"a CUDA {torch_major} toolkit (CUDA_HOME is not set and no nvcc was found)")
        elif not facts.get("nvcc"):
            lacks.append(f"nvcc in CUDA_HOME={facts['cuda_home']}/bin")
        elif facts["nvcc"].split(".")[0] != torch_major:
            lacks.append(f"nvcc of CUDA {torch_major}.x to match torch (CUDA_HOME has nvcc {facts['nvcc']})")
    if not lacks:
        return None
    prebuild = " ".join(f"DS_BUILD_{op.upper()}=1" for op in missing)
    return (
        f"DeepSpeed builds {', '.join(missing)} at the first step and this host lacks {'; '.join(lacks)}: install "
        f"them, or prebuild with `{prebuild} pip install deepspeed` (`ds_report` shows what is built)"
    )


def network_problems(facts: dict, ifnames: dict[str, str], ranks: int, multi_host: bool) -> list[str]:
    """Interfaces named in GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME that this host lacks; a host name
    that gloo would turn into a loopback or no address when ranks on other hosts must reach it
    (gloo then falls back to loopback and the other hosts wait until the timeout); a /dev/shm
    too small for the ranks of one node to share memory."""
    found, have = [], facts["interfaces"]
    gloo = [name for name in ifnames.get("GLOO_SOCKET_IFNAME", "").split(",") if name]
    found += [f"GLOO_SOCKET_IFNAME names {name}, not an interface here ({', '.join(have)})" for name in gloo if name not in have]
    nccl = ifnames.get("NCCL_SOCKET_IFNAME", "")
    if nccl and not nccl.startswith("^"):  # ^ excludes; =NAME is exact; otherwise NAME is a prefix
        names = [name for name in nccl.lstrip("=").split(",") if name]
        exact = nccl.startswith("=")
        if not any(i == n or (not exact and i.startswith(n)) for i in have for n in names):
            found.append(f"NCCL_SOCKET_IFNAME={nccl} matches no interface here ({', '.join(have)})")
    if multi_host and not gloo:
        where = ", ".join(facts["addresses"]) or "no address"
        if not facts["addresses"] or all(a.startswith("127.") for a in facts["addresses"]):
            found.append(
                f"host name {facts['hostname']} resolves to {where}: the other hosts cannot reach gloo there; "
                "fix its entry in /etc/hosts or DNS, or set GLOO_SOCKET_IFNAME to the cluster interface in the env file"
            )
    if ranks > 1 and facts["shm_gb"] < MIN_SHM_GB:
        found.append(
            f"/dev/shm has {facts['shm_gb']:.2f} GB, less than {MIN_SHM_GB:g} GB: the {ranks} ranks here share memory "
            "through it (NCCL, DeepSpeed's CPU all-reduce); in a container, start it with --shm-size=1g or more"
        )
    return found


def counted(facts: dict) -> str:
    """A host's GPU count and who counted it: torch sees only the GPUs CUDA_VISIBLE_DEVICES leaves it."""
    if facts.get("gpu_source") == "torch":
        return f"{facts['gpus']} GPUs (counted by torch: no nvidia-smi there; CUDA_VISIBLE_DEVICES narrows torch's count)"
    return f"{facts['gpus']} GPUs"


def choose_accelerator(requested: str, facts: dict[str, dict], hosts: dict[str, int]) -> tuple[str, list[str]]:
    """The accelerator every rank uses, from what each host has; with the problems that forbid it.

    auto: CUDA when every host has GPUs, DeepSpeed's CPU accelerator when none has; a mix is refused
    (one job cannot run NCCL ranks and gloo ranks together)."""
    alive = {host: f for host, f in facts.items() if "error" not in f}
    with_gpus = [host for host, f in alive.items() if f["gpus"]]
    if requested != "auto":
        choice = requested
    elif with_gpus and len(with_gpus) < len(alive):
        without = [host for host in alive if host not in with_gpus]
        return "mixed", [
            f"GPUs on {', '.join(with_gpus)} but none on {', '.join(without)}: one job cannot mix CUDA "
            "and CPU ranks; remove the hosts without GPUs, or pass --accelerator cpu to run every rank on CPUs"
        ]
    else:
        choice = "cuda" if with_gpus else "cpu"
    problems = []
    if choice == "cuda":
        for host, f in alive.items():
            if f["gpus"] < hosts[host]:
                problems.append(f"{host}: slots={hosts[host]} but {counted(f)} (fix the hostfile's slots, or --accelerator cpu)")
            if f["gpus"] and driver_problem(f):
                problems.append(f"{host}: {driver_problem(f)}")
                continue
            for capability in f["capabilities"]:
                issue = arch_problem(capability, f["arch_list"], f["torch"])
                if issue:
                    problems.append(f"{host}: {issue}")
    return choice, problems


def lock_problem(lock: dict) -> str:
    """A lock left in torch's extension directory (probe.extension_locks), and how to clear it."""
    op = Path(lock["path"]).parent
    state = f"beside a built {op.name}" if lock["built"] else f"and no built {op.name}"
    return (
        f"{lock['path']}: a lock left {lock['age_s'] // 60} min ago by a build of DeepSpeed's {op.name} op that did not "
        f"finish ({state}); every run that builds or loads {op.name} here waits on it forever (torch/utils/file_baton.py "
        f"has no timeout). Unless a build is running on this host now, remove it: rm {lock['path']}"
    )


def problems(facts: dict, here: dict, min_free_gb: float, port: int) -> list[str]:
    """What is wrong with one host, apart from its accelerator (see `choose_accelerator`) and network."""
    if "error" in facts:
        return [facts["error"]]
    found = [
        f"{key} {facts[key] or 'not installed'} (here {here[key]})" for key in ("python", *PACKAGES) if facts[key] != here[key]
    ]
    if facts["project"] != here["project"]:
        found.append(f"the project is not importable at {Path(here['project']).parent.parent} (found: {facts['project']})")
    if facts["free_gb"] < min_free_gb:
        found.append(f"{facts['free_gb']:.1f} GB free for the output directory, less than {min_free_gb:g} GB")
    if facts["port_free"] is False:
        found.append(f"master port {port} is in use (another job? choose --master-port)")
    found += [lock_problem(lock) for lock in facts.get("extension_locks", [])]
    for name, seen in facts["shared"].items():
        if not seen:
            found.append(
                f"{name} is not the first host's directory (the marker {MARKER}* the first host wrote there is missing here): rank 0 writes "
                "the tokenized cache, tokenizer and checkpoints there for every rank, so every host needs the "
                "same shared file system (NFS, Lustre, ...) at the same path; give --output-dir/--cache-dir on it"
            )
    return found


def check(
    hosts: dict[str, int],
    output_dir: str,
    cache_dir: str,
    master_port: int,
    requested: str = "auto",
    timeout: float = 60.0,
    min_free_gb: float = 1.0,
    transport: str = "ssh",
    ops: tuple[str, ...] = (),
    ifnames: dict[str, str] | None = None,
) -> tuple[bool, str, dict]:
    """Probe every host, print one row per host and each problem; (no problems, accelerator, facts per host).

    `ops`: the DeepSpeed ops the run builds on GPUs (`ops_to_build`); `ifnames`: the ranks'
    GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME, where set.

    The first host (rank 0's) is probed first and writes the shared-directory markers; the others,
    probed all at once, must read them."""
    repo = str(Path(__file__).resolve().parents[2])  # the checkout: pipeline/launch/doctor.py
    first = next(iter(hosts))
    token = unique_suffix()
    request = {
        "repo": repo,
        "output_dir": output_dir,
        "port": 0,
        "token": token,
        "dirs": [output_dir, cache_dir] if len(hosts) > 1 else [],
        "write": False,
    }
    here = probe_module.probe({**request, "dirs": []})
    facts = {first: probe_on(first, {**request, "port": master_port, "write": True}, timeout, transport)}
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        futures = {host: pool.submit(probe_on, host, request, timeout, transport) for host in hosts if host != first}
        facts.update({host: future.result() for host, future in futures.items()})
    if request["dirs"]:
        probe_on(first, {**request, "remove": True}, timeout, transport)
    accelerator, accelerator_problems = choose_accelerator(requested, facts, hosts)

    rows = [("host", "slots", "hostname", "python", *PACKAGES, "GPUs", "accelerator", "free GB", "status")]
    found = {}
    for host, slots in hosts.items():
        f = facts[host]
        found[host] = problems(f, here, min_free_gb, master_port)
        found[host] += [p.split(": ", 1)[1] for p in accelerator_problems if p.startswith(f"{host}: ")]
        if "error" not in f:
            found[host] += network_problems(f, ifnames or {}, slots, len(hosts) > 1)
            built = build_problem(list(ops), f) if accelerator == "cuda" else None
            found[host] += [built] if built else []
        cells = (
            ("-",) * 6
            if "error" in f
            else (
                f["hostname"],
                f["python"],
                *(str(f[p]) for p in PACKAGES),
                f"{f['gpus']}"
                + (f" (sm {','.join(f['capabilities'])})" if f["capabilities"] else "")
                + (f" via {f['gpu_source']}" if f.get("gpu_source") == "torch" else ""),
            )
        )
        free = "-" if "error" in f else f"{f['free_gb']:.1f}"
        rows.append((host, str(slots), *cells, accelerator, free, "FAILED" if found[host] else "ok"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    failed = [host for host in hosts if found[host]]
    for host in failed:
        for problem in found[host]:
            print(f"doctor: {host}: {problem}", file=sys.stderr)
    general = [p for p in accelerator_problems if not any(p.startswith(f"{host}: ") for host in hosts)]
    for problem in general:
        print(f"doctor: {problem}", file=sys.stderr)
    if failed or general:
        print(f"doctor: {len(failed)} of {len(hosts)} hosts failed{': ' + ', '.join(failed) if failed else ''}", file=sys.stderr)
    return not (failed or general), accelerator, facts


def add_arguments(p) -> None:
    p.add_argument("--hostfile", default="hostfiles/localhost", help="lines 'HOST slots=N' (default: %(default)s)")
    p.add_argument(
        "--launcher",
        choices=("ssh", "slurm"),
        default="ssh",
        help="slurm: check the nodes of this SLURM allocation, one job step per node (default: the hostfile over ssh)",
    )
    p.add_argument("--include", default="", help="deepspeed's host/slot filter")
    p.add_argument("--exclude", default="", help="deepspeed's host/slot filter")
    p.add_argument(
        "--accelerator",
        choices=ACCELERATORS,
        default="auto",
        help="cuda, cpu, or auto: CUDA where every host has GPUs, CPU where none has (default: %(default)s)",
    )
    p.add_argument("--master-port", type=int, default=29500, help="checked free on the first host (default: %(default)s)")
    p.add_argument(
        "--output-dir", default="runs", help="checked for free disk and sharing, relative to the project (default: %(default)s)"
    )
    p.add_argument("--cache-dir", default="", help="checked for sharing (default: OUTPUT_DIR/cache)")
    p.add_argument("--min-free-gb", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds per host, a cold torch import from a shared file system included (default: %(default)s)",
    )


def main(args) -> int:
    slurm = args.launcher == "slurm"
    hosts = slurm_allocation() if slurm else active_hosts(args.hostfile, args.include, args.exclude)
    # Imported here: the launcher imports this module. The ranks see the interfaces named in the
    # cluster's env file (HOSTFILE.env, as ./launch.sh reads it) or in this environment.
    from .launcher import read_env_file

    env_file = Path(args.hostfile + ".env")
    env = {**os.environ, **(read_env_file(env_file) if not slurm and env_file.is_file() else {})}
    ok, _, _ = check(
        hosts,
        args.output_dir,
        cache_directory(args.cache_dir, args.output_dir),
        args.master_port,
        args.accelerator,
        args.timeout,
        args.min_free_gb,
        transport="srun" if slurm else "ssh",
        ifnames={key: env[key] for key in SOCKET_IFNAMES if key in env},
    )
    return 0 if ok else 1
