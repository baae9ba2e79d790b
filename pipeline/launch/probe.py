"""The facts `python -m pipeline doctor` collects on each host, run there over ssh from stdin.

Standard library only, and no imports from the project: nothing has to be installed on a host for
this to answer (a missing torch is one of the facts). `doctor.py` compares the answers.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("torch", "deepspeed", "transformers")
# Written by the doctor into the output and cache directories as MARKER + its token (host-pid-random):
# doctors of other launches, on this host or another, never read or replace each other's marker.
MARKER = ".pipeline-doctor-marker-"
# The device nodes CUDA opens: a container given GPUs has them even where nvidia-smi is not installed
# (the NVIDIA container toolkit adds nvidia-smi only with the `utility` driver capability).
NVIDIA_DEVICES = "/dev/nvidia[0-9]*"


def gpu_facts() -> dict:
    """GPUs of this host, its driver, whether torch can use them, and the CUDA architectures its torch
    build has kernels for. Counted by nvidia-smi (every GPU of the host), else by torch (`gpu_source`)."""
    smi = nvidia_smi_gpus()
    torch = importable_torch() if (smi[0] if smi else glob.glob(NVIDIA_DEVICES)) else None
    if smi:
        (gpus, capabilities, driver), source = smi, "nvidia-smi"
    elif torch:
        (gpus, capabilities), driver, source = torch_gpus(torch), kernel_driver(), "torch"
    else:
        gpus, capabilities, driver, source = 0, [], None, None
    facts = {"arch_list": [], "torch_cuda": None, "cuda_available": None}
    if gpus and torch:
        facts = {
            "arch_list": torch.cuda.get_arch_list(),  # empty when the driver is too old for the build
            "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            **build_facts(torch),
        }
    return {"gpus": gpus, "capabilities": sorted(set(capabilities)), "driver": driver, "gpu_source": source, **facts}


def importable_torch():
    """torch, or None where it is not installed (reported as missing by the version check)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def nvidia_smi_gpus() -> tuple[int, list[str], str | None] | None:
    """(GPUs, their compute capabilities, the driver) as nvidia-smi lists them; None without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    query = subprocess.run(
        ["nvidia-smi", "--query-gpu=compute_cap,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if query.returncode == 0:
        rows = [[cell.strip() for cell in line.split(",")] for line in query.stdout.splitlines() if line.strip()]
        return len(rows), [row[0] for row in rows], rows[0][1] if rows else None
    # drivers older than 510 have no compute_cap field
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    return sum(line.startswith("GPU ") for line in listing.splitlines()), [], None


def torch_gpus(torch) -> tuple[int, list[str]]:
    """The GPUs torch sees (those CUDA_VISIBLE_DEVICES leaves) and their compute capabilities."""
    count = torch.cuda.device_count()
    return count, ["{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(count)]


def kernel_driver() -> str | None:
    """The NVIDIA kernel driver's version, as its /proc file states it (nvidia-smi reports the same)."""
    path = Path("/proc/driver/nvidia/version")
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d[\d.]*)", path.read_text()) if path.is_file() else None
    return found[1] if found else None


def build_facts(torch) -> dict:
    """What DeepSpeed needs to JIT-build a CUDA op here (op_builder/builder.py), and the ops already
    built: installed prebuilt (DS_BUILD_*=1 pip install deepspeed), or in torch's JIT cache."""
    from torch.utils.cpp_extension import CUDA_HOME, _get_build_directory

    nvcc = None
    if CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").is_file():
        shown = subprocess.run([str(Path(CUDA_HOME, "bin", "nvcc")), "-V"], capture_output=True, text=True, timeout=10)
        release = re.search(r"release (\d+\.\d+)", shown.stdout)
        nvcc = release[1] if release else None
    built = []
    spec = importlib.util.find_spec("deepspeed")
    installed = Path(spec.origin).with_name("git_version_info_installed.py") if spec else None
    if installed and installed.is_file():  # read, not imported: importing deepspeed takes seconds
        for node in ast.parse(installed.read_text()).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "installed_ops":
                built = [op for op, present in ast.literal_eval(node.value).items() if present]
    for op in ("fused_adam", "fused_lamb", "fused_lion", "cpu_adam", "cpu_adagrad", "cpu_lion"):
        if Path(_get_build_directory(op, verbose=False), f"{op}.so").is_file():
            built.append(op)
    return {
        "cuda_home": CUDA_HOME,
        "nvcc": nvcc,
        "ninja": shutil.which("ninja") is not None,
        "cxx": shutil.which(os.environ.get("CXX", "c++")) is not None,
        "built_ops": sorted(set(built)),
    }


def extension_locks() -> list[dict]:
    """The `lock` files in torch's JIT extension directories (TORCH_EXTENSIONS_DIR, else
    ~/.cache/torch_extensions/<python>_<accelerator>: cpp_extension.py `_get_build_directory`), with
    their age and whether the op beside them is built. A build killed before it ends leaves its lock
    (`_jit_compile` removes it in a `finally`, which a SIGKILL skips), and every later build or load of
    that op waits on it with no timeout (torch/utils/file_baton.py `FileBaton.wait`)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "torch_extensions"
    )
    locks = []
    for lock in sorted({*Path(root).glob("*/lock"), *Path(root).glob("*/*/lock")}):
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # a build that ended meanwhile
            continue
        locks.append({"path": str(lock), "age_s": round(age), "built": any(lock.parent.glob("*.so"))})
    return locks


def network_facts() -> dict:
    """This host's network interfaces, the addresses its name resolves to (gloo listens on them
    unless GLOO_SOCKET_IFNAME names an interface), and the size of /dev/shm."""
    try:
        addresses = sorted({info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)})
    except OSError:
        addresses = []
    return {
        "interfaces": [name for _, name in socket.if_nameindex()],
        "addresses": addresses,
        "shm_gb": shutil.disk_usage("/dev/shm").total / 1e9 if Path("/dev/shm").is_dir() else 0.0,
    }


def shared_dirs(repo: str, dirs: list[str], token: str, write: bool) -> dict:
    """Write `token` into each directory's marker (the first host), or read it back (every other host)."""
    seen = {}
    for name in dirs:
        marker = Path(repo, name) / f"{MARKER}{token}"
        if write:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{token}\nwritten by `python -m pipeline doctor` to check for a shared file system\n")
            seen[name] = True
        else:
            seen[name] = marker.is_file() and marker.read_text().split("\n", 1)[0] == token
    return seen


def probe(request: dict) -> dict:
    """Facts about the host this runs on. `request`: repo, output_dir, port (0: not checked), and
    dirs/token/write for the shared file-system marker; with remove, only that marker is removed."""
    if request.get("remove"):  # the doctor's last word to the first host, once every host has read it
        for name in request["dirs"]:
            Path(request["repo"], name, f"{MARKER}{request['token']}").unlink(missing_ok=True)
        return {}
    import importlib.metadata
    import importlib.util

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    repo = request["repo"]
    sys.path.insert(0, repo)
    spec = importlib.util.find_spec("pipeline")
    out = Path(repo, request["output_dir"])
    while not out.exists():  # the output directory may not exist yet: its disk is the nearest parent's
        out = out.parent
    port_free = None
    if request["port"]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous store binds
            try:
                s.bind(("", request["port"]))
                port_free = True
            except OSError:
                port_free = False
    shared = shared_dirs(repo, request["dirs"], request["token"], request["write"]) if request.get("dirs") else {}
    return {
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        **versions,
        "project": spec.origin if spec else None,
        **gpu_facts(),
        **network_facts(),
        "extension_locks": extension_locks(),
        "free_gb": shutil.disk_usage(out).free / 1e9,
        "port_free": port_free,
        "shared": shared,
    }


if __name__ == "__main__":  # run over ssh by `doctor.remote_probe`
    print(json.dumps(probe(json.loads(sys.argv[1]))))
