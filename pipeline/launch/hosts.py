"""Which hosts and slots a launch uses: a hostfile, read as DeepSpeed's runner reads it but strictly,
or a SLURM allocation. Used by the launcher, the doctor and check-config, so all count the same world.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections import OrderedDict
from pathlib import Path

from ..core.base import ConfigError, read_utf8

# DeepSpeed's runner matches `^(\S+)\s+slots=(\d+)` and ignores the rest of the line, so
# "gpu1 slots=4x" counts 4 and "slots=0" a host with no ranks; this pattern is strict.
HOSTFILE_LINE = re.compile(r"(\S+)\s+slots=(\d+)\s*(#.*)?")
# Host names reach pdsh, ssh and mpirun's command lines (and a shell on the far side): a name
# such as "-oProxyCommand=..." would be read as an option, "node1;id" would run a command.
HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def _line_of(lines: list[str], predicate) -> int:
    return next((n for n, line in enumerate(lines, 1) if predicate(line.strip())), 0)


def read_hostfile(path: str) -> OrderedDict[str, int]:
    """host -> slots, parsed by DeepSpeed's runner; its errors and the lines it accepts but should
    not (zero slots, text after the count) become ConfigErrors naming the file and line."""
    from deepspeed.launcher.runner import fetch_hostfile

    if not Path(path).is_file():
        raise ConfigError(f"{path}: hostfile not found (the deepspeed runner would silently use this machine's GPUs)")
    lines = read_utf8(path).splitlines()
    try:
        pool = fetch_hostfile(path)
    except ValueError as e:
        duplicate = re.search(r"multiple entries for (\S+),", str(e))
        if duplicate:
            host = duplicate[1]
            n = [i for i, line in enumerate(lines, 1) if line.split()[:1] == [host]][1]
            raise ConfigError(f"{path}, line {n}: host {host} is listed twice; give each host one line") from None
        bad = re.search(r"bad entry: (.*), unable", str(e))
        if bad:
            n = _line_of(lines, lambda text: text == bad[1])
            raise ConfigError(f"{path}, line {n}: {bad[1]!r} is not 'HOSTNAME slots=N'") from None
        raise ConfigError(f"{path}: no 'HOSTNAME slots=N' lines") from None
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        match = HOSTFILE_LINE.fullmatch(text)
        if not match:
            raise ConfigError(f"{path}, line {n}: {text!r} is not 'HOSTNAME slots=N' (text after the slot count)")
        if ":" in match[1]:
            raise ConfigError(
                f"{path}, line {n}: {match[1]!r} is an IPv6 address; give the host's name (from DNS or /etc/hosts) "
                "or its IPv4 address: pdsh reads what precedes a single ':' as its remote-command type, and the "
                "deepspeed runner's --include/--exclude split a host from its slots at ':'"
            )
        if not HOSTNAME.fullmatch(match[1]):
            raise ConfigError(
                f"{path}, line {n}: {match[1]!r} is not a host name (letters, digits, '.', '-' and '_', "
                "not starting with '-'); pdsh and ssh would take it as an option or a shell command"
            )
        if int(match[2]) == 0:
            raise ConfigError(f"{path}, line {n}: host {match[1]} has slots=0; give its number of GPUs or remove the line")
    return pool


def world_from_hostfile(
    path: str, include: str = "", exclude: str = "", num_nodes: int = -1, num_gpus: int = -1
) -> OrderedDict[str, list[int]]:
    """host -> the slots (local ranks) the `deepspeed` runner would start with these options."""
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, parse_inclusion_exclusion

    pool = read_hostfile(path)
    if (num_nodes > 0 or num_gpus > 0) and (include or exclude):
        raise ConfigError("--num_nodes/--num_gpus cannot be combined with --include/--exclude (the deepspeed runner refuses)")
    try:
        active = parse_inclusion_exclusion(pool, include, exclude)
    except (ValueError, KeyError) as e:
        flag = "--include" if include else "--exclude"
        raise ConfigError(f"{path}: {flag} {include or exclude}: {e}; hosts in the file: {', '.join(pool)}") from None
    if num_nodes > len(pool):
        raise ConfigError(f"{path}: --num_nodes {num_nodes} but the hostfile has {len(pool)} hosts")
    if num_gpus > min(pool.values()):
        raise ConfigError(f"{path}: --num_gpus {num_gpus} but a host has only {min(pool.values())} slots")
    active = apply_num_nodes_and_gpus(active, num_nodes, num_gpus)
    if not active:
        raise ConfigError(f"{path}: no ranks left after --include/--exclude")
    return active


def active_hosts(path: str, include: str = "", exclude: str = "") -> dict[str, int]:
    """{host: slots} that the deepspeed runner would start, hostfile and filters checked."""
    return {host: len(slots) for host, slots in world_from_hostfile(path, include, exclude).items()}


def is_local(host: str) -> bool:
    """A hostfile name for this machine: DeepSpeed would start its ranks here without ssh.

    Names only, not addresses: another loopback address (the test cluster's 127.0.1.x) or an
    alias is treated as a remote host and reached over ssh, which works either way. No IPv6
    address: a hostfile may not name one (read_hostfile)."""
    return host in ("localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn())


def slurm_allocation() -> dict[str, int]:
    """{node: tasks} of the SLURM allocation this runs in (an sbatch script's, or salloc's)."""
    if "SLURM_JOB_ID" not in os.environ:
        raise ConfigError(
            "--launcher slurm outside a SLURM allocation (no SLURM_JOB_ID): submit an sbatch script "
            "that runs ./launch.sh --launcher slurm (hostfiles/slurm-v100x8.sbatch), or run it inside salloc"
        )
    listing = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True, text=True)
    if listing.returncode != 0:
        raise ConfigError(f"scontrol show hostnames {os.environ['SLURM_JOB_NODELIST']}: {listing.stderr.strip()}")
    tasks = []
    for part in os.environ["SLURM_TASKS_PER_NODE"].split(","):  # e.g. "8(x2),4"
        count, _, repeat = part.partition("(x")
        tasks += [int(count)] * int(repeat.rstrip(")") or 1)
    return dict(zip(listing.stdout.split(), tasks))


def node_address(node: str) -> str:
    """The address slurm.conf gives `node` (NodeAddr; the name itself where none is set)."""
    shown = subprocess.run(["scontrol", "show", "node", "--oneliner", node], capture_output=True, text=True)
    if shown.returncode != 0:
        raise ConfigError(f"scontrol show node {node}: {shown.stderr.strip()}")
    return parse_node_address(shown.stdout, node)


def parse_node_address(shown: str, node: str) -> str:
    """NodeAddr from `scontrol show node` output."""
    match = re.search(r"\bNodeAddr=(\S+)", shown)
    return match[1] if match else node
