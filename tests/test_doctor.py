"""`python -m pipeline doctor` and launch.sh's preflight against the 2-node test cluster (real sshd)."""

import socket
import time
from pathlib import Path

import pytest
from fixtures_cluster import DEAD_NODE, NODES
from helpers import REPO, ds_config, fake_nvidia_smi, free_port, launch_sh, losses, pipeline_command, run_options

from pipeline.core.base import load_json, unique_suffix
from pipeline.core.ds_config import ops_to_build
from pipeline.launch import probe
from pipeline.launch.doctor import (
    arch_problem,
    build_problem,
    choose_accelerator,
    driver_problem,
    network_problems,
)
from pipeline.launch.probe import build_facts, gpu_facts, network_facts


def doctor(hostfile, *extra):
    return pipeline_command("doctor", "--hostfile", str(hostfile), *extra, timeout=120)


@pytest.mark.cluster
def test_doctor_passes_two_live_nodes_with_one_row_each(cluster):
    result = doctor(cluster.hostfile("live", NODES), "--master-port", str(free_port()))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = result.stdout.splitlines()
    assert rows[0].split()[:4] == ["host", "slots", "hostname", "python"]
    for address, hostname in NODES.items():
        (row,) = [r for r in rows if r.startswith(address)]
        cells = row.split()
        assert cells[2] == hostname and cells[7:9] == ["0", "cpu"] and row.endswith("ok"), row  # no GPUs: CPU ranks


@pytest.mark.cluster
def test_doctor_names_the_dead_node(cluster):
    result = doctor(cluster.hostfile("live-and-dead", ["127.0.1.1", DEAD_NODE]))
    assert result.returncode != 0
    assert [r.split()[-1] for r in result.stdout.splitlines()[1:]] == ["ok", "FAILED"], result.stdout
    assert f"doctor: {DEAD_NODE}: ssh failed non-interactively" in result.stderr
    assert "Connection refused" in result.stderr
    assert "127.0.1.1:" not in result.stderr  # the live node has no problem


@pytest.mark.cluster
def test_doctor_finds_the_master_port_taken_on_the_first_node(cluster):
    with socket.socket() as taken:
        taken.bind(("127.0.1.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = doctor(cluster.hostfile("live", NODES), "--master-port", str(port))
    assert result.returncode != 0
    assert f"doctor: 127.0.1.1: master port {port} is in use" in result.stderr, result.stderr


@pytest.mark.cluster
def test_launch_on_a_dead_node_fails_fast_with_the_doctors_message(cluster, small_data, tmp_path):
    started = time.monotonic()
    result = launch_sh(
        "--hostfile",
        str(cluster.hostfile("live-and-dead", ["127.0.1.1", DEAD_NODE])),
        "--master-port",
        str(free_port()),
        "--train-file",
        str(small_data["train"]),
        "--dev-file",
        str(small_data["dev"]),
        "--output-dir",
        str(tmp_path),
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert f"doctor: {DEAD_NODE}: ssh failed non-interactively" in result.stderr, result.stdout + result.stderr
    assert "runner.py" not in result.stdout + result.stderr  # the deepspeed runner never started
    assert elapsed < 30, elapsed


@pytest.mark.cluster
def test_doctor_refuses_cuda_on_hosts_without_gpus(cluster):
    result = doctor(cluster.hostfile("live", NODES), "--master-port", str(free_port()), "--accelerator", "cuda")
    assert result.returncode != 0
    for address in NODES:
        assert f"doctor: {address}: slots=1 but 0 GPUs" in result.stderr, result.stderr


@pytest.mark.cluster
def test_doctor_finds_an_output_directory_that_is_not_shared(cluster):
    """node2 has its own tmpfs at private-node2: what rank 0 writes there, node2 never sees."""
    private = cluster.root / "private-node2" / "runs"
    result = doctor(cluster.hostfile("live", NODES), "--master-port", str(free_port()), "--output-dir", str(private))
    assert result.returncode != 0
    assert f"doctor: 127.0.1.2: {private} is not the first host's directory" in result.stderr, result.stderr
    assert "127.0.1.1: " not in result.stderr  # the first host wrote the marker and is fine
    shared = doctor(
        cluster.hostfile("live", NODES), "--master-port", str(free_port()), "--output-dir", str(cluster.root / "runs")
    )
    assert shared.returncode == 0, shared.stdout + shared.stderr


@pytest.mark.cluster
def test_a_hostfile_with_one_remote_host_runs_there_not_here(cluster, small_data, tmp_path):
    """DeepSpeed starts one host's ranks locally, whatever its name; the launcher must go over ssh."""
    config = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2)
    result = launch_sh(
        "--hostfile",
        str(cluster.hostfile("node2-only", ["127.0.1.2"])),
        "--ds-config",
        str(config),
        "--master-port",
        str(free_port()),
        *run_options(small_data, tmp_path),
        "--max-length",
        "64",
        "--max-steps",
        "1",  # one step shows the rank trained there
        "--eval-every",
        "0",
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "rank 0 of 1: host node2," in output, output[-4000:]  # hostname inside node2's UTS namespace
    assert len(losses(tmp_path / "run")) == 1


def test_accelerator_is_decided_per_host_not_by_the_launching_machine():
    gpu_node = {"gpus": 8, "capabilities": ["7.0"], "arch_list": ["sm_70", "sm_80"], "torch": "2.13.0+cu126"}
    cpu_node = {"gpus": 0, "capabilities": [], "arch_list": [], "torch": "2.13.0"}
    hosts = {"gpu-node-1": 8, "gpu-node-2": 8}
    # This machine (a login node) has no GPU; the hosts do.
    assert choose_accelerator("auto", {h: gpu_node for h in hosts}, hosts) == ("cuda", [])
    assert choose_accelerator("auto", {h: cpu_node for h in hosts}, hosts) == ("cpu", [])
    assert choose_accelerator("cpu", {h: gpu_node for h in hosts}, hosts) == ("cpu", [])
    choice, problems = choose_accelerator("auto", {"gpu-node-1": gpu_node, "gpu-node-2": cpu_node}, hosts)
    assert choice == "mixed" and "GPUs on gpu-node-1 but none on gpu-node-2" in problems[0]
    choice, problems = choose_accelerator("auto", {h: {**gpu_node, "gpus": 4} for h in hosts}, hosts)
    assert problems == [f"{h}: slots=8 but 4 GPUs (fix the hostfile's slots, or --accelerator cpu)" for h in hosts]


def test_a_torch_build_without_the_gpus_architecture_is_named():
    """PyTorch's CUDA 12.8/13 wheels from 2.11 on have no sm_70 kernels: a V100 cannot run them."""
    cu128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    problem = arch_problem("7.0", cu128, "2.13.0+cu128")
    assert "compute capability 7.0 (sm_70) is not among torch 2.13.0+cu128's" in problem and "whl/cu126" in problem
    assert arch_problem("7.0", ["sm_60", "sm_70", "sm_75", "sm_80", "sm_90"], "2.13.0+cu126") is None
    assert arch_problem("8.6", ["sm_80", "sm_90"], "x") is None  # sm_80 cubins run on 8.6
    assert arch_problem("8.9", ["sm_90", "compute_80"], "x") is None  # PTX compiles for newer GPUs
    assert arch_problem("8.0", ["sm_90"], "x") is not None
    assert "a CPU build" in arch_problem("7.0", [], "2.13.0+cpu")


V100_NODE = {
    "gpus": 8,
    "capabilities": ["7.0"],
    "arch_list": ["sm_70", "sm_80"],
    "torch": "2.13.0+cu126",
    "torch_cuda": "12.6",
    "driver": "550.54.15",
    "cuda_available": True,
}


def test_gpus_torch_cannot_use_are_refused_with_the_driver_it_needs():
    """A driver too old for the wheel: no compute capability to check, or CUDA unavailable to torch.
    Neither may pass as 'no architecture problem' (the loop over capabilities would be empty)."""
    hosts = {"gpu1": 8}
    old = {**V100_NODE, "cuda_available": False, "arch_list": [], "driver": "470.82.01"}
    _, problems = choose_accelerator("auto", {"gpu1": old}, hosts)
    assert problems == [
        "gpu1: torch 2.13.0+cu126 (CUDA 12.6) cannot use the GPUs here (torch.cuda.is_available() is False) "
        "with NVIDIA driver 470.82.01; CUDA 12.x needs driver 525.60.13 or newer"
    ]
    _, problems = choose_accelerator("auto", {"gpu1": {**V100_NODE, "capabilities": []}}, hosts)
    assert len(problems) == 1 and "lists 8 GPUs but no compute capability" in problems[0]
    assert driver_problem(V100_NODE) is None


def test_the_ops_a_config_builds_and_what_building_them_needs():
    shipped = load_json(REPO / "ds_configs" / "v100x8_fp16_zero2.json")
    assert ops_to_build(shipped) == ["fused_adam"]
    assert ops_to_build(load_json(REPO / "ds_configs" / "v100x8_fp16_zero3_offload.json")) == ["cpu_adam"]
    assert ops_to_build({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}) == []
    toolkit = {"cuda_home": "/usr/local/cuda-12.6", "nvcc": "12.6", "ninja": True, "cxx": True, "built_ops": []}
    node = {**V100_NODE, **toolkit}
    assert build_problem(["fused_adam"], node) is None
    assert build_problem(["fused_adam"], {**node, "nvcc": "12.2"}) is None  # minor versions may differ
    assert build_problem(["fused_adam"], {**node, "cuda_home": None, "nvcc": None, "built_ops": ["fused_adam"]}) is None
    problem = build_problem(["fused_adam"], {**node, "cuda_home": None, "nvcc": None, "ninja": False})
    assert problem == (
        "DeepSpeed builds fused_adam at the first step and this host lacks ninja (pip install ninja); a CUDA 12 "
        "toolkit (CUDA_HOME is not set and no nvcc was found): install them, or prebuild with "
        "`DS_BUILD_FUSED_ADAM=1 pip install deepspeed` (`ds_report` shows what is built)"
    )
    assert "nvcc of CUDA 12.x to match torch (CUDA_HOME has nvcc 11.8)" in build_problem(["fused_adam"], {**node, "nvcc": "11.8"})
    assert build_problem(["cpu_adam"], {**node, "cuda_home": None, "nvcc": None}) is None  # a C++ op: no nvcc
    assert "a C++ compiler" in build_problem(["cpu_adam"], {**node, "cxx": False})


def test_network_interfaces_host_names_and_shared_memory_are_checked_per_host():
    facts = {"hostname": "gpu1", "interfaces": ["lo", "eth0", "ib0"], "addresses": ["10.0.0.1"], "shm_gb": 64.0}
    assert network_problems(facts, {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "ib"}, 8, True) == []
    assert network_problems(facts, {"NCCL_SOCKET_IFNAME": "^docker,lo"}, 8, True) == []
    assert network_problems(facts, {"GLOO_SOCKET_IFNAME": "eth1"}, 8, True) == [
        "GLOO_SOCKET_IFNAME names eth1, not an interface here (lo, eth0, ib0)"
    ]
    assert network_problems(facts, {"NCCL_SOCKET_IFNAME": "=ib"}, 8, True) == [
        "NCCL_SOCKET_IFNAME==ib matches no interface here (lo, eth0, ib0)"
    ]
    debian = {**facts, "addresses": ["127.0.1.1"]}  # /etc/hosts' default entry for the host's own name
    (problem,) = network_problems(debian, {}, 8, True)
    assert problem.startswith("host name gpu1 resolves to 127.0.1.1: the other hosts cannot reach gloo there")
    assert network_problems(debian, {}, 8, False) == []  # one host: loopback is where the ranks are
    assert network_problems(debian, {"GLOO_SOCKET_IFNAME": "eth0"}, 8, True) == []
    assert "resolves to no address" in network_problems({**facts, "addresses": []}, {}, 8, True)[0]
    (small,) = network_problems({**facts, "shm_gb": 0.067}, {}, 8, True)
    assert small.startswith("/dev/shm has 0.07 GB, less than 1 GB: the 8 ranks here share memory")
    assert network_problems({**facts, "shm_gb": 0.067}, {}, 1, True) == []


def test_the_probe_reads_build_and_network_facts_here():
    """The probe's parts that run only on GPU hosts or across hosts, run here: keys and types the checks read."""
    import torch

    facts = {**build_facts(torch), **network_facts()}
    assert set(facts) >= {"cuda_home", "nvcc", "ninja", "cxx", "built_ops", "interfaces", "addresses", "shm_gb"}
    assert "lo" in facts["interfaces"] and facts["shm_gb"] > 0 and isinstance(facts["built_ops"], list)
    assert isinstance(facts["ninja"], bool) and isinstance(facts["cxx"], bool)


def test_without_nvidia_smi_torch_counts_the_gpus_and_says_so(tmp_path, monkeypatch):
    """A container given GPUs but not nvidia-smi: the probe asks torch (public torch.cuda calls,
    stand-ins here) instead of reporting no GPU, which would start CPU ranks on a GPU machine."""
    import torch

    from pipeline.launch.launcher import local_world, parse_args

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi
    monkeypatch.setattr(probe, "NVIDIA_DEVICES", str(tmp_path / "nvidia[0-9]*"))
    assert (gpu_facts()["gpus"], gpu_facts()["gpu_source"]) == (0, None)  # and no NVIDIA device: no GPU
    for name in ("nvidia0", "nvidia1", "nvidiactl"):
        (tmp_path / name).touch()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    facts = gpu_facts()
    assert (facts["gpus"], facts["capabilities"], facts["gpu_source"]) == (2, ["9.0"], "torch")
    assert local_world(parse_args([])) == (
        2,
        "every GPU of this machine (2 GPUs (counted by torch: no nvidia-smi there; CUDA_VISIBLE_DEVICES narrows torch's count))",
    )
    _, problems = choose_accelerator("cuda", {"gpu1": {**V100_NODE, "gpus": 2, "gpu_source": "torch"}}, {"gpu1": 4})
    assert problems == [
        "gpu1: slots=4 but 2 GPUs (counted by torch: no nvidia-smi there; CUDA_VISIBLE_DEVICES narrows torch's count) "
        "(fix the hostfile's slots, or --accelerator cpu)"
    ]
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin", 8))  # nvidia-smi counts every GPU of the host
    facts = gpu_facts()
    assert (facts["gpus"], facts["capabilities"], facts["driver"], facts["gpu_source"]) == (
        8,
        ["7.0"],
        "535.104.05",
        "nvidia-smi",
    )


def test_a_lock_left_by_an_interrupted_op_build_is_reported_with_how_to_clear_it(tmp_path, monkeypatch, capsys):
    """A build killed mid-way leaves `lock` in its extension directory, and torch then waits on it
    forever (file_baton.py): the doctor (here, on this host, in this process) fails and says what to remove."""
    from pipeline.launch import doctor as doctor_module

    extensions = tmp_path / "extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    interrupted, built = extensions / "fused_adam", extensions / "deepspeed_shm_comm"
    for op in (interrupted, built):
        op.mkdir(parents=True)
        (op / "lock").touch()
    (built / "deepspeed_shm_comm.so").write_bytes(b"")

    def doctor_here():
        ok, _, _ = doctor_module.check({"localhost": 1}, str(tmp_path / "out"), str(tmp_path / "cache"), free_port())
        return ok, capsys.readouterr().err

    ok, err = doctor_here()
    assert not ok
    assert (
        f"doctor: localhost: {interrupted / 'lock'}: a lock left 0 min ago by a build of DeepSpeed's fused_adam op that "
        "did not finish (and no built fused_adam); every run that builds or loads fused_adam here waits on it forever "
        "(torch/utils/file_baton.py has no timeout). Unless a build is running on this host now, remove it: "
        f"rm {interrupted / 'lock'}"
    ) in err.splitlines()
    assert (
        f"{built / 'lock'}: a lock left 0 min ago by a build of DeepSpeed's deepspeed_shm_comm op that did not finish (beside a built deepspeed_shm_comm)"
        in err
    )
    for op in (interrupted, built):
        (op / "lock").unlink()
    assert doctor_here() == (True, "")


def test_shared_directory_markers_of_concurrent_doctors_never_collide_and_none_is_left(tmp_path):
    """Two launches into one team directory, their doctors at once (on one host or two): each reads back
    its own marker, whatever the other wrote meanwhile; a doctor's check leaves no marker behind."""
    from pipeline.launch import doctor as doctor_module
    from pipeline.launch import probe as probe_module

    dirs = [str(tmp_path / "runs"), str(tmp_path / "runs" / "cache")]
    first, second = unique_suffix(), unique_suffix()
    assert first != second and first.startswith(f"{socket.gethostname()}-")
    assert probe_module.shared_dirs("/", dirs, first, write=True) == dict.fromkeys(dirs, True)
    assert probe_module.shared_dirs("/", dirs, second, write=True) == dict.fromkeys(dirs, True)
    assert probe_module.shared_dirs("/", dirs, first, write=False) == dict.fromkeys(dirs, True)
    probe_module.probe({"repo": "/", "dirs": dirs, "token": first, "remove": True})
    assert probe_module.shared_dirs("/", dirs, first, write=False) == dict.fromkeys(dirs, False)
    assert probe_module.shared_dirs("/", dirs, second, write=False) == dict.fromkeys(dirs, True)
    probe_module.probe({"repo": "/", "dirs": dirs, "token": second, "remove": True})
    # Two names of this host: the first writes, the second reads, all in this process; nothing stays.
    _, _, facts = doctor_module.check({"localhost": 1, "127.0.0.1": 1}, dirs[0], dirs[1], free_port())
    assert facts["127.0.0.1"]["shared"] == dict.fromkeys(dirs, True)
    assert not [path.name for directory in dirs for path in Path(directory).iterdir() if path.name.startswith(".pipeline")]
