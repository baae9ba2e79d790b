"""launch.sh's checks that need no host: each bad input stops it before the deepspeed runner starts,
with the file and line named; the env file for remote ranks merges the user's own files, unchanged.

The refusals run `zero-pipeline launch` (what ./launch.sh execs) in this process; one test runs the
script itself, to see that it passes arguments, working directory and exit code through."""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from helpers import (
    REPO,
    SAMPLE,
    cheap,
    cpu_env,
    ds_config,
    fake_nvidia_smi,
    launch_sh,
    note_launch,
    read_jsonl,
    run_options,
    write_jsonl,
)

from pipeline.core.base import ConfigError
from pipeline.core.dist import device_index
from pipeline.launch import launcher
from pipeline.launch.hosts import parse_node_address, read_hostfile
from pipeline.launch.launcher import (
    deepspeed_command,
    local_slots,
    local_world,
    parse_args,
    rank_env,
    read_env_file,
    requested_accelerator,
    slurm_command,
    user_env,
    visible_devices_include,
    warn_idle_gpus,
)


def test_missing_hostfile_is_an_error_not_a_fallback(tmp_path, refuse):
    _, err = refuse("--hostfile", str(tmp_path / "nodes"))
    assert f"launch: error: {tmp_path / 'nodes'}: hostfile not found" in err


def test_malformed_hostfile_line_stops_the_launch(tmp_path, refuse):
    hostfile = tmp_path / "nodes"
    hostfile.write_text("# comment\nnode1 slots=8\nnode2 8\n")
    _, err = refuse("--hostfile", str(hostfile))
    assert f"launch: error: {hostfile}, line 3:" in err, err


def test_hostfiles_in_the_repository_parse():
    assert dict(read_hostfile(str(REPO / "hostfiles" / "localhost"))) == {"localhost": 2}
    assert dict(read_hostfile(str(REPO / "hostfiles" / "v100x8"))) == {"gpu-node-1": 8}
    assert dict(read_hostfile(str(REPO / "hostfiles" / "two-nodes"))) == {"gpu-node-1": 8, "gpu-node-2": 8}
    assert read_env_file(REPO / "hostfiles" / "two-nodes.env")["GLOO_SOCKET_IFNAME"] == "eth0"


def test_malformed_env_file_line_stops_the_launch(tmp_path, refuse):
    hostfile = tmp_path / "nodes"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    (tmp_path / "nodes.env").write_text("# NCCL settings\nNCCL_DEBUG=INFO\nNCCL_SOCKET_IFNAME eth0\n")
    _, err = refuse("--hostfile", str(hostfile))
    assert f"launch: error: {tmp_path / 'nodes.env'}, line 3: expected KEY=VALUE" in err, err


def test_openmpi_rejects_include_before_launching(tmp_path, refuse):
    hostfile = tmp_path / "nodes"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    _, err = refuse("--hostfile", str(hostfile), "--launcher", "openmpi", "--include", "node1")
    assert "--launcher openmpi does not support --include/--exclude" in err


def test_include_of_an_unknown_host_is_an_error(tmp_path, refuse):
    hostfile = tmp_path / "nodes"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    _, err = refuse("--hostfile", str(hostfile), "--include", "node3")
    assert f"launch: error: {hostfile}: --include node3: Hostname 'node3' not found" in err, err


def test_rank_env_merges_the_users_deepspeed_env_and_the_cluster_env_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = "MY_SETTING=1\nNCCL_DEBUG=WARN\n"
    (tmp_path / ".deepspeed_env").write_text(own)
    (tmp_path / "nodes.env").write_text("# cluster\n\nNCCL_DEBUG = INFO\nGLOO_SOCKET_IFNAME=lo\nDS_ACCELERATOR=cpu\n")
    args = parse_args(["--hostfile", "nodes", "--launcher", "openmpi", "--master-addr", "node1", "--master-port", "1234"])
    files = user_env(args, tmp_path / "nodes")
    assert requested_accelerator(args, files) == "cpu"  # the older way to ask for CPU ranks still works
    env = rank_env(args, files, "cpu")
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "1"
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node1", "1234")  # OpenMPI ranks get the rendezvous this way
    assert (env["MY_SETTING"], env["NCCL_DEBUG"], env["GLOO_SOCKET_IFNAME"]) == ("1", "INFO", "lo")  # cluster file wins
    assert (tmp_path / ".deepspeed_env").read_text() == own
    args.accelerator = "cuda"
    with pytest.raises(ConfigError, match="--accelerator cuda contradicts DS_ACCELERATOR=cpu"):
        requested_accelerator(args, files)


def test_rank_env_sets_the_accelerator_decided_for_the_hosts_not_this_machines():
    """A login node without GPUs launching onto GPU nodes: the ranks get CUDA, not this machine's CPU."""
    args = parse_args(["--hostfile", "nodes"])
    env = rank_env(args, {}, "cuda")
    assert env["DS_ACCELERATOR"] == "cuda" and "OMP_NUM_THREADS" not in env


def test_cuda_visible_devices_becomes_an_include_for_one_local_host(monkeypatch):
    args = parse_args(["--hostfile", "nodes"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_devices_include(args, {"localhost": 8}, {}) == "localhost:2,3"
    for hosts, env, message in [
        ({"localhost": 2}, {}, "names GPU 2, 3 but the hostfile gives localhost slots=2"),
        ({"node1": 8, "node2": 8}, {}, "replaces it on every host"),
        ({"gpu-node-1": 8}, {}, "replaces it on every host"),
        ({"localhost": 8}, {"CUDA_VISIBLE_DEVICES": "0"}, "in an env file is replaced"),
    ]:
        with pytest.raises(ConfigError, match=message):
            visible_devices_include(args, hosts, env)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5f1c")
    with pytest.raises(ConfigError, match="only GPU indices"):
        visible_devices_include(args, {"localhost": 8}, {})
    args.include = "localhost:0"
    with pytest.raises(ConfigError, match="both choose GPUs"):
        visible_devices_include(args, {"localhost": 8}, {})
    # Without a hostfile, this machine's slots reach the GPUs named (torch counts 2 of 2,3 without nvidia-smi).
    assert (local_slots(2, {"CUDA_VISIBLE_DEVICES": "2,3"}), local_slots(8, {"CUDA_VISIBLE_DEVICES": "2,3"})) == (4, 8)
    assert local_slots(2, {}) == 2


@pytest.mark.ranks
def test_a_real_launch_takes_the_ranks_cuda_visible_devices_gives_and_a_port_of_its_own(tmp_path, small_data):
    """CUDA_VISIBLE_DEVICES=1 with a 2-slot local hostfile starts one rank (DeepSpeed alone would start
    two). No --master-port while another job listens on 29500 (DeepSpeed's default): the launch takes a
    free port, as torchrun --standalone does, instead of joining or colliding with that rendezvous."""
    hostfile = tmp_path / "local"
    hostfile.write_text("localhost slots=2\n")
    config = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2)
    env = {**cpu_env(), "CUDA_VISIBLE_DEVICES": "1"}
    options = ["--hostfile", str(hostfile), "--ds-config", str(config), *run_options(small_data, tmp_path)]
    note_launch("launch.sh")  # not launch_sh: it would choose the port
    with socket.socket() as other_job:
        other_job.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other_job.bind(("127.0.0.1", 29500))
        other_job.listen()
        result = subprocess.run(
            [str(REPO / "launch.sh"), *cheap([*options, "--max-length", "64", "--max-steps", "1", "--eval-every", "0"])],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "CUDA_VISIBLE_DEVICES=1 -> --include localhost:1" in output
    assert "rank 0 of 1:" in output and "rank 1 of" not in output
    assert "4 per rank x 2 accumulation x 1 ranks" in output
    assert "--master_port 29500" not in output and "--master_port=29500" not in output


def test_fp16_on_cpu_ranks_is_refused_before_launch(tmp_path, refuse):
    config = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2, fp16={"enabled": True})
    _, err = refuse("--ds-config", str(config), "--no-doctor", "--accelerator", "cpu")
    assert "fp16 requested but CPU" in err, err


def test_deepspeed_command_per_launcher():
    """The ranks' command names the launch file and nothing the user wrote (it may reach a remote shell)."""
    hosts, launch_file = {"node1": 1, "node2": 1}, Path("/runs/.launch-login-1-ab12.json")
    args = parse_args(
        ["--hostfile", "nodes", "--rank-logs", "logs", "--master-addr", "node1", "--master-port", "29500", "--max-steps", "4"]
    )
    assert args.train.max_steps == 4
    cmd = deepspeed_command(args, hosts, launch_file, ssh_checked=True)
    assert cmd[:8] == ["deepspeed", "--hostfile", "nodes", "--master_addr", "node1", "--master_port", "29500", "--no_ssh_check"]
    assert "--enable_each_rank_log" in cmd and "--launcher" not in cmd
    assert cmd[-5:] == ["--module", "pipeline", "train", "--launch-file", str(launch_file)] and "--max-steps" not in cmd
    args.launcher, args.launcher_args = "openmpi", "--allow-run-as-root"
    cmd = deepspeed_command(args, hosts, launch_file, ssh_checked=True)
    assert cmd[cmd.index("--launcher") + 1] == "openmpi" and "--enable_each_rank_log" not in cmd
    assert cmd[cmd.index("--launcher_args") + 1] == "--allow-run-as-root --output-filename logs"  # mpirun's per-rank logs


def test_one_remote_host_is_reached_over_ssh_not_started_here():
    args, launch_file = parse_args(["--hostfile", "nodes", "--master-addr", "gpu-node-1"]), Path("/runs/.launch.json")
    assert "--force_multi" in deepspeed_command(args, {"gpu-node-1": 8}, launch_file, ssh_checked=True)
    assert "--force_multi" not in deepspeed_command(args, {"localhost": 2}, launch_file, ssh_checked=True)
    assert "--force_multi" not in deepspeed_command(args, {"node1": 1, "node2": 1}, launch_file, ssh_checked=True)


def test_options_take_underscores_and_hugging_face_names():
    args = parse_args(
        [
            "--deepspeed",
            "ds.json",
            "--master_port",
            "1234",
            "--output_dir",
            "out",
            "--num_train_epochs",
            "3",
            "--per_device_eval_batch_size",
            "4",
            "--max_length",
            "64",
            "--resume_from_checkpoint",
            "auto",
        ]
    )
    assert (args.ds_config, args.master_port) == ("ds.json", 1234)
    assert (args.train.output_dir, args.train.epochs, args.train.eval_batch_size, args.train.max_length, args.train.resume) == (
        "out",
        3,
        4,
        64,
        "auto",
    )


def test_unknown_option_is_refused_before_the_doctor_and_the_ranks(refuse):
    out, err = refuse("--max-steps", "2", "--learning_rat", "3e-5")
    assert "unrecognized arguments: --learning_rat 3e-5" in err, err
    assert "did you mean --learning_rate?" in err, err
    assert "host" not in out  # no doctor table


def pdsh_rank_value(key: str, value: str) -> str:
    """What a rank started by pdsh sees: DeepSpeed's PDSHRunner builds `export KEY=VALUE;` for a shell."""
    import argparse

    from deepspeed.launcher.multinode_runner import PDSHRunner

    runner = PDSHRunner(argparse.Namespace(user_args=[], user_script="x", launcher_args=""), "")
    runner.add_export(key, value)
    script = f'export {key}={runner.exports[key]}; printf %s "${key}"'
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize(
    "line, value",
    [
        ('LD_LIBRARY_PATH="a b"', "a b"),
        ("LD_LIBRARY_PATH='a b'", "a b"),
        ("LD_LIBRARY_PATH=a b", "a b"),
        ("LD_LIBRARY_PATH=^docker0,lo", "^docker0,lo"),
        ("LD_LIBRARY_PATH=x;y&z|w", "x;y&z|w"),
        ("LD_LIBRARY_PATH=it's", "it's"),
        ('LD_LIBRARY_PATH=""', ""),
        ("LD_LIBRARY_PATH=eth0", "eth0"),
    ],
)
def test_start_up_env_values_are_the_same_for_local_and_pdsh_ranks(tmp_path, line, value):
    """LD_*, PATH, PYTHON* (and the accelerator) go on the runner's command line: a rank needs them as it starts."""
    (tmp_path / "nodes.env").write_text(line + "\n")
    local = read_env_file(tmp_path / "nodes.env")["LD_LIBRARY_PATH"]
    assert local == value == pdsh_rank_value("LD_LIBRARY_PATH", local)


@pytest.mark.parametrize(
    "line, what",
    [
        ("LD_LIBRARY_PATH=$(id)", "contains '$'"),
        ('LD_LIBRARY_PATH="$HOME/x"', "contains '$'"),
        ("LD_LIBRARY_PATH=`id`", "contains '`'"),
        ('LD_LIBRARY_PATH=a"b', """contains '"'"""),
        ("LD_LIBRARY_PATH=a\\b", r"contains '\\'"),
        ('LD_LIBRARY_PATH=" a"', "starts or ends with a space"),
    ],
)
def test_start_up_env_values_the_runner_would_mangle_are_refused_with_file_and_line(tmp_path, line, what):
    (tmp_path / "nodes.env").write_text("# cluster\nOK=1\n" + line + "\n")
    with pytest.raises(ConfigError) as e:
        read_env_file(tmp_path / "nodes.env")
    assert f"{tmp_path / 'nodes.env'}, line 3: LD_LIBRARY_PATH" in str(e.value) and what in str(e.value)


def test_openmpi_refuses_values_deepspeed_would_pass_in_literal_quotes(tmp_path):
    (tmp_path / "nodes.env").write_text("NCCL_SOCKET_IFNAME=eth0\nLD_LIBRARY_PATH=a b\n")
    assert read_env_file(tmp_path / "nodes.env")["LD_LIBRARY_PATH"] == "a b"
    with pytest.raises(ConfigError, match="nodes.env, line 2: LD_LIBRARY_PATH='a b': with --launcher openmpi"):
        read_env_file(tmp_path / "nodes.env", "openmpi")


@pytest.mark.parametrize("value", ["p@ss$word1", "$(touch PWNED)", "`id`", 'a"b', "a\\b", " padded "])
def test_other_env_values_travel_verbatim_in_the_launch_file(tmp_path, value):
    """Secrets and the like never reach a shell (they go in the launch file): any value is kept as written."""
    (tmp_path / "nodes.env").write_text(f"MLFLOW_TRACKING_PASSWORD='{value}'\n")
    assert read_env_file(tmp_path / "nodes.env", "openmpi")["MLFLOW_TRACKING_PASSWORD"] == value


@pytest.mark.parametrize("host", ["-oProxyCommand=touch${IFS}/tmp/x", "node1;id", "node$(id)", "a`b`"])
def test_hostnames_that_pdsh_or_ssh_would_misread_are_refused(tmp_path, host):
    path = tmp_path / "nodes"
    path.write_text(f"node0 slots=1\n{host} slots=1\n")
    with pytest.raises(ConfigError, match=f"{path}, line 2: .* is not a host name"):
        read_hostfile(str(path))
    path.write_text("node0 slots=1\nnode-1.cluster_a slots=2\n10.0.0.7 slots=1\n")
    assert list(read_hostfile(str(path))) == ["node0", "node-1.cluster_a", "10.0.0.7"]


def test_master_addr_that_is_not_a_host_name_stops_the_launch(tmp_path, refuse):
    hostfile = tmp_path / "nodes"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    _, err = refuse("--hostfile", str(hostfile), "--master-addr", "node1;id")
    assert "launch: error: --master-addr 'node1;id' is not a host name" in err, err


def test_each_rank_binds_the_gpu_it_was_given():
    """Local rank N takes GPU N of the node; a SLURM task bound to one GPU (--gpus-per-task=1,
    --gpu-bind=single:1) sees only that one, as device 0, whatever its SLURM_LOCALID."""
    assert device_index(3, 8, slurm_step=False) == 3
    assert device_index(3, 8, slurm_step=True) == 3
    assert device_index(3, 1, slurm_step=True) == 0
    assert device_index(0, 1, slurm_step=True) == 0
    assert device_index(1, 1, slurm_step=False) is None  # more hostfile slots than GPUs
    assert device_index(3, 2, slurm_step=True) is None  # two GPUs per task: not one per rank


def test_srun_gets_the_allocations_cpus_per_task_and_the_nodes_address():
    args, launch_file = parse_args(["--launcher", "slurm", "--rank-logs", "logs"]), Path("/runs/.launch.json")
    with_cpus = slurm_command(args, launch_file, {"SLURM_CPUS_PER_TASK": "6"})
    assert with_cpus[:4] == ["srun", "--kill-on-bad-exit=0", "--cpus-per-task=6", "--output=logs/rank-%t.log"]
    assert "--cpus-per-task=6" not in slurm_command(args, launch_file, {"SLURM_CPUS_PER_TASK": "6", "SRUN_CPUS_PER_TASK": "6"})
    assert not any(arg.startswith("--cpus-per-task") for arg in slurm_command(args, launch_file, {}))
    shown = "NodeName=gpu1 Arch=x86_64 CoresPerSocket=16 NodeAddr=10.1.2.3 NodeHostName=gpu1 Version=22.05.8\n"
    assert parse_node_address(shown, "gpu1") == "10.1.2.3"
    assert parse_node_address("NodeName=gpu1 Arch=x86_64\n", "gpu1") == "gpu1"


def test_without_a_hostfile_every_gpu_is_a_rank_and_without_gpus_two_cpu_ranks(tmp_path, monkeypatch):
    args = parse_args([])
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin", 8))
    assert local_world(args)[0] == 8
    assert local_world(parse_args(["--num-gpus", "3"]))[0] == 3
    with pytest.raises(ConfigError, match="--num-gpus 9, but this machine has 8 GPUs"):
        local_world(parse_args(["--num-gpus", "9"]))
    assert local_world(parse_args(["--accelerator", "cpu"]))[0] == 2  # CPU ranks asked for on a GPU node
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi: no GPU
    ranks, why = local_world(args)
    assert ranks == 2 and "no GPU" in why


def test_a_hostfile_with_fewer_slots_than_gpus_is_warned_about(capsys):
    args = parse_args(["--hostfile", "h"])
    warn_idle_gpus(args, {"node1": 4, "node2": 8}, {"node1": {"gpus": 8}, "node2": {"gpus": 8}})
    out = capsys.readouterr().out
    assert "node1 has 8 GPUs but the hostfile gives it slots=4: 4 stay idle" in out and "node2" not in out


def test_a_run_file_gives_options_and_the_command_line_overrides_it(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("hostfile: h\nno_doctor: true\nlearning-rate: 3.0e-5\nepochs: 3\nrank_logs: null\n")
    args = parse_args([str(run), "--epochs", "1"])
    assert args.hostfile == "h" and args.no_doctor and args.train.learning_rate == 3e-5 and args.train.epochs == 1
    assert args.command == "train"
    run.write_text("task: masked_lm\ntext_file: notes.txt\n")  # a pretraining run's run.yaml
    assert parse_args([str(run)]).command == "pretrain"
    run.write_text("learning_rat: 3.0e-5\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        parse_args([str(run)])


BAD_INPUTS = [
    (["--train-file", "missing.jsonl", "--val-size", "0.1"], "missing.jsonl: data file not found"),
    (["--train-file", "data.csv"], "give its dev set (--dev-file) or hold part of it out (--val-size 0.1)"),
    (["--train-file", "data.csv", "--val-size", "0.1", "--label-column", "diagnosis"], "data.csv: no column 'diagnosis'"),
    (["--train-file", "notes.docx", "--val-size", "0.1"], "notes.docx: unknown data format '.docx'"),
    (["--model", "nomodel"], "nomodel is not a model directory (no config.json)"),
    (["--output-dir", "data.csv/runs"], "data.csv/runs is not writable"),
    (["--learning-rate", "2e-5", "--ds-config", "concrete.json"], "optimizer.params.lr=0.001 contradicts --learning-rate 2e-05"),
]


def users_directory(path):
    """A user's directory with a one-row CSV, a directory that is no model and a concrete DeepSpeed config."""
    (path / "data.csv").write_text("text,label\n胸痛三天,冠心病\n", encoding="utf-8")
    (path / "nomodel").mkdir()
    ds_config(path / "concrete.json", 2, micro=4, accum=2)


def one_error_line(err: str, message: str) -> None:
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and message in errors[0], err


@pytest.mark.parametrize("options, message", BAD_INPUTS, ids=[m.split(":")[0][:30] for _, m in BAD_INPUTS])
def test_bad_inputs_get_one_line_before_any_rank_starts(tmp_path, monkeypatch, refuse, options, message):
    """From the user's own directory, with relative paths: one line, exit 2, no doctor, no runner."""
    users_directory(tmp_path)
    monkeypatch.chdir(tmp_path)
    out, err = refuse(*options)
    one_error_line(err, message)
    assert "host " not in out


@pytest.mark.ranks
def test_launch_sh_passes_arguments_directory_and_exit_code_through(tmp_path):
    """./launch.sh itself, from the user's directory: a relative path reaches the checks, and their one
    line and exit 2 come back unchanged, without a traceback, a doctor table or the runner."""
    users_directory(tmp_path)
    result = launch_sh("--train-file", "data.csv", "--val-size", "0.1", "--label-column", "diagnosis", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    one_error_line(result.stderr, "data.csv: no column 'diagnosis'")
    assert "Traceback" not in result.stderr and "host " not in result.stdout and "runner.py" not in result.stdout


@pytest.fixture
def handed_over(monkeypatch, capsys):
    """`handed_over(*ARGV)`: `zero-pipeline launch ARGV --no-doctor --accelerator cpu` in this process up to
    the runner, which is not started: returns what it would have been given (the command, its
    environment, the command-line environment file's lines) and the launch file's mode and contents,
    read while the launch holds it."""
    seen = {}

    def runner(args, hosts, launch_file, scratch, runner_env, startup, stop_file, ssh_checked):
        seen.update(
            cmd=deepspeed_command(args, hosts, launch_file, ssh_checked),
            env=runner_env,
            startup=startup,
            mode=launch_file.stat().st_mode & 0o777,
            launch=json.loads(launch_file.read_text(encoding="utf-8")),
            launch_file=launch_file,
        )
        return 0

    monkeypatch.setattr(launcher, "run_deepspeed", runner)

    def run(*argv: str) -> dict:
        code = launcher.main([*argv, "--no-doctor", "--accelerator", "cpu"])
        out = capsys.readouterr()
        assert code == 0, out.out + out.err
        assert not seen["launch_file"].exists()  # removed when the launch ends
        return seen

    return run


HOSTILE = {"--run-name": "x$(touch PWNED)", "--text-column": "te`touch PWNED`xt", "--label-column": "dx;touch PWNED"}


def test_user_strings_and_secrets_reach_the_ranks_in_the_launch_file_not_on_a_command_line(tmp_path, monkeypatch, handed_over):
    """Two remote hosts (the pdsh runner builds a shell command for each): the ranks' command names the
    launch file alone; the user's options, resolved with absolute paths, and the secrets of the env file
    and of this environment are in the file (mode 0600), never in the command, its environment or
    DS_ENV_FILE's exports; a password with `$` is kept as written."""
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "notes (2024)"
    notes.mkdir()
    for split in ("train", "dev"):
        rows = read_jsonl(SAMPLE / f"{split}.jsonl")[:40]
        write_jsonl(notes / f"{split}.jsonl", [{"te`touch PWNED`xt": r["text"], "dx;touch PWNED": r["label"]} for r in rows])
    (tmp_path / "nodes").write_text("node1 slots=1\nnode2 slots=1\n")
    (tmp_path / "nodes.env").write_text("MLFLOW_TRACKING_PASSWORD=p@ss$word1\nLD_LIBRARY_PATH=/opt/cuda/lib64\n")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-1")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "mlflow-token-2")
    options = [arg for pair in HOSTILE.items() for arg in pair]
    seen = handed_over(
        "--hostfile", "nodes", "--train-file", "notes (2024)/train.jsonl", "--dev-file", "notes (2024)/dev.jsonl", *options
    )
    launch_file = seen["launch_file"]
    assert seen["cmd"][-5:] == ["--module", "pipeline", "train", "--launch-file", str(launch_file)]
    assert seen["mode"] == 0o600 and launch_file.parent == tmp_path / "runs"
    config, env = seen["launch"]["config"], seen["launch"]["env"]
    assert (config["run_name"], config["text_column"], config["label_column"]) == tuple(HOSTILE.values())
    assert config["train_file"] == str(notes / "train.jsonl") and config["output_dir"] == str(tmp_path / "runs")
    assert (env["MLFLOW_TRACKING_PASSWORD"], env["MLFLOW_TRACKING_TOKEN"]) == ("p@ss$word1", "mlflow-token-2")
    command_line = " ".join(seen["cmd"]) + " ".join(f"{k}={v}" for k, v in seen["startup"].items())
    for secret in ("p@ss$word1", "mlflow-token-2", "PWNED", "notes (2024)"):
        assert secret not in command_line
    assert not any(key.startswith("MLFLOW") for key in seen["env"])  # DeepSpeed's runner exports MLFLOW* from its environment
    assert seen["startup"]["LD_LIBRARY_PATH"] == "/opt/cuda/lib64" and "MLFLOW_TRACKING_PASSWORD" not in seen["startup"]
    assert seen["env"]["WANDB_API_KEY"] == "wandb-secret-1"  # not exported by the runner: it stays where it is
    assert seen["cmd"][seen["cmd"].index("--master_port") + 1] == "29500"  # the rendezvous is on node1, not here
    # The runner starts in the launch file's directory: a relative hostfile would not be found there,
    # and DeepSpeed's runner then only warns and trains on this machine's resources.
    assert seen["cmd"][seen["cmd"].index("--hostfile") + 1] == str(tmp_path / "nodes")


def test_a_launch_on_this_machine_takes_a_free_port_and_master_port_still_chooses(tmp_path, monkeypatch, handed_over):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    ports = {int(handed_over("--max-steps", "1")["cmd"][6]) for _ in range(2)}
    assert 29500 not in ports and len(ports) == 2  # as torchrun --standalone: another job's rendezvous is never joined
    assert handed_over("--master-port", "29611")["cmd"][6] == "29611"


def test_a_remote_launch_refuses_an_output_directory_a_shell_would_split(tmp_path, monkeypatch, refuse):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nodes").write_text("node1 slots=1\nnode2 slots=1\n")
    _, err = refuse("--hostfile", "nodes", "--output-dir", "my runs", "--no-doctor", "--accelerator", "cpu")
    assert f"launch: error: output directory {tmp_path / 'my runs'}: the ranks on remote hosts" in err, err


def test_a_launch_file_is_read_as_data_and_sets_its_environment(tmp_path, monkeypatch):
    """What `train --launch-file` does on a rank: the config back as it was, its environment set; a file
    for another command or a missing one is refused by name."""
    from pipeline.core.launch_file import read_launch_file, write_launch_file
    from pipeline.core.options import TrainConfig

    cfg = TrainConfig(run_name="x$(touch PWNED)", output_dir=str(tmp_path)).with_absolute_paths()
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    path = write_launch_file(tmp_path, "train", cfg, {"MLFLOW_TRACKING_PASSWORD": "p@ss$word1"})
    assert read_launch_file(str(path), "train") == cfg and os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss$word1"
    with pytest.raises(ConfigError, match="is for `train`, not `pretrain`"):
        read_launch_file(str(path), "pretrain")
    with pytest.raises(ConfigError, match="launch file .*missing.json: .*written by `zero-pipeline launch`"):
        read_launch_file(str(tmp_path / "missing.json"), "train")
    assert not list(tmp_path.glob("PWNED*")) and not Path("PWNED").exists()
