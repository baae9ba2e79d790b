"""check-config: world size from hostfiles as the deepspeed runner computes it, batch derivation per
cluster shape, nested key/type validation, stage/precision rules, LR scaling, and the shipped and
real-world configs passing."""

import json
import math
from pathlib import Path

import pytest
from test_ds_config import wild_configs

from pipeline.cli.main import main
from pipeline.core.base import ConfigError
from pipeline.core.ds_config import Hardware, resolve_ds_config
from pipeline.core.options import TrainConfig
from pipeline.launch.hosts import read_hostfile, world_from_hostfile

REPO = Path(__file__).resolve().parent.parent
V100, A100, CPU = Hardware.named("v100"), Hardware.named("a100"), Hardware.named("cpu")


def hostfile(tmp_path: Path, text: str) -> str:
    path = tmp_path / "hostfile"
    path.write_text(text, encoding="utf-8")
    return str(path)


def portable(**kw) -> dict:
    """A config that states only the global batch: micro and accumulation are derived per cluster."""
    return {
        "train_batch_size": 256,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-4, "warmup_num_steps": "auto", "total_num_steps": "auto"},
        },
        "zero_optimization": {"stage": 2},
        **kw,
    }


def resolve(ds: dict, world: int, hw=CPU, **cfg):
    return resolve_ds_config("c.json", ds, world, hw, TrainConfig(**cfg))


@pytest.mark.parametrize(
    "lines, options, world, expected",
    [
        ("node1 slots=8\n", {}, 8, (256, 8, 4)),  # 1 x 8 V100
        ("node1 slots=4\nnode2 slots=4\n", {}, 8, (256, 8, 4)),  # 2 x 4
        ("n1 slots=2\nn2 slots=2\nn3 slots=2\nn4 slots=2\n", {}, 8, (256, 8, 4)),  # 4 x 2
        ("localhost slots=1\n", {}, 1, (256, 8, 32)),  # a laptop CPU
        ("node1 slots=4\nnode2 slots=4\n", {"include": "node1:0,1@node2"}, 6, None),
        ("node1 slots=4\nnode2 slots=4\n", {"exclude": "node2:3"}, 7, None),
        ("node1 slots=4\nnode2 slots=4\n", {"num_nodes": 1}, 4, (256, 8, 8)),
        ("node1 slots=4\nnode2 slots=4\n", {"num_nodes": 2, "num_gpus": 2}, 4, (256, 8, 8)),
    ],
)
def test_world_size_and_batch_per_cluster_shape(tmp_path, lines, options, world, expected):
    hosts = world_from_hostfile(hostfile(tmp_path, "# cluster\n" + lines), **options)
    assert sum(len(s) for s in hosts.values()) == world
    if expected is None:  # 256 does not divide by 6 or 7 ranks: the error lists the nearest valid batches
        with pytest.raises(ConfigError, match=f"not divisible by world size \\({world}\\).*nearest valid: train_batch_size"):
            resolve(portable(), world)
        return
    resolved = resolve(portable(), world)
    assert (
        tuple(resolved.ds[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))
        == expected
    )
    assert "derived: train_micro_batch_size_per_gpu, gradient_accumulation_steps" in resolved.notes[0]


def test_global_and_micro_batch_options_fill_auto_values_like_hf_trainer():
    ds = portable(train_batch_size="auto")
    assert resolve(ds, 8, global_batch=512, micro_batch=4).ds["gradient_accumulation_steps"] == 16
    with pytest.raises(ConfigError, match="train_batch_size=256 contradicts --global-batch 512"):
        resolve(portable(), 8, global_batch=512)
    with pytest.raises(
        ConfigError,
        match=r"by train_micro_batch_size_per_gpu \(3\) x world size \(8\).*"
        r"train_batch_size 240 \(10 x 3 x 8\) or train_batch_size 264",
    ):
        resolve(portable(), 8, micro_batch=3)


@pytest.mark.parametrize(
    "text, message",
    [
        ("a slots=4\nb slots=4\na slots=2\n", r"hostfile, line 3: host a is listed twice"),
        ("a slots=4\nb slots=0\n", r"hostfile, line 2: host b has slots=0"),
        ("a slots=4\nb slots=four\n", r"hostfile, line 2: 'b slots=four' is not 'HOSTNAME slots=N'"),
        ("a slots=4\nb slots=4x\n", r"hostfile, line 2: 'b slots=4x' is not 'HOSTNAME slots=N'"),
        ("# nothing\n", r"hostfile: no 'HOSTNAME slots=N' lines"),
        # pdsh -w takes "2001" for a remote-command type; DeepSpeed's --include splits "::1:0" at each ':'
        ("a slots=4\n2001:db8::1 slots=4\n", r"hostfile, line 2: '2001:db8::1' is an IPv6 address; give the host's name"),
        ("::1 slots=2\n", r"hostfile, line 1: '::1' is an IPv6 address; give the host's name"),
    ],
)
def test_hostfile_errors_name_file_and_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        read_hostfile(hostfile(tmp_path, text))


def test_unknown_include_host_and_missing_hostfile(tmp_path):
    path = hostfile(tmp_path, "node1 slots=4\nnode2 slots=4\n")
    with pytest.raises(
        ConfigError, match=r"--include node3: Hostname 'node3' not found in hostfile; hosts in the file: node1, node2"
    ):
        world_from_hostfile(path, include="node3")
    with pytest.raises(ConfigError, match="hostfile not found"):
        read_hostfile(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "ds, message",
    [
        (
            portable(gradient_acumulation_steps=2),
            r"unknown key 'gradient_acumulation_steps' \(did you mean 'gradient_accumulation_steps'\?\)",
        ),
        (
            portable(zero_optimization={"stage": 3, "offload_optimizer": {"devcie": "cpu"}}),
            r"c\.json: zero_optimization\.offload_optimizer: unknown key 'devcie' \(did you mean 'device'\?\)",
        ),
        (
            portable(fp16={"enabled": True, "intial_scale_power": 16}),
            r"fp16: unknown key 'intial_scale_power' \(did you mean 'initial_scale_power'\?\)",
        ),
        (portable(scheduler={"type": "WarmupLR", "parmas": {}}), r"scheduler: unknown key 'parmas' \(did you mean 'params'\?\)"),
        (
            portable(zero_optimization={"stage": 2, "reduce_bucket_size": "big"}),
            r"zero_optimization\.reduce_bucket_size = 'big': Input should be a valid integer",
        ),
        (portable(steps_per_print="100"), r"steps_per_print = '100', expected an integer"),
        (portable(zero_optimization={"stage": 2, "offload_optimizer": {"device": "gpu"}}), r"offload_optimizer\.device = 'gpu'"),
        (portable(fp16={"enabled": True}, bf16={"enabled": True}), "both true"),
        (
            portable(zero_optimization={"stage": 2, "offload_param": {"device": "cpu"}}),
            "offload_param only works at stage 3, and stage 2 ignores it",
        ),
    ],
)
def test_validation_errors(ds, message):
    with pytest.raises(ConfigError, match=message):
        resolve(ds, 8, hw=V100)


def test_bf16_on_v100_is_refused_and_every_key_error_is_reported_at_once():
    with pytest.raises(ConfigError, match="V100 .* has no bf16"):
        resolve(portable(bf16={"enabled": True}), 8, hw=V100)
    assert resolve(portable(bf16={"enabled": True}), 8, hw=A100).ds["bf16"]["enabled"]
    with pytest.raises(ConfigError) as e:
        resolve(portable(fp16={"enabeld": True}, zero_optimization={"stage": 2, "overlap_com": True}), 8)
    assert "'enabeld'" in str(e.value) and "'overlap_com'" in str(e.value)


def test_warnings_for_settings_that_hurt_or_are_ignored():
    ds = portable(
        fp16={"enabled": "auto", "loss_scale": 0, "initial_scale_power": 32},
        zero_optimization={"stage": 2, "stage3_max_live_parameters": 1e9, "cpu_offload": False},
    )
    warnings = "\n".join(resolve(ds, 8, hw=V100).warnings)
    assert "initial_scale_power=32" in warnings and "about 16 or more of its first steps" in warnings
    assert "stage3_max_live_parameters is ignored at stage 2" in warnings
    assert "zero_optimization.cpu_offload is deprecated; use offload_optimizer" in warnings
    assert resolve(portable(fp16={"enabled": True, "initial_scale_power": 16}), 8, hw=V100).warnings == []


@pytest.mark.parametrize("rule, world, factor", [("linear", 8, 2.0), ("sqrt", 8, math.sqrt(2.0)), ("none", 8, 1.0)])
def test_lr_scaling_is_applied_once_and_recorded(rule, world, factor):
    resolved = resolve(portable(), world, lr_scaling=rule, reference_batch=128)
    ds = resolved.ds
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(1e-4 * factor)
    assert ds["scheduler"]["params"]["warmup_max_lr"] == pytest.approx(1e-4 * factor)
    assert ds["scheduler"]["params"]["warmup_min_lr"] == 0
    if rule == "none":
        assert "pipeline_resolved" not in ds
        return
    assert ds["pipeline_resolved"]["lr_scaling"]["factor"] == pytest.approx(factor)
    assert any("learning rate scaled" in note for note in resolved.notes)
    with pytest.raises(ConfigError, match="already scaled"):  # the written config fed back in
        resolve(json.loads(json.dumps(ds)), world, lr_scaling=rule, reference_batch=128)
    with pytest.raises(ConfigError, match="reference_batch"):
        TrainConfig(lr_scaling=rule)


def test_shipped_configs_pass_check_config(capsys):
    shipped = sorted((REPO / "ds_configs").glob("*.json"))
    assert shipped
    for path in shipped:
        if path.name.startswith("small"):
            clusters = [("hostfiles/localhost", "cpu", "")]
        else:  # the same file on one node and on the README's two nodes: the global batch stays 256
            clusters = [
                (str(REPO / "tests" / "hostfiles" / "v100x8"), "v100", "8 per rank x 4 accumulation x 8 ranks = 256"),
                (str(REPO / "hostfiles" / "two-nodes"), "v100", "8 per rank x 2 accumulation x 16 ranks = 256"),
            ]
        for hosts, gpu, batch in clusters:
            assert main(["check-config", "--ds-config", str(path), "--hostfile", hosts, "--gpu", gpu]) == 0, (path, hosts)
            out = capsys.readouterr().out
            assert "ok: no errors" in out and "ZeRO stage" in out and "optimizer: AdamW" in out and batch in out, out


def test_real_world_configs_pass_check_config_for_8_slots(capsys):
    for path in wild_configs():
        raw = json.loads(path.read_text())
        # HF Trainer fills an all-"auto" batch from its per-device batch size; --micro-batch does that here
        unset = all(raw.get(k, "auto") == "auto" for k in ("train_batch_size", "train_micro_batch_size_per_gpu"))
        code = main(
            [
                "check-config",
                "--ds-config",
                str(path),
                "--hostfile",
                str(REPO / "tests" / "hostfiles" / "v100x8"),
                "--gpu",
                "a100",
                "--deepspeed-only",
                *(["--micro-batch", "4"] if unset else []),
            ]
        )
        assert code == 0, (path, capsys.readouterr())
    assert "error" not in capsys.readouterr().err


def test_check_config_exits_non_zero_on_errors(tmp_path, capsys):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps(portable(gradient_acumulation_steps=2)))
    assert main(["check-config", "--ds-config", str(bad), "--hostfile", "hostfiles/localhost", "--gpu", "cpu"]) == 2
    assert "did you mean 'gradient_accumulation_steps'" in capsys.readouterr().err
