"""`python -m pipeline doctor --hostfile H`: check every host of a launch before any rank starts.

Each host gets one non-interactive ssh (BatchMode: a password or host-key prompt is a failure, as it
would be for pdsh or mpirun) that runs this file's `probe` with this machine's Python path, from
stdin, so nothing has to be installed there first. Its answer is compared with this machine's:
Python, torch, deepspeed and transformers versions, the project importable at the same path,
accelerators versus slots, free disk for the output directory and, on the first host (where rank 0
opens the rendezvous store), the master port. One row per host; every problem is named.

This file runs stand-alone on the remote hosts: the code above `check` uses the standard library only.
"""
from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PACKAGES = ("torch", "deepspeed", "transformers")
LOCAL_HOSTS = ("localhost", "127.0.0.1")


def probe(repo: str, output_dir: str, port: int) -> dict:
    """Facts about the host this runs on; `port` 0 skips the port check."""
    import importlib.metadata
    import importlib.util

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    sys.path.insert(0, repo)
    spec = importlib.util.find_spec("pipeline")
    out = Path(repo, output_dir)
    while not out.exists():  # the output directory may not exist yet: its disk is the nearest parent's
        out = out.parent
    gpus = 0
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        gpus = sum(line.startswith("GPU ") for line in listing.splitlines())
    port_free = None
    if port:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous store binds
            try:
                s.bind(("", port))
                port_free = True
            except OSError:
                port_free = False
    return {"hostname": socket.gethostname(), "python": sys.version.split()[0], **versions,
            "project": spec.origin if spec else None, "gpus": gpus, "free_gb": shutil.disk_usage(out).free / 1e9,
            "port_free": port_free}


def remote_probe(host: str, args: list[str], timeout: float) -> dict:
    """`probe` on `host` over ssh; {"error": ...} when it cannot be run."""
    command = shlex.join([sys.executable, "-", *args])
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(timeout))}", host, command]
    try:
        result = subprocess.run(ssh, input=Path(__file__).read_bytes(), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {timeout:g} s (host down, or a firewall dropping ssh?)"}
    stderr = result.stderr.decode(errors="replace").strip().splitlines()
    last = stderr[-1] if stderr else ""
    if result.returncode == 255:
        return {"error": f"ssh failed non-interactively: {last} (set up key login: see README 'Multi-node')"}
    if result.returncode == 127:
        return {"error": f"{sys.executable} not found there (every host needs the same Python at the same path)"}
    if result.returncode != 0:
        return {"error": f"probe failed with exit code {result.returncode}: {last}"}
    return json.loads(result.stdout.decode().strip().splitlines()[-1])  # shell start-up files may print first


def problems(facts: dict, here: dict, slots: int, cpu_ranks: bool, min_free_gb: float, port: int) -> list[str]:
    if "error" in facts:
        return [facts["error"]]
    found = [f"{key} {facts[key] or 'not installed'} (here {here[key]})" for key in ("python", *PACKAGES) if facts[key] != here[key]]
    if facts["project"] != here["project"]:
        found.append(f"the project is not importable at {Path(here['project']).parent.parent} (found: {facts['project']})")
    if not cpu_ranks and facts["gpus"] < slots:
        found.append(f"slots={slots} but {facts['gpus']} GPUs (fix the hostfile, or DS_ACCELERATOR=cpu in the env file)")
    if facts["free_gb"] < min_free_gb:
        found.append(f"{facts['free_gb']:.1f} GB free for the output directory, less than {min_free_gb:g} GB")
    if facts["port_free"] is False:
        found.append(f"master port {port} is in use (another job? choose --master-port)")
    return found


def check(hosts: dict[str, int], output_dir: str, master_port: int, accelerator: str | None,
          timeout: float = 10.0, min_free_gb: float = 1.0) -> bool:
    """Probe every host at once, print one row per host and each problem; True when there are none."""
    repo = str(Path(__file__).resolve().parent.parent)
    first = next(iter(hosts))
    here = probe(repo, output_dir, master_port if first in LOCAL_HOSTS else 0)
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        futures = {host: pool.submit(remote_probe, host, [repo, output_dir, str(master_port if host == first else 0)], timeout)
                   for host in hosts if host not in LOCAL_HOSTS}
        facts = {host: futures[host].result() if host in futures else here for host in hosts}
    cpu_ranks = accelerator == "cpu" or here["gpus"] == 0

    rows = [("host", "slots", "hostname", "python", *PACKAGES, "GPUs", "free GB", "status")]
    found = {}
    for host, slots in hosts.items():
        f = facts[host]
        found[host] = problems(f, here, slots, cpu_ranks, min_free_gb, master_port)
        gpus = "-" if "error" in f else ("cpu" if cpu_ranks else str(f["gpus"]))
        cells = ("-",) * 5 if "error" in f else (f["hostname"], f["python"], *(str(f[p]) for p in PACKAGES))
        free = "-" if "error" in f else f"{f['free_gb']:.1f}"
        rows.append((host, str(slots), *cells, gpus, free, "FAILED" if found[host] else "ok"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    failed = [host for host in hosts if found[host]]
    for host in failed:
        for problem in found[host]:
            print(f"doctor: {host}: {problem}", file=sys.stderr)
    if failed:
        print(f"doctor: {len(failed)} of {len(hosts)} hosts failed: {', '.join(failed)}", file=sys.stderr)
    return not failed


def add_arguments(p) -> None:
    p.add_argument("--hostfile", default="hostfiles/localhost", help="lines 'HOST slots=N' (default: %(default)s)")
    p.add_argument("--include", default="", help="deepspeed's host/slot filter")
    p.add_argument("--exclude", default="", help="deepspeed's host/slot filter")
    p.add_argument("--master-port", type=int, default=29500, help="checked free on the first host (default: %(default)s)")
    p.add_argument("--output-dir", default="runs", help="checked for free disk, relative to the project (default: %(default)s)")
    p.add_argument("--min-free-gb", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per host (default: %(default)s)")


def main(args) -> int:
    import os

    from .launcher import active_hosts

    hosts = active_hosts(args.hostfile, args.include, args.exclude)
    ok = check(hosts, args.output_dir, args.master_port, os.environ.get("DS_ACCELERATOR"), args.timeout, args.min_free_gb)
    return 0 if ok else 1


if __name__ == "__main__":  # run over ssh by `remote_probe`
    print(json.dumps(probe(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
