"""`./launch.sh` (`python -m pipeline launch`): check a launch here, then hand it to the `deepspeed` runner.

DeepSpeed's runner discovers many mistakes late, on a remote node, or never: a missing hostfile
only warns and falls back to the local GPUs, a `.deepspeed_env` line without `=` crashes it, the
OpenMPI runner rejects `--include/--exclude`, a host that ssh cannot reach shows up as a hang or a
pdsh error. Everything checkable from this machine is checked first, with the file and line
named, then `pipeline doctor` checks every host, and only then does the runner start.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .check import HOSTNAME, world_from_hostfile
from .config import ConfigError
from .doctor import LOCAL_HOSTS

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The pdsh runner writes `export KEY="VALUE";` for a shell on every node, where these characters
# would expand or end the quoting; local ranks would get them verbatim.
SHELL_ACTIVE = re.compile(r'["$`\\]')
# DeepSpeed's runner wraps any value with other characters in double quotes, which mpirun -x
# passes on literally (`-x FOO="a b"` gives remote ranks "a b" with the quotes).
RUNNER_PLAIN = re.compile(r"[\w@%+=:,./-]*")
# The runner reads these two files, then ours replaces them (DS_ENV_FILE): they are merged in.
USER_ENV_FILES = (Path("~/.deepspeed_env").expanduser(), Path(".deepspeed_env"))


def env_value(path: Path, number: int, key: str, value: str, launcher: str) -> str:
    """The value every rank sees, local or remote: one layer of matching quotes removed, and
    refused where the runner would change it on the way to remote ranks."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    if value != value.strip():
        raise ConfigError(f"{path}, line {number}: {key}'s quoted value starts or ends with a space, which DeepSpeed's "
                          "runner strips for remote ranks; remove it")
    bad = SHELL_ACTIVE.search(value)
    if bad:
        raise ConfigError(f"{path}, line {number}: {key}'s value contains {bad[0]!r}, which the pdsh runner's shell would "
                          "interpret on remote nodes but local ranks would not; env-file values may not contain "
                          "double quotes, $, backticks or backslashes (one layer of surrounding quotes is removed)")
    if launcher == "openmpi" and not RUNNER_PLAIN.fullmatch(value):
        raise ConfigError(f"{path}, line {number}: {key}={value!r}: with --launcher openmpi, DeepSpeed passes a value with "
                          "characters other than letters, digits and @%+=:,./-_ to remote ranks in literal double quotes")
    return value


def read_env_file(path: Path, launcher: str = "pdsh") -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments are allowed here (the runner crashes on them)."""
    env = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        if not eq or not ENV_NAME.fullmatch(key.strip()):
            raise ConfigError(f"{path}, line {number}: expected KEY=VALUE with a variable name as KEY, got {line!r}")
        env[key.strip()] = env_value(path, number, key.strip(), value.strip(), launcher)
    return env


def active_hosts(hostfile: str, include: str, exclude: str) -> dict[str, int]:
    """{host: slots} that the deepspeed runner would start, hostfile and filters checked (pipeline.check)."""
    return {host: len(slots) for host, slots in world_from_hostfile(hostfile, include, exclude).items()}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="./launch.sh", allow_abbrev=False,  # no abbreviations: unknown options are training options
        description="Check hosts (pipeline doctor), then run `python -m pipeline train` on every slot of a hostfile "
                    "through the deepspeed runner. Options not listed here are training options "
                    "(python -m pipeline train --help).")
    p.add_argument("--hostfile", default="hostfiles/localhost", help="lines 'HOST slots=N' (default: %(default)s)")
    p.add_argument("--ds-config", default="ds_configs/small_zero2.json", help="DeepSpeed JSON (default: %(default)s)")
    p.add_argument("--launcher", choices=("pdsh", "openmpi"), default="pdsh", help="multi-node backend (default: %(default)s)")
    p.add_argument("--include", default="", help="deepspeed's host/slot filter, e.g. 'node1@node2:0,1' (pdsh only)")
    p.add_argument("--exclude", default="", help="deepspeed's host/slot filter (pdsh only)")
    p.add_argument("--master-addr", default="", help="rendezvous address (default: the first host; 127.0.0.1 for a local hostfile)")
    p.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)), help="rendezvous port (default: $MASTER_PORT or 29500)")
    p.add_argument("--env-file", default="", help="KEY=VALUE lines for every remote rank (default: HOSTFILE.env if it exists)")
    p.add_argument("--launcher-args", default="", help="extra arguments for pdsh or mpirun, as one string")
    p.add_argument("--rank-logs", default="", help="directory for one log file per rank")
    p.add_argument("--no-doctor", action="store_true", help="skip the host checks of `python -m pipeline doctor`")
    p.add_argument("--doctor-timeout", type=float, default=10.0, help="seconds per host for the doctor's checks (default: %(default)s)")
    return p.parse_known_args(argv)


def rank_env(args: argparse.Namespace, hostfile: Path) -> dict[str, str]:
    """What every rank needs in its environment: the accelerator choice, then the user's env files."""
    import torch

    env = {}
    if torch.cuda.is_available():
        print("launch: GPUs found; ranks use CUDA (NCCL)")
    else:
        # One thread per rank: several ranks share a machine's cores.
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        print("launch: no GPU found; ranks run on DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, gloo backend)")
    if args.launcher == "openmpi":
        # DeepSpeed's OpenMPI runner passes neither; pipeline.dist keeps them over MPI discovery's guesses.
        env.update(MASTER_ADDR=args.master_addr, MASTER_PORT=str(args.master_port))
    env_file = Path(args.env_file) if args.env_file else hostfile.with_name(hostfile.name + ".env")
    if args.env_file and not env_file.is_file():
        raise ConfigError(f"env file {env_file} not found")
    for path in (*USER_ENV_FILES, env_file):
        if path.is_file():
            env.update(read_env_file(path, args.launcher))
    return env


def check_launcher(args: argparse.Namespace, hosts: dict[str, int]) -> None:
    """Report what the chosen launcher would reject or ignore, before anything starts."""
    if args.launcher == "openmpi" and (args.include or args.exclude):
        raise ConfigError("--launcher openmpi does not support --include/--exclude (DeepSpeed's OpenMPI runner "
                          "rejects them): write a hostfile with just the hosts and slots to use")
    if len(hosts) == 1:
        if args.launcher != "pdsh" or args.launcher_args:
            print(f"launch: note: one host ({next(iter(hosts))}): deepspeed starts its ranks locally, "
                  f"so --launcher {args.launcher} and --launcher-args are not used")
        return
    backend = {"pdsh": "pdsh", "openmpi": "mpirun"}[args.launcher]
    if not shutil.which(backend):
        raise ConfigError(f"--launcher {args.launcher} needs `{backend}` on this machine (apt-get install "
                          f"{'pdsh' if backend == 'pdsh' else 'openmpi-bin libopenmpi-dev'})")
    if args.launcher == "openmpi":
        import importlib.util

        if importlib.util.find_spec("mpi4py") is None:
            raise ConfigError("--launcher openmpi needs mpi4py (DeepSpeed finds each rank with it): pip install mpi4py")
        if os.geteuid() == 0 and "--allow-run-as-root" not in args.launcher_args:
            raise ConfigError("running as root: mpirun refuses to start without --launcher-args '--allow-run-as-root'")


def deepspeed_command(args: argparse.Namespace, hosts: dict[str, int], train_args: list[str], ssh_checked: bool) -> list[str]:
    cmd = ["deepspeed", "--hostfile", args.hostfile, "--master_addr", args.master_addr, "--master_port", str(args.master_port)]
    if ssh_checked:
        cmd.append("--no_ssh_check")  # the doctor reached every host, the runner would only try the first
    if args.include or args.exclude:
        cmd += ["--include", args.include] if args.include else ["--exclude", args.exclude]
    launcher_args = args.launcher_args
    if len(hosts) > 1 and args.launcher == "openmpi":
        cmd += ["--launcher", "openmpi"]
        if args.rank_logs:  # the deepspeed runner's per-rank log option applies to pdsh only
            launcher_args = f"{launcher_args} --output-filename {args.rank_logs}".strip()
    elif args.rank_logs:
        cmd += ["--enable_each_rank_log", args.rank_logs]
    if launcher_args:
        cmd += ["--launcher_args", launcher_args]
    return cmd + ["--module", "pipeline", "train", "--ds-config", args.ds_config, *train_args]


def output_dir(train_args: list[str]) -> str:
    for i, arg in enumerate(train_args):
        if arg.startswith("--output-dir="):
            return arg.split("=", 1)[1]
        if arg == "--output-dir" and i + 1 < len(train_args):
            return train_args[i + 1]
    return "runs"


def run(argv: list[str]) -> int:
    args, train_args = parse_args(argv)
    hostfile = Path(args.hostfile)
    hosts = active_hosts(args.hostfile, args.include, args.exclude)
    if not Path(args.ds_config).is_file():
        raise ConfigError(f"DeepSpeed config {args.ds_config} not found")
    check_launcher(args, hosts)
    local = all(host in LOCAL_HOSTS for host in hosts)
    args.master_addr = args.master_addr or ("127.0.0.1" if local else next(iter(hosts)))
    if not HOSTNAME.fullmatch(args.master_addr):  # it goes into the command line pdsh runs on every node
        raise ConfigError(f"--master-addr {args.master_addr!r} is not a host name or IPv4 address")
    env = rank_env(args, hostfile)

    if not args.no_doctor:
        from . import doctor

        if not doctor.check(hosts, output_dir(train_args), args.master_port, env.get("DS_ACCELERATOR"), args.doctor_timeout):
            return 1

    with tempfile.NamedTemporaryFile("w", prefix="deepspeed_env-", suffix=".txt", delete=False) as f:
        f.write("".join(f"{key}={value}\n" for key, value in env.items()))
    try:
        # An absolute DS_ENV_FILE replaces the runner's ~/.deepspeed_env and ./.deepspeed_env (merged
        # above), so the user's files are never written. Local ranks inherit the same values directly.
        runner_env = {**os.environ, **env, "DS_ENV_FILE": f.name}
        cmd = deepspeed_command(args, hosts, train_args, ssh_checked=local or not args.no_doctor)
        proc = subprocess.Popen(cmd, env=runner_env)
        # Ctrl-C reaches the runner directly (same process group): wait for its cleanup. A SIGTERM
        # sent to this process alone is passed on.
        signal.signal(signal.SIGINT, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        code = proc.wait()
    finally:
        os.unlink(f.name)
    return code if code >= 0 else 128 - code


def main(argv: list[str]) -> int:
    try:
        return run(argv)
    except ConfigError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
