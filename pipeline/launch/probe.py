"""The facts `python -m pipeline doctor` collects on each host, run there over ssh from stdin.

Standard library only, and no imports from the project: nothing has to be installed on a host for
this to answer (a missing torch is one of the facts). `doctor.py` compares the answers.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

PACKAGES = ("torch", "deepspeed", "transformers")
MARKER = ".pipeline-doctor-marker"  # written by the doctor into the output and cache directories


def gpu_facts() -> dict:
    """GPUs of this host (nvidia-smi) and the CUDA architectures its torch build has kernels for."""
    gpus, capabilities = 0, []
    if shutil.which("nvidia-smi"):
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
        if query.returncode == 0:
            capabilities = [line.strip() for line in query.stdout.splitlines() if line.strip()]
            gpus = len(capabilities)
        else:  # drivers older than 510 have no compute_cap field
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
            gpus = sum(line.startswith("GPU ") for line in listing.splitlines())
    arch_list, torch_cuda = [], None
    if gpus:
        try:
            import torch

            arch_list, torch_cuda = torch.cuda.get_arch_list(), torch.version.cuda
        except ImportError:
            pass  # reported as a missing torch by the version check
    return {"gpus": gpus, "capabilities": sorted(set(capabilities)), "arch_list": arch_list, "torch_cuda": torch_cuda}


def shared_dirs(repo: str, dirs: list[str], token: str, write: bool) -> dict:
    """Write `token` into each directory's marker (the first host), or read it back (every other host)."""
    seen = {}
    for name in dirs:
        marker = Path(repo, name) / MARKER
        if write:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{token}\nwritten by `python -m pipeline doctor` to check for a shared file system\n")
            seen[name] = True
        else:
            seen[name] = marker.is_file() and marker.read_text().split("\n", 1)[0] == token
    return seen


def probe(request: dict) -> dict:
    """Facts about the host this runs on. `request`: repo, output_dir, port (0: not checked), and
    dirs/token/write for the shared file-system marker."""
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
        "free_gb": shutil.disk_usage(out).free / 1e9,
        "port_free": port_free,
        "shared": shared,
    }


if __name__ == "__main__":  # run over ssh by `doctor.remote_probe`
    print(json.dumps(probe(json.loads(sys.argv[1]))))
