"""The DeepSpeed JSON resolved for a world size, the hardware and the run (pipeline/ds_config.py)."""

from pathlib import Path

import pytest
from helpers import in_ci

from pipeline.core.base import ConfigError, load_json
from pipeline.core.ds_config import Hardware, fill_schedule, resolve_batch, resolve_ds_config, resolve_precision
from pipeline.core.options import TrainConfig

CPU = Hardware("cpu", fp16=False, bf16=True, name="CPU")
V100 = Hardware("cuda", fp16=True, bf16=False, name="Tesla V100-SXM2-16GB")
A100 = Hardware("cuda", fp16=True, bf16=True, name="A100")
REPO = Path(__file__).resolve().parent.parent
WILD = REPO / "tests" / "wild_ds_configs"  # real-world configs as stored upstream (SOURCES.md: repo, path, commit)
AUTO = TrainConfig()  # precision auto, no global/micro batch options, no lr scaling


def wild_configs() -> list[Path]:
    """Every real-world config SOURCES.md lists (tests/wild_ds_configs, a copy of the shared folder
    NOTES.md describes: nineteen), each present. A checkout without it skips, and fails under CI."""
    if not WILD.is_dir():
        message = f"{WILD} is not next to this checkout (the real-world DeepSpeed configs)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    sources = (WILD / "SOURCES.md").read_text(encoding="utf-8")
    listed = sorted(line.split("`")[1] for line in sources.splitlines() if line.startswith("- `"))
    paths = sorted(WILD.glob("*.json"))
    assert len(listed) >= 19 and [p.name for p in paths] == listed, (
        f"{WILD}: {len(paths)} configs, SOURCES.md lists {len(listed)}"
    )
    return paths


def base(**kw) -> dict:
    return {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "zero_optimization": {"stage": 2}, **kw}


@pytest.mark.parametrize(
    "given, world, expected",
    [
        ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8}, 8, (256, 4, 8)),
        ({"train_batch_size": 256, "train_micro_batch_size_per_gpu": 4}, 8, (256, 4, 8)),
        ({"train_batch_size": 256, "gradient_accumulation_steps": 8}, 8, (256, 4, 8)),
        ({"train_batch_size": 256, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}, 8, (256, 8, 4)),
        ({"train_batch_size": 256, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": "auto"}, 2, (256, 8, 16)),
        ({"train_micro_batch_size_per_gpu": 16}, 1, (16, 16, 1)),
    ],
)
def test_batch_triple_resolves_against_world_size(given, world, expected):
    assert resolve_batch("cfg.json", given, world) == expected


def test_inconsistent_batch_names_all_three_numbers_and_world_size():
    ds = {"train_batch_size": 256, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4}
    with pytest.raises(ConfigError) as e:
        resolve_batch("cfg.json", ds, 8)
    message = str(e.value)
    for text in (
        "cfg.json",
        "train_batch_size (256)",
        "train_micro_batch_size_per_gpu (4)",
        "gradient_accumulation_steps (4)",
        "world size (8)",
        "= 128",
    ):
        assert text in message


def test_indivisible_and_missing_batch_sizes_are_errors():
    with pytest.raises(ConfigError) as e:
        resolve_batch("c.json", {"train_batch_size": 100, "train_micro_batch_size_per_gpu": 8}, 2)
    assert "nearest valid: train_batch_size 96 (6 x 8 x 2) or train_batch_size 112 (7 x 8 x 2)" in str(e.value)
    assert "keep 100 with train_micro_batch_size_per_gpu 2 or 5 or 10" in str(e.value)
    with pytest.raises(ConfigError, match="set train_micro_batch_size_per_gpu"):
        resolve_batch("c.json", {"gradient_accumulation_steps": 2}, 2)
    with pytest.raises(ConfigError, match="positive integer"):
        resolve_batch("c.json", {"train_micro_batch_size_per_gpu": 0}, 2)


def test_unknown_top_level_key_suggests_the_right_one():
    ds = base(train_micro_batch_size_per_gpu=4, gradient_acumulation_steps=2)
    with pytest.raises(
        ConfigError, match=r"cfg\.json: unknown key 'gradient_acumulation_steps' \(did you mean 'gradient_accumulation_steps'\?\)"
    ):
        resolve_ds_config("cfg.json", ds, 2, CPU, AUTO)


def test_stage_zero_and_an_optimizer_without_type_are_refused():
    with pytest.raises(ConfigError, match="zero_optimization.stage must be 1, 2 or 3"):
        resolve_ds_config("c.json", base(train_micro_batch_size_per_gpu=4, zero_optimization={"stage": 0}), 1, CPU, AUTO)
    with pytest.raises(ConfigError, match="'optimizer' with a 'type'"):
        resolve_ds_config("c.json", base(train_micro_batch_size_per_gpu=4, optimizer={"params": {"lr": 1e-3}}), 1, CPU, AUTO)
    # No optimizer at all: HF Trainer's AdamW, as its DeepSpeed integration does.
    ds = resolve_ds_config("c.json", {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}, 1, CPU, AUTO).ds
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8}}


@pytest.mark.parametrize(
    "ds, requested, hw, expected",
    [
        ({"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}, "auto", CPU, "fp32"),
        ({"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}, "auto", V100, "fp16"),
        ({"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}, "auto", A100, "bf16"),
        ({"fp16": {"enabled": True}}, "auto", V100, "fp16"),
        ({"bf16": {"enabled": True}}, "auto", CPU, "bf16"),
        ({"fp16": {"enabled": "auto"}}, "bf16", CPU, "bf16"),
        ({}, "auto", A100, "fp32"),
        ({"fp16": {"enabled": True}}, "fp32", CPU, "fp32"),
    ],
)
def test_precision_is_resolved_per_hardware(ds, requested, hw, expected):
    assert resolve_precision("c.json", ds, requested, hw) == expected


@pytest.mark.parametrize(
    "ds, requested, hw, message",
    [
        ({"fp16": {"enabled": True}}, "auto", CPU, "fp16 requested but CPU cannot run it"),
        ({"bf16": {"enabled": True}}, "auto", V100, "V100-SXM2-16GB has no bf16"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "auto", A100, "both true"),
        ({"fp16": {"enabled": True}}, "bf16", A100, "contradicts fp16.enabled=true"),
    ],
)
def test_precision_that_cannot_run_is_refused_not_swapped(ds, requested, hw, message):
    with pytest.raises(ConfigError, match=message):
        resolve_precision("c.json", ds, requested, hw)


def test_resolved_config_fills_batch_precision_and_schedule():
    ds = base(
        train_micro_batch_size_per_gpu=4,
        gradient_accumulation_steps=2,
        fp16={"enabled": "auto", "loss_scale": 0},
        scheduler={"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto"}},
    )
    resolved = resolve_ds_config("c.json", ds, 2, V100, AUTO).ds
    assert resolved["train_batch_size"] == 16 and resolved["fp16"] == {"enabled": True, "loss_scale": 0}
    assert resolved["bf16"] == {"enabled": False}
    filled = fill_schedule("c.json", resolved, total_steps=95, warmup=10)
    assert filled["scheduler"]["params"] == {"warmup_num_steps": 10, "total_num_steps": 95, "warmup_max_lr": 1e-4}
    assert ds["fp16"]["enabled"] == "auto"  # the user's dict is not modified
    with pytest.raises(ConfigError, match="shorter than the run"):
        fill_schedule("c.json", {"scheduler": {"params": {"total_num_steps": 10}}}, 95, 0.1)


def test_auto_values_no_flag_fills_are_refused():
    ds = base(train_micro_batch_size_per_gpu=4)
    ds["optimizer"]["params"]["amsgrad"] = "auto"
    with pytest.raises(ConfigError, match='optimizer.params.amsgrad is "auto"'):
        resolve_ds_config("c.json", ds, 1, CPU, AUTO)


SHIPPED = REPO / "ds_configs" / "small_zero2.json"


def test_hf_flags_fill_the_auto_values_of_the_shipped_config():
    from helpers import HF_FLAGS

    flags = dict(HF_FLAGS, warmup_steps=7, micro_batch=2)
    resolved = resolve_ds_config(str(SHIPPED), load_json(SHIPPED), 2, CPU, TrainConfig(**flags))
    ds = resolved.ds
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.05}}
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 2, 8)
    assert ds["scheduler"]["type"] == "WarmupCosineLR" and ds["scheduler"]["params"]["warmup_type"] == "linear"
    run = resolved.for_run(TrainConfig(**flags), 2, __import__("pipeline.core.ds_config").core.ds_config.RunShape(160, "/r"))
    assert run.ds["scheduler"]["params"]["warmup_num_steps"] == 7 and run.ds["scheduler"]["params"]["total_num_steps"] == 10
    assert any("lr 0.0003 (--learning-rate)" in note for note in resolved.notes), resolved.notes


def test_unset_flags_give_the_defaults_and_the_default_learning_rate_follows_the_model(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    ds = resolve_ds_config(str(SHIPPED), load_json(SHIPPED), 2, CPU, AUTO).ds
    assert ds["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    assert ds["scheduler"] == {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_min_lr": 0,
            "warmup_max_lr": 1e-3,
            "warmup_num_steps": "auto",
            "total_num_steps": "auto",
            "warmup_type": "linear",
        },
    }
    assert ds["gradient_clipping"] == 1.0
    # A model directory with pretrained weights: HF Trainer's fine-tuning default.
    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    pretrained = resolve_ds_config(str(SHIPPED), load_json(SHIPPED), 2, CPU, TrainConfig(model=str(tmp_path))).ds
    assert pretrained["optimizer"]["params"]["lr"] == 5e-5 and pretrained["scheduler"]["params"]["warmup_max_lr"] == 5e-5


@pytest.mark.parametrize(
    "json_values, flags, message",
    [
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}},
            {"learning_rate": 2e-5},
            r"optimizer.params.lr=0.001 contradicts --learning-rate 2e-05",
        ),
        ({"gradient_clipping": 1.0}, {"max_grad_norm": 0.5}, r"gradient_clipping=1.0 contradicts --max-grad-norm 0.5"),
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999]}}},
            {"adam_beta2": 0.98},
            r"betas=\[0.9, 0.999\] contradicts --adam-beta2 0.98",
        ),
        (
            {"gradient_accumulation_steps": 2},
            {"gradient_accumulation_steps": 4},
            r"gradient_accumulation_steps=2 contradicts --gradient-accumulation-steps 4",
        ),
        (
            {"scheduler": {"type": "WarmupLR", "params": {}}},
            {"lr_scheduler_type": "linear"},
            r"scheduler.type='WarmupLR' contradicts --lr-scheduler-type linear",
        ),
        (
            {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 100}}},
            {"warmup_ratio": 0.2},
            r"warmup_num_steps=100 contradicts --warmup-ratio 0.2",
        ),
    ],
)
def test_a_flag_that_contradicts_a_number_in_the_json_is_refused_naming_both(json_values, flags, message):
    ds = {**base(train_micro_batch_size_per_gpu=4), **json_values}
    with pytest.raises(ConfigError, match=message):
        resolve_ds_config("c.json", ds, 2, CPU, TrainConfig(**flags))


def test_an_optimizer_peak_the_scheduler_overrides_is_refused():
    ds = base(
        train_micro_batch_size_per_gpu=4,
        optimizer={"type": "AdamW", "params": {"lr": 2e-5}},
        scheduler={"type": "WarmupDecayLR", "params": {"warmup_max_lr": 1e-3, "total_num_steps": "auto"}},
    )
    with pytest.raises(ConfigError, match=r"warmup_max_lr=0.001 overrides optimizer.params.lr=2e-05 .*the peak would be 0.001"):
        resolve_ds_config("c.json", ds, 2, CPU, AUTO)


def test_shipped_configs_resolve_on_their_target(tmp_path):
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        raw = load_json(path)
        world, hw = (2, CPU) if path.name.startswith("small") else (8, V100)
        resolved = resolve_ds_config(str(path), raw, world, hw, AUTO).ds
        if not path.name.startswith("small"):
            assert resolved["train_batch_size"] == 256, path
            assert resolved["fp16"]["enabled"], path


def test_real_world_configs_have_no_false_unknown_keys():
    from pipeline.core.ds_schema import validate

    for path in wild_configs():
        assert validate(str(path), load_json(path))[0] == [], path


def test_the_final_config_is_resolved_in_one_call_with_the_runs_shape():
    """Data size, run directory and a resumed checkpoint finish the dict: schedule, profiler, batch, universal load."""
    from pipeline.core.ds_config import RunShape

    raw = {
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 2},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_max_lr": 1e-3, "warmup_num_steps": "auto", "total_num_steps": "auto"},
        },
    }
    cfg = TrainConfig(epochs=2, flops_profiler_step=3)
    cpu = Hardware.named("cpu")
    fresh = resolve_ds_config("c.json", raw, 2, cpu, cfg).for_run(cfg, 2, RunShape(100, "/runs/r"))
    assert (fresh.steps_per_epoch, fresh.total_steps) == (6, 12)
    assert fresh.ds["scheduler"]["params"]["total_num_steps"] == 12 and fresh.ds["scheduler"]["params"]["warmup_num_steps"] == 2
    assert fresh.ds["flops_profiler"]["output_file"] == "/runs/r/flops_profile.txt" and "checkpoint" not in fresh.ds
    # The same checkpoint resumed on 4 ranks: global batch 16 kept, accumulation re-derived, universal load.
    moved = resolve_ds_config("c.json", raw, 4, cpu, cfg).for_run(cfg, 4, RunShape(100, "/runs/r", "ckpt/step-6", 2, 16))
    assert (moved.ds["train_batch_size"], moved.ds["gradient_accumulation_steps"]) == (16, 1)
    assert moved.ds["checkpoint"]["load_universal"] and "resuming a 2-rank checkpoint on 4 ranks" in moved.warnings[-1]
    with pytest.raises(ConfigError, match="ckpt/step-6: trained with a global batch of 32, but this config gives 16"):
        resolve_ds_config("c.json", raw, 2, cpu, cfg).for_run(cfg, 2, RunShape(100, "/runs/r", "ckpt/step-6", 2, 32))
    with pytest.raises(ConfigError, match="10 records, fewer than one global batch"):
        resolve_ds_config("c.json", raw, 2, cpu, cfg).for_run(cfg, 2, RunShape(10, "/runs/r"))
