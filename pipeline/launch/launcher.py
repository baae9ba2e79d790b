"""`zero-pipeline launch` (`./launch.sh`): check a launch here, then hand it to the `deepspeed` runner.

    zero-pipeline launch                              # the default run: every local GPU, or 2 CPU ranks
    zero-pipeline launch run.yaml --learning-rate 2e-5    # a run file, flags override it
    zero-pipeline launch --hostfile hosts --ds-config ds.json --train-file a.csv --val-size 0.1

Every path is the caller's: relative paths are looked up in the working directory it is run from.

DeepSpeed's runner discovers many mistakes late, on a remote node, or never: a missing hostfile
only warns and falls back to the local GPUs, a `.deepspeed_env` line without `=` crashes it, the
OpenMPI runner rejects `--include/--exclude`, a host that ssh cannot reach shows up as a hang or a
pdsh error. Everything checkable from this machine is checked first, with the file and line
named, then `pipeline doctor` checks every host, and only then does the runner start.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import tasks
from ..core.base import ConfigError, close_new_files, free_port, load_json, read_utf8, unique_suffix, unknown_key_message
from ..core.dist import import_deepspeed
from ..core.ds_config import Hardware, ops_to_build, resolve_ds_config
from ..core.launch_file import SHELL_PLAIN, write_launch_file
from ..core.options import (
    DEFAULT_DS_CONFIG,
    HF_ALIASES,
    TrainConfig,
    add_train_options,
    command_settings,
    read_run_file,
    spellings,
    unknown_options_message,
)
from ..core.stop import STOP_FILE
from ..data.tokenizer import check_model_tokenizer
from .doctor import ACCELERATORS, SOCKET_IFNAMES, counted
from .hosts import HOSTNAME, active_hosts, is_local, node_address, slurm_allocation
from .inputs import check_inputs, check_trackers
from .probe import gpu_facts

CPU_RANKS = 2  # ranks on a machine without GPUs and without a hostfile
RUN_FILE_SUFFIXES = (".yaml", ".yml", ".json")

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What a rank's process needs when it starts, before it reads the launch file: these alone go on the
# runner's command line (DS_ENV_FILE, and the PYTHON* variables DeepSpeed exports from this
# environment). Every other value travels in the launch file, secrets among them.
STARTUP = re.compile(r"DS_ACCELERATOR|OMP_NUM_THREADS|PATH|LD_\w+|PYTHON\w*")
# Variables DeepSpeed's runner copies from its own environment onto the remote command line
# (runner.py EXPORT_ENVS, and the CUDA accelerator's NCCL): moved into the launch file instead.
RUNNER_EXPORTS = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")
# The pdsh runner writes `export KEY="VALUE";` for a shell on every node, where these characters
# would expand or end the quoting; local ranks would get them verbatim.
SHELL_ACTIVE = re.compile(r'["$`\\]')
DEFAULT_PORT = 29500  # DeepSpeed's, for a rendezvous on another host (its port cannot be chosen free from here)
# The runner reads these two files, then ours replaces them (DS_ENV_FILE): they are merged in.
USER_ENV_FILES = (Path("~/.deepspeed_env").expanduser(), Path(".deepspeed_env"))


def env_value(path: Path, number: int, key: str, value: str, launcher: str) -> str:
    """The value every rank sees, local or remote: one layer of matching quotes removed. A start-up
    variable (STARTUP) goes on the runner's command line: refused where the runner would change it
    on the way to remote ranks. Others travel in the launch file as they are."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    if not STARTUP.fullmatch(key):
        return value
    if value != value.strip():
        raise ConfigError(
            f"{path}, line {number}: {key}'s quoted value starts or ends with a space, which DeepSpeed's "
            "runner strips for remote ranks; remove it"
        )
    bad = SHELL_ACTIVE.search(value)
    if bad:
        raise ConfigError(
            f"{path}, line {number}: {key}'s value contains {bad[0]!r}, which the pdsh runner's shell would "
            "interpret on remote nodes but local ranks would not; the values of DS_ACCELERATOR, OMP_NUM_THREADS, "
            "PATH, LD_* and PYTHON*, which every rank needs as it starts and so go on the runner's command line, "
            "may not contain double quotes, $, backticks or backslashes (one layer of surrounding quotes is removed)"
        )
    if launcher == "openmpi" and not SHELL_PLAIN.fullmatch(value):
        raise ConfigError(
            f"{path}, line {number}: {key}={value!r}: with --launcher openmpi, DeepSpeed passes a value with "
            "characters other than letters, digits and @%+=:,./-_ to remote ranks in literal double quotes"
        )
    return value


def read_env_file(path: Path, launcher: str = "pdsh") -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments are allowed here (the runner crashes on them)."""
    env = {}
    for number, line in enumerate(read_utf8(path).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        if not eq or not ENV_NAME.fullmatch(key.strip()):
            raise ConfigError(f"{path}, line {number}: expected KEY=VALUE with a variable name as KEY, got {line!r}")
        env[key.strip()] = env_value(path, number, key.strip(), value.strip(), launcher)
    return env


@dataclass(frozen=True)
class Backend:
    """How DeepSpeed's runner reaches remote hosts with one `--launcher`, and what that needs here."""

    program: str  # on this machine
    install: str
    filters: bool  # takes --include/--exclude
    rank_logs: str  # launcher arguments for per-rank logs in DIR; "" for the runner's own --enable_each_rank_log
    modules: tuple[str, ...] = ()  # Python modules every rank needs
    as_root: str = ""  # launcher argument without which it refuses to run as root


BACKENDS = {
    "pdsh": Backend("pdsh", "apt-get install pdsh", filters=True, rank_logs=""),
    "openmpi": Backend(
        "mpirun",
        "apt-get install openmpi-bin libopenmpi-dev",
        filters=False,
        rank_logs="--output-filename {dir}",
        modules=("mpi4py",),
        as_root="--allow-run-as-root",
    ),
    # One srun task per rank (per GPU), not one DeepSpeed launcher per node: SLURM then tracks,
    # signals (preemption, --signal) and accounts every rank itself, and no ssh is needed.
    "slurm": Backend(
        "srun", "SLURM's client tools (apt-get install slurm-client)", filters=False, rank_logs="--output={dir}/rank-%t.log"
    ),
}


def launch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zero-pipeline launch",
        allow_abbrev=False,  # no abbreviations: unknown options are training options
        usage="zero-pipeline launch [RUN_FILE] [launch options] [training options]",
        description="Check the inputs and hosts, then run `zero-pipeline train` on every slot of a hostfile "
        "(default: every GPU of this machine) through the deepspeed runner. RUN_FILE (.yaml or .json) holds "
        "options by name; the command line overrides it. Options not listed here are training options "
        "(zero-pipeline train --help). Every option also takes its underscore spelling.",
    )
    p.add_argument(
        *spellings("hostfile"),
        default="",
        help="lines 'HOST slots=N' (default: this machine, every GPU, or 2 CPU ranks without GPUs; not with --launcher slurm)",
    )
    p.add_argument(
        *spellings("num-gpus"),
        dest="num_gpus",
        type=int,
        default=0,
        help="ranks on this machine when there is no --hostfile (default: every GPU it has, as deepspeed does; 2 CPU ranks without GPUs)",
    )
    p.add_argument(
        *spellings("ds-config"),
        *HF_ALIASES["ds_config"],
        dest="ds_config",
        default=str(DEFAULT_DS_CONFIG),
        help="DeepSpeed JSON (default: the bundled small_zero2.json)",
    )
    p.add_argument(
        *spellings("launcher"),
        choices=tuple(BACKENDS),
        default="pdsh",
        help="pdsh or openmpi (DeepSpeed's runner over ssh), or slurm (srun inside an allocation) (default: %(default)s)",
    )
    p.add_argument(
        *spellings("accelerator"),
        choices=ACCELERATORS,
        default="auto",
        help="cuda, cpu, or auto: decided per host by the doctor, CUDA where every host has GPUs, "
        "DeepSpeed's CPU accelerator where none has (default: %(default)s)",
    )
    p.add_argument(*spellings("include"), default="", help="deepspeed's host/slot filter, e.g. 'node1@node2:0,1' (pdsh only)")
    p.add_argument(*spellings("exclude"), default="", help="deepspeed's host/slot filter (pdsh only)")
    p.add_argument(
        *spellings("master-addr"),
        dest="master_addr",
        default="",
        help="rendezvous address (default: the first host; 127.0.0.1 for a local hostfile)",
    )
    p.add_argument(
        *spellings("master-port"),
        dest="master_port",
        type=int,
        default=int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else None,
        help="rendezvous port (default: $MASTER_PORT; else, as torchrun --standalone, a free port when the "
        f"rendezvous is on this machine, {DEFAULT_PORT} when it is on another host)",
    )
    p.add_argument(
        *spellings("env-file"),
        dest="env_file",
        default="",
        help="KEY=VALUE lines for every remote rank (default: HOSTFILE.env if it exists)",
    )
    p.add_argument(
        *spellings("launcher-args"), dest="launcher_args", default="", help="extra arguments for pdsh or mpirun, as one string"
    )
    p.add_argument(*spellings("rank-logs"), dest="rank_logs", default="", help="directory for one log file per rank")
    p.add_argument(
        *spellings("no-doctor"), dest="no_doctor", action="store_true", help="skip the host checks of `python -m pipeline doctor`"
    )
    p.add_argument(
        *spellings("doctor-timeout"),
        dest="doctor_timeout",
        type=float,
        default=60.0,
        help="seconds per host for the doctor's checks, a cold torch import included (default: %(default)s)",
    )
    return p


def run_file_args(path: str, values: dict, launch: argparse.ArgumentParser, train: argparse.ArgumentParser) -> list[str]:
    """A run file's options as command-line arguments (they come first, so the command line overrides
    them); a key that is no option is refused naming the file."""
    known = {action.dest for parser in (launch, train) for action in parser._actions} - {"help"}
    args = []
    for key, value in values.items():
        if key not in known:
            raise ConfigError(unknown_key_message(path, key, known))
        if value is True:
            args.append(f"--{key}")
        elif value is not None and value is not False:
            args += [f"--{key}", str(value)]
    return args


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Launch options here; the rest must be training options (args.train, checked now, not on every
    rank later). A leading word `pretrain` makes the ranks run `pipeline pretrain` (args.command)."""
    command = "pretrain" if argv[:1] == ["pretrain"] else "train"
    argv = argv[1:] if command == "pretrain" else argv
    p = launch_parser()
    train = argparse.ArgumentParser(prog="zero-pipeline launch (training options)", allow_abbrev=False, add_help=False)
    add_train_options(train, {"task": tasks.names()})
    if argv and not argv[0].startswith("-"):
        if not argv[0].endswith(RUN_FILE_SUFFIXES):
            p.error(f"{argv[0]}: expected a run file ({', '.join(RUN_FILE_SUFFIXES)}) or options")
        values = read_run_file(argv[0])
        if values.get("task") == "masked_lm":  # a pretraining run's run.yaml repeats a pretraining run
            command = "pretrain"
        argv = run_file_args(argv[0], values, p, train) + argv[1:]
    args, train_args = p.parse_known_args(argv)
    args.command = command
    # Unknown options would otherwise reach every rank and fail there, after the doctor and the runner.
    args.train, unknown = train.parse_known_args(train_args)
    if unknown:
        p.error(
            f"{unknown_options_message(unknown, train)} (launch options: zero-pipeline launch --help; "
            "training options: zero-pipeline train --help)"
        )
    return args


def user_env(args: argparse.Namespace, hostfile: Path | None) -> dict[str, str]:
    """The user's env files merged: ~/.deepspeed_env, ./.deepspeed_env, then the cluster's (HOSTFILE.env)."""
    env_file = Path(args.env_file) if args.env_file else hostfile.with_name(hostfile.name + ".env") if hostfile else None
    if args.env_file and not env_file.is_file():
        raise ConfigError(f"env file {env_file} not found")
    env = {}
    for path in (*USER_ENV_FILES, *([env_file] if env_file else [])):
        if path.is_file():
            env.update(read_env_file(path, args.launcher))
    return env


def requested_accelerator(args: argparse.Namespace, env: dict[str, str]) -> str:
    """--accelerator, or DS_ACCELERATOR from an env file (the older way to ask for CPU ranks)."""
    in_file = env.get("DS_ACCELERATOR")
    if in_file is None:
        return args.accelerator
    if in_file not in ("cuda", "cpu"):
        raise ConfigError(f"DS_ACCELERATOR={in_file} in an env file: this pipeline runs on cuda or cpu")
    if args.accelerator not in ("auto", in_file):
        raise ConfigError(f"--accelerator {args.accelerator} contradicts DS_ACCELERATOR={in_file} in an env file; keep one")
    return in_file


def rank_env(args: argparse.Namespace, env: dict[str, str], accelerator: str) -> dict[str, str]:
    """What every rank needs in its environment: the accelerator decided for all hosts, then the user's env files.

    DS_ACCELERATOR is always set, so no rank guesses from its own hardware."""
    ranks = {"DS_ACCELERATOR": accelerator}
    if accelerator == "cpu":  # one thread per rank: several ranks share a machine's cores
        ranks["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    if args.launcher in ("openmpi", "slurm"):
        # Neither DeepSpeed's OpenMPI runner nor srun passes them; pipeline.core.dist keeps them over MPI discovery's guesses.
        ranks.update(MASTER_ADDR=args.master_addr, MASTER_PORT=str(args.master_port))
    return {**ranks, **env, "DS_ACCELERATOR": accelerator}


def split_env(env: dict[str, str], environ: dict[str, str]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(the runner's environment, the start-up values for its command line, the launch file's values).

    The variables DeepSpeed's runner would copy from `environ` onto the command line (MLFLOW_TRACKING_PASSWORD
    among them) are taken out of its environment and carried in the launch file, with `env`'s others."""
    moved = {key: value for key, value in environ.items() if key.startswith(RUNNER_EXPORTS) and not STARTUP.fullmatch(key)}
    startup = {key: value for key, value in env.items() if STARTUP.fullmatch(key)}
    carried = {**moved, **{key: value for key, value in env.items() if not STARTUP.fullmatch(key)}}
    runner = {key: value for key, value in environ.items() if key not in moved}
    runner.update(startup)
    return {**runner, "PYTHONPATH": ranks_pythonpath(runner)}, startup, carried


def ranks_pythonpath(environ: dict[str, str]) -> str:
    """PYTHONPATH with this package's directory first: the ranks start in the output directory."""
    return os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), environ.get("PYTHONPATH")]))


def check_command_line(environ: dict[str, str], output_dir: str, rank_logs: str) -> None:
    """What a remote launch still puts on the runner's command line, for a shell on every node: the
    launch file's path (in the output directory), the per-rank log directory and the PYTHON*
    variables must be taken literally there."""
    if not SHELL_PLAIN.fullmatch(output_dir):
        raise ConfigError(
            f"output directory {output_dir}: the ranks on remote hosts are told the launch file in it on a "
            "command line that DeepSpeed's runner gives their shell unquoted; choose an --output-dir whose path "
            "has only letters, digits and @%+=:,./-_"
        )
    if rank_logs and not SHELL_PLAIN.fullmatch(rank_logs):
        raise ConfigError(
            f"--rank-logs {rank_logs}: DeepSpeed's runner passes it to remote shells unquoted; use a path of letters, digits and @%+=:,./-_"
        )
    for key, value in environ.items():
        bad = SHELL_ACTIVE.search(value) if key.startswith("PYTHON") else None
        if bad:
            raise ConfigError(
                f"{key} contains {bad[0]!r}: DeepSpeed's runner exports it to remote hosts on a shell command line, "
                "where it would be interpreted"
            )


def visible_devices_include(args: argparse.Namespace, hosts: dict[str, int], env: dict[str, str]) -> str:
    """--include for CUDA_VISIBLE_DEVICES, which DeepSpeed's launcher replaces with the hostfile's slots.

    Given a hostfile, `deepspeed.launcher.launch` sets CUDA_VISIBLE_DEVICES on every node to the
    slot ids it starts (0..slots-1 unless --include/--exclude): on a shared node the job would take
    GPUs someone else was given. For one local host the same GPUs become `--include HOST:IDS`;
    anything else that cannot be carried over is refused."""
    if "CUDA_VISIBLE_DEVICES" in env:
        raise ConfigError(
            "CUDA_VISIBLE_DEVICES in an env file is replaced on every host by DeepSpeed's launcher (it sets "
            "it from the hostfile's slots); choose GPUs with --include 'HOST:IDS@HOST:IDS' instead"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return args.include
    host, slots = next(iter(hosts.items()))
    if args.include or args.exclude:
        raise ConfigError(
            f"CUDA_VISIBLE_DEVICES={visible} and --include/--exclude both choose GPUs, and DeepSpeed's "
            "launcher would use only the latter; unset CUDA_VISIBLE_DEVICES or drop --include/--exclude"
        )
    if len(hosts) > 1 or not is_local(host):
        raise ConfigError(
            f"CUDA_VISIBLE_DEVICES={visible} is set on this machine, but DeepSpeed's launcher replaces it "
            "on every host with the hostfile's slots; unset it and choose GPUs per host with "
            "--include 'HOST:IDS@HOST:IDS'"
        )
    ids = [i.strip() for i in visible.split(",") if i.strip()]
    if not ids or not all(i.isdigit() for i in ids):
        raise ConfigError(
            f"CUDA_VISIBLE_DEVICES={visible!r}: only GPU indices can be carried over to DeepSpeed's launcher "
            f"(--include {host}:0,1,...); unset it and give --include with indices"
        )
    beyond = [i for i in ids if int(i) >= slots]
    if beyond:
        raise ConfigError(
            f"CUDA_VISIBLE_DEVICES={visible} names GPU {', '.join(beyond)} but the hostfile gives {host} "
            f"slots={slots} (GPUs 0-{slots - 1}); raise its slots to the node's GPU count"
        )
    print(
        f"launch: CUDA_VISIBLE_DEVICES={visible} -> --include {host}:{','.join(ids)} (DeepSpeed's launcher would "
        "otherwise replace it with the hostfile's slots)"
    )
    return f"{host}:{','.join(ids)}"


def run_config(args: argparse.Namespace) -> TrainConfig:
    """The training config every rank will build, with the task's own options checked."""
    overrides = {key: value for key, value in vars(args.train).items() if key != "config" and value is not None}
    cfg = TrainConfig.from_sources(args.train.config, command_settings(args.command, {**overrides, "ds_config": args.ds_config}))
    tasks.resolve(cfg)  # the task's own options, before any rank starts
    check_trackers(cfg)  # --report-to: installed, and an MLflow server that answers
    check_model_tokenizer(cfg.model)  # a model trained here comes with its own tokenizer
    return cfg


def check_run_config(cfg: TrainConfig, world: int, accelerator: str, capabilities: list[str]) -> None:
    """Resolve the DeepSpeed config for this launch's world size and accelerator, as every rank will,
    and print every value it resolved: batch sizes that do not fit the hosts or allocation, a flag
    that contradicts the JSON, or a precision the accelerator cannot run (fp16 on CPU ranks), stop
    the launch before any rank starts. Before the doctor has seen the hosts (accelerator "auto")
    everything but the precision is checked, and nothing printed."""
    if accelerator == "auto":
        resolve_ds_config(cfg.ds_config, load_json(cfg.ds_config), world, Hardware("cuda", fp16=True, bf16=True), cfg)
        return
    if accelerator == "cpu":
        hardware = Hardware.named("cpu")
    else:
        bf16 = bool(capabilities) and all(float(c) >= 8.0 for c in capabilities)  # unknown GPUs: no bf16
        hardware = Hardware(
            "cuda", fp16=True, bf16=bf16, name=f"GPUs of compute capability {', '.join(capabilities) or 'unknown'}"
        )
    resolved = resolve_ds_config(cfg.ds_config, load_json(cfg.ds_config), world, hardware, cfg)
    for line in resolved.notes + [f"warning: {w}" for w in resolved.warnings]:
        print(f"launch: {line}")


def local_world(args: argparse.Namespace) -> tuple[int, str]:
    """Ranks on this machine without a hostfile, as `deepspeed` counts them: every GPU (the doctor's
    probe: nvidia-smi, else torch), --num-gpus to choose; CPU_RANKS where there is none."""
    facts = gpu_facts() if args.accelerator != "cpu" else {"gpus": 0}
    gpus = facts["gpus"]
    if args.num_gpus:
        if gpus and args.num_gpus > gpus:
            raise ConfigError(f"--num-gpus {args.num_gpus}, but this machine has {counted(facts)}")
        return args.num_gpus, f"--num-gpus {args.num_gpus}"
    if gpus:
        return gpus, f"every GPU of this machine ({counted(facts)})"
    return CPU_RANKS, f"no GPU on this machine: {CPU_RANKS} CPU ranks (--num-gpus N for another number)"


def local_slots(ranks: int, environ: dict[str, str]) -> int:
    """This machine's hostfile slots: its ranks, and up to the highest GPU index CUDA_VISIBLE_DEVICES
    names, which `visible_devices_include` makes the --include (torch, counting the GPUs where there is
    no nvidia-smi, sees only those: CUDA_VISIBLE_DEVICES=2,3 is 2 ranks on slots 0-3)."""
    ids = [int(i) for i in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if i.strip().isdigit()]
    return max([ranks, *(i + 1 for i in ids)])


def warn_idle_gpus(args: argparse.Namespace, hosts: dict[str, int], facts: dict[str, dict]) -> None:
    """A hostfile with fewer slots than a host's GPUs leaves GPUs idle: said once, not refused (a
    shared node may be meant so; --include chooses GPUs without this note)."""
    if args.include or args.exclude:
        return
    for host, slots in hosts.items():
        gpus = facts.get(host, {}).get("gpus") or 0
        if gpus > slots:
            print(f"launch: warning: {host} has {gpus} GPUs but the hostfile gives it slots={slots}: {gpus - slots} stay idle")


def check_slurm_gpus(hosts: dict[str, int], facts: dict[str, dict], accelerator: str) -> None:
    """One task per GPU: an allocation whose GPUs per node differ from its tasks per node is refused."""
    if accelerator != "cuda":
        return
    for host, ranks in hosts.items():
        gpus = facts.get(host, {}).get("gpus")
        if gpus is not None and gpus != ranks:
            raise ConfigError(
                f"the allocation gives {host} {gpus} GPUs but {ranks} tasks: this pipeline runs one task per "
                f"GPU; ask for --ntasks-per-node equal to --gpus-per-node (here {gpus})"
            )


def check_launcher(args: argparse.Namespace, hosts: dict[str, int]) -> None:
    """Report what the chosen launcher would reject or ignore, before anything starts."""
    backend = BACKENDS[args.launcher]
    if not backend.filters and (args.include or args.exclude):
        raise ConfigError(
            f"--launcher {args.launcher} does not support --include/--exclude (DeepSpeed's runner "
            "rejects them): write a hostfile with just the hosts and slots to use"
        )
    if args.launcher != "slurm" and len(hosts) == 1 and is_local(next(iter(hosts))):
        if args.launcher != "pdsh" or args.launcher_args:
            print(
                f"launch: note: one host ({next(iter(hosts))}), this machine: deepspeed starts its ranks locally, "
                f"so --launcher {args.launcher} and --launcher-args are not used"
            )
        return
    if not shutil.which(backend.program):
        raise ConfigError(f"--launcher {args.launcher} needs `{backend.program}` on this machine ({backend.install})")
    for module in backend.modules:
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"--launcher {args.launcher} needs {module} (DeepSpeed finds each rank with it): pip install {module}"
            )
    if backend.as_root and os.geteuid() == 0 and backend.as_root not in args.launcher_args:
        raise ConfigError(f"running as root: {backend.program} refuses to start without --launcher-args '{backend.as_root}'")


def deepspeed_command(args: argparse.Namespace, hosts: dict[str, int], launch_file: Path, ssh_checked: bool) -> list[str]:
    cmd = ["deepspeed", "--hostfile", args.hostfile, "--master_addr", args.master_addr, "--master_port", str(args.master_port)]
    if ssh_checked:
        cmd.append("--no_ssh_check")  # the doctor reached every host, the runner would only try the first
    remote = len(hosts) > 1 or not is_local(next(iter(hosts)))
    if len(hosts) == 1 and remote:
        # The runner uses ssh only for more than one host; one remote host would get local ranks.
        cmd.append("--force_multi")
    if args.include or args.exclude:
        cmd += ["--include", args.include] if args.include else ["--exclude", args.exclude]
    backend, launcher_args = BACKENDS[args.launcher], args.launcher_args
    if remote and args.launcher != "pdsh":
        cmd += ["--launcher", args.launcher]
    if args.rank_logs and remote and backend.rank_logs:  # the runner's own per-rank logs apply to pdsh only
        launcher_args = f"{launcher_args} {backend.rank_logs.format(dir=args.rank_logs)}".strip()
    elif args.rank_logs:
        cmd += ["--enable_each_rank_log", args.rank_logs]
    if launcher_args:
        cmd += ["--launcher_args", launcher_args]
    return cmd + ["--module", "pipeline", args.command, "--launch-file", str(launch_file)]


def slurm_command(args: argparse.Namespace, launch_file: Path, environ: dict[str, str]) -> list[str]:
    """One srun task per rank over the whole allocation.

    --kill-on-bad-exit=0: after a stop every rank exits 75 having saved, and SLURM would kill the
    ranks still leaving as soon as the first one exits non-zero. A rank that dies still ends the
    others: their next collective fails as its connections close, or at the collective timeout.
    --cpus-per-task: since SLURM 22.05 srun no longer inherits the allocation's (`man srun`), and
    each rank would get one core for tokenizing and loading data."""
    cmd = ["srun", "--kill-on-bad-exit=0"]
    if "SLURM_CPUS_PER_TASK" in environ and "SRUN_CPUS_PER_TASK" not in environ:
        cmd.append(f"--cpus-per-task={environ['SLURM_CPUS_PER_TASK']}")
    if args.rank_logs:
        cmd.append(BACKENDS["slurm"].rank_logs.format(dir=args.rank_logs))
    cmd += args.launcher_args.split()
    return cmd + [sys.executable, "-u", "-m", "pipeline", args.command, "--launch-file", str(launch_file)]


def launch_hosts(args: argparse.Namespace, env: dict[str, str]) -> dict[str, int]:
    """{host: ranks} of this launch: the allocation's under SLURM, else the hostfile's after its filters."""
    if args.launcher == "slurm":
        if args.hostfile:
            raise ConfigError(
                "--hostfile with --launcher slurm: the allocation decides the nodes and tasks per node "
                "(SLURM_JOB_NODELIST, --ntasks-per-node); drop --hostfile"
            )
        return slurm_allocation()
    hosts = active_hosts(args.hostfile, args.include, args.exclude)
    args.include = visible_devices_include(args, hosts, env)
    return active_hosts(args.hostfile, args.include, args.exclude)


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    import_deepspeed()  # hostfiles are read with the runner's own functions: DeepSpeed without mlflow
    if args.num_gpus and (args.hostfile or args.launcher == "slurm"):
        raise ConfigError("--num-gpus counts this machine's ranks without a hostfile; with a hostfile its slots decide")
    if not Path(args.ds_config).is_file():
        raise ConfigError(f"DeepSpeed config {args.ds_config} not found")
    # Resolved once, here: the ranks may start in another directory, on another host.
    cfg = run_config(args).with_absolute_paths()
    close_new_files(cfg.file_access)  # the output and cache directories, the rank logs, the launch file
    args.ds_config = cfg.ds_config
    args.rank_logs = os.path.abspath(args.rank_logs) if args.rank_logs else ""
    # The runner starts in the launch file's directory, where a relative hostfile is not found (its
    # runner then only warns, and trains on this machine).
    args.hostfile = os.path.abspath(args.hostfile) if args.hostfile else args.hostfile
    for line in check_inputs(cfg):
        print(f"launch: {line}")
    with tempfile.TemporaryDirectory(prefix="zero-pipeline-launch-") as scratch:
        if not args.hostfile and args.launcher != "slurm":
            ranks, why = local_world(args)
            args.hostfile = str(Path(scratch) / "hostfile")
            Path(args.hostfile).write_text(f"localhost slots={local_slots(ranks, dict(os.environ))}\n")
            print(f"launch: no --hostfile: {ranks} ranks on this machine, {why}")
        return launch(args, cfg, Path(scratch))


def launch(args: argparse.Namespace, cfg: TrainConfig, scratch: Path) -> int:
    slurm = args.launcher == "slurm"
    env = user_env(args, Path(args.hostfile) if args.hostfile else None)
    hosts = launch_hosts(args, env)
    check_launcher(args, hosts)
    local = not slurm and all(is_local(host) for host in hosts)
    given_addr = args.master_addr
    if not args.master_addr:
        # Under SLURM the node's NodeAddr, not its name: a name may resolve to loopback on the node itself.
        args.master_addr = "127.0.0.1" if local else node_address(next(iter(hosts))) if slurm else next(iter(hosts))
    if not HOSTNAME.fullmatch(args.master_addr):  # it goes into the command line pdsh runs on every node
        raise ConfigError(f"--master-addr {args.master_addr!r} is not a host name or IPv4 address")
    if args.master_port is None:  # a port of its own, so no other job on the node joins this rendezvous
        here = local or (not given_addr and is_local(next(iter(hosts))))
        args.master_port = free_port() if here else DEFAULT_PORT
    if not local and not slurm:  # the runner gives remote ranks their command through a shell
        check_command_line({**os.environ, "PYTHONPATH": ranks_pythonpath(os.environ)}, cfg.output_dir, args.rank_logs)
    accelerator, capabilities = requested_accelerator(args, env), []
    check_run_config(cfg, sum(hosts.values()), accelerator, capabilities)  # before the doctor's minute
    if not args.no_doctor:
        from . import doctor

        ok, accelerator, facts = doctor.check(
            hosts,
            cfg.output_dir,
            cfg.cache_directory(),
            args.master_port,
            accelerator,
            args.doctor_timeout,
            transport="srun" if slurm else "ssh",
            ops=tuple(ops_to_build(load_json(args.ds_config))),
            ifnames={key: value for key, value in {**os.environ, **env}.items() if key in SOCKET_IFNAMES},
        )
        if not ok:
            return 1
        capabilities = sorted({c for f in facts.values() for c in f.get("capabilities", [])})
        if slurm:
            check_slurm_gpus(hosts, facts, accelerator)
        warn_idle_gpus(args, hosts, facts)
    elif accelerator == "auto":
        if not local:
            raise ConfigError(
                "--no-doctor with remote hosts or SLURM: this machine cannot tell what they have; "
                "give --accelerator cuda or --accelerator cpu"
            )
        import torch

        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    check_run_config(cfg, sum(hosts.values()), accelerator, capabilities)
    print(
        f"launch: ranks use {'CUDA (NCCL)' if accelerator == 'cuda' else 'DeepSpeed CPU accelerator (gloo)'} "
        f"on {len(hosts)} host(s): DS_ACCELERATOR={accelerator}"
    )
    stop_file = Path(cfg.output_dir) / f".stop-request-{unique_suffix()}"  # on the shared file system, seen by rank 0
    runner_env, startup, carried = split_env({**rank_env(args, env, accelerator), STOP_FILE: str(stop_file)}, dict(os.environ))
    launch_file = write_launch_file(Path(cfg.output_dir), args.command, cfg, carried)
    try:
        if args.rank_logs:  # neither srun nor mpirun creates a missing log directory
            Path(args.rank_logs).mkdir(parents=True, exist_ok=True)
        if slurm:  # srun hands its environment to the ranks (no shell); they get --signal from slurmd themselves
            return exit_code(subprocess.call(slurm_command(args, launch_file, runner_env), env=runner_env))
        return run_deepspeed(
            args, hosts, launch_file, scratch, runner_env, startup, stop_file, ssh_checked=local or not args.no_doctor
        )
    finally:
        launch_file.unlink(missing_ok=True)
        stop_file.unlink(missing_ok=True)


def run_deepspeed(args, hosts, launch_file, scratch, runner_env, startup, stop_file, ssh_checked) -> int:
    """The deepspeed runner, in its own session, in the launch file's directory (it tells remote ranks
    to `cd` there, unquoted). An absolute DS_ENV_FILE replaces the runner's ~/.deepspeed_env and
    ./.deepspeed_env (merged into the launch already), so the user's files are never written."""
    env_file = scratch / "deepspeed_env.txt"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in startup.items()))
    cmd = deepspeed_command(args, hosts, launch_file, ssh_checked)
    cmd = [sys.executable, "-m", "pipeline.launch.runner", *cmd[1:]]  # the `deepspeed` command's main, 1.6 s sooner
    # Its own session: Ctrl-C reaches this process only, which asks for a graceful stop first.
    proc = subprocess.Popen(cmd, env={**runner_env, "DS_ENV_FILE": str(env_file)}, cwd=launch_file.parent, start_new_session=True)
    requests = []

    def on_interrupt(signum, frame):
        requests.append(signum)
        if len(requests) == 1:
            stop_file.touch()
            print("\nlaunch: stopping after the current optimizer step, with a checkpoint (again to abort)", flush=True)
        else:  # DeepSpeed's runner tears every rank down on SIGINT
            os.killpg(proc.pid, signal.SIGINT)

    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_interrupt)
    return exit_code(proc.wait())


def exit_code(code: int) -> int:
    """A child's return code as an exit status (killed by signal N: 128 + N, as a shell reports it)."""
    return code if code >= 0 else 128 - code


def main(argv: list[str]) -> int:
    try:
        return run(argv)
    except ConfigError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
