"""The GPU validation: one command, one line per check, then one table (prepared; not yet run on a GPU).

    python -m pipeline.tools.gpu_check                 # on a node with one free GPU: under 8 minutes
    python -m pipeline.tools.gpu_check --device cpu --layers 2 --hidden 128 --seq 64 --precisions bf16 \
        --launch-config ds_configs/small_zero2.json    # CPU smoke of everything but CUDA (tests/test_gpu_check.py)

1. A RoBERTa-large-shaped classifier (24 layers, 1024 hidden, 16 heads: `models/roberta-wwm-ext-large-shape`,
   random init) at sequence length 512 trains through the pipeline's own `build_model`, `build_engine`
   and `train.micro_step`, one rank, for fp16 and bf16 under ZeRO-2 and ZeRO-3, and fp16 ZeRO-2 again
   with gradient checkpointing. Each row: samples/s (median step after warm-up), MFU against the GPU's
   dense 16-bit peak (goal >= 45% for bf16 on H100-class), peak allocated memory against `plan`'s
   estimate (goal within 15%), whether the loss fell on a small repeated set (the mean over its four
   batches, first pass against last), the fp16 loss scale. bf16 rows only where the GPU has bf16.
2. The fp16 loss scaler (ZeRO-2): a step whose loss `train.micro_step` poisons (multiplied by NaN, as
   the training's PIPELINE_TEST_NAN_AT_STEP hook does) must be skipped (DeepSpeed's skipped-step count
   rises by one, the weights stay bit-identical, the scale halves); the next steps train again. The
   scale halves on the first overflow only with `hysteresis: 1`, set here; DeepSpeed's default (2,
   kept by the shipped configs) spends the first overflow lowering the hysteresis instead
   (runtime/fp16/loss_scaler.py, `DynamicLossScaler.update_scale`).
3. The cluster path end to end: `./launch.sh` on this GPU with the shipped V100 fp16 ZeRO-2 config
   (the doctor's GPU, driver, architecture and op-build checks, each rank binding its device,
   training, the verified export), in an environment without this process's rank variables and
   with its own master port.
Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from ..core.base import ConfigError, free_port
from ..core.ds_config import native_bf16
from ..core.options import PACKAGE_DIR
from .common import LABELS, REPO, standalone_rank

SHAPE = PACKAGE_DIR / "models" / "roberta-wwm-ext-large-shape"
PEAK_16BIT_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense fp16/bf16 tensor-core peak (SXM)
V100_CONFIG = "ds_configs/v100x8_fp16_zero2.json"
DISTINCT = 4  # batches in the repeated set
# This process is rank 0 of its own process group; ./launch.sh must start its ranks afresh.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_TIMEOUT_S = 240


def model_dir(args, tmp: str) -> str:
    """The BERT-large shape, or a smaller one for a CPU smoke, as a config-only model directory."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        SHAPE,
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_attention_heads=max(args.hidden // 64, 1),
    )
    config.save_pretrained(tmp)
    return tmp


def ds_config(precision: str, stage: int, micro: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-5, "weight_decay": 0.01}},
        # hysteresis 1: the first overflow halves the scale (DeepSpeed's default 2 keeps it once)
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16, "hysteresis": 1},
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }


def batches(vocab: int, micro: int, seq: int, device, distinct: int = DISTINCT):
    """A few fixed random batches of full-length records (no padding: the FLOP count assumes `seq`
    tokens per record), repeated: a model that trains must lower the loss on them."""
    import torch

    g = torch.Generator().manual_seed(0)
    fixed = [
        {
            "input_ids": torch.randint(5, vocab, (micro, seq), generator=g).to(device),
            "attention_mask": torch.ones(micro, seq, dtype=torch.long, device=device),
            "labels": torch.randint(0, len(LABELS), (micro,), generator=g).to(device),
        }
        for _ in range(distinct)
    ]
    while True:
        yield from fixed


def train_flops_per_sample(n_params: int, layers: int, hidden: int, seq: int) -> float:
    """Forward + backward = 3 x forward: 2 FLOPs per parameter per token, plus attention's two
    seq x seq matmuls (2 x 2 x seq^2 x hidden per layer) (Kaplan et al. 2020; Narayanan et al. 2021)."""
    return 3 * (2 * n_params * seq + 4 * layers * seq * seq * hidden)


def planned_bytes(path: str, stage: int, micro: int, seq: int, recompute: bool) -> int:
    """`plan`'s per-GPU estimate for one rank: DeepSpeed's model-state estimate plus activations."""
    from ..cli.plan import activation_bytes, model_shape, model_state_bytes

    shape = model_shape(path)
    states, _ = model_state_bytes(shape, "zero2" if stage == 2 else "zero3", 1, 1)
    return states + activation_bytes(shape, micro, seq, recompute=recompute)


def run_config(args, path: str, precision: str, stage: int, recompute: bool = False) -> dict:
    import torch
    from transformers import AutoConfig

    from ..train.loop import micro_step
    from ..train.model import build_engine, build_model

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ds = ds_config(precision, stage, args.micro)
    config = AutoConfig.from_pretrained(path)
    model = build_model(path, LABELS, config.vocab_size, ds, seed=0, gradient_checkpointing=recompute)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine = build_engine(model, ds)
    data = batches(config.vocab_size, args.micro, args.seq, engine.device)
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss, _ = micro_step(engine, next(data))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    step = statistics.median(times[args.warmup :])
    result = {
        "precision": precision,
        "zero": stage,
        "recompute": recompute,
        "params_m": round(n_params / 1e6, 1),
        "micro": args.micro,
        "seq": args.seq,
        "samples_per_s": round(args.micro / step, 2),
        # The first and the last pass over the same DISTINCT batches: the same records, not one batch
        # against four others.
        "loss_first_last": [round(statistics.mean(losses[:DISTINCT]), 3), round(statistics.mean(losses[-DISTINCT:]), 3)],
        "loss_fell": statistics.mean(losses[-DISTINCT:]) < statistics.mean(losses[:DISTINCT]),
        "loss_scale": float(engine.optimizer.loss_scale) if precision == "fp16" else None,
    }
    if cuda:
        measured, planned = torch.cuda.max_memory_allocated(), planned_bytes(path, stage, args.micro, args.seq, recompute)
        result.update(
            peak_mem_gib=round(measured / 2**30, 2),
            plan_gib=round(planned / 2**30, 2),
            plan_within_15pct=abs(measured - planned) <= 0.15 * planned,
        )
    peak = next((v for k, v in PEAK_16BIT_FLOPS.items() if cuda and k in torch.cuda.get_device_name(0)), None)
    flops = train_flops_per_sample(n_params, config.num_hidden_layers, config.hidden_size, args.seq) * args.micro / step
    result["tflops"] = round(flops / 1e12, 1)
    result["mfu"] = round(flops / peak, 3) if peak else None  # recomputation's extra forward is not counted
    if precision == "fp16" and stage == 2 and not recompute:
        result["loss_scaler"] = loss_scaler_check(engine, data)
    engine.destroy()
    return result


def launch_env(environ: dict[str, str]) -> dict[str, str]:
    """This environment without the rank variables `standalone_rank` set for this process (./launch.sh
    would read MASTER_PORT as its default and find the port taken by this process's own store), and
    without CUDA_VISIBLE_DEVICES: the launch names its GPU with --include instead (`launch_command`)."""
    return {key: value for key, value in environ.items() if key not in (*RANK_VARIABLES, "CUDA_VISIBLE_DEVICES")}


def launch_gpu(environ: dict[str, str]) -> int:
    """The GPU the launch step uses: this process's own cuda:0, the first CUDA_VISIBLE_DEVICES names."""
    first = environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or "0"
    if not first.isdigit():
        raise ConfigError(
            f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']}: the launch step passes its GPU to DeepSpeed's "
            "launcher as an index (--include localhost:N); name the GPU by its index, not its UUID or MIG name"
        )
    return int(first)


def launch_command(tmp: str, config: str, device: str, environ: dict[str, str]) -> list[str]:
    """./launch.sh on one GPU of this machine (CPU ranks for a smoke test), on its own free port.

    With a hostfile DeepSpeed's launcher ignores CUDA_VISIBLE_DEVICES and gives local rank N GPU N
    (runner.py main: the variable is read only without a hostfile; launch.py sets it to the slots'
    ids): the GPU goes in as `--include localhost:N`, with slots up to N in the hostfile."""
    from pathlib import Path

    gpu = launch_gpu(environ) if device == "cuda" else 0
    hostfile = Path(tmp, "one-gpu")
    hostfile.write_text(f"localhost slots={gpu + 1}\n")
    return [
        str(REPO / "launch.sh"),
        "--hostfile",
        str(hostfile),
        *(["--include", f"localhost:{gpu}"] if device == "cuda" else []),
        "--accelerator",
        device,
        "--master-port",
        str(free_port()),
        "--ds-config",
        config,
        "--output-dir",
        str(Path(tmp, "runs")),
        "--run-name",
        "gpu-check",
        "--max-steps",
        "10",
        "--eval-every",
        "5",
        "--max-length",
        "128",
    ]


def launch_check(tmp: str, config: str, device: str) -> dict:
    """./launch.sh with `config` on this machine's first GPU (or CPU): doctor, device binding, export."""
    import os
    import subprocess

    try:
        cmd = launch_command(tmp, config, device, dict(os.environ))
    except ConfigError as e:
        return {"exit_code": None, "ok": False, "tail": str(e)}
    try:
        done = subprocess.run(
            cmd, cwd=REPO, env=launch_env(dict(os.environ)), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        return {"exit_code": None, "ok": False, "tail": f"no result within {LAUNCH_TIMEOUT_S} s: {str(e.stdout)[-1500:]}"}
    output = done.stdout + done.stderr
    bound = "device cuda:0" if device == "cuda" else "device cpu"
    return {
        "exit_code": done.returncode,
        "ok": done.returncode == 0 and "export (verified)" in output and bound in output,
        "tail": output[-1500:] if done.returncode else output[-300:],
    }


def loss_scaler_check(engine, data) -> dict:
    """An overflowing step is skipped (weights unchanged, scale halved); training then goes on."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    from ..train.loop import micro_step

    watched = [p for p in engine.module.parameters()][-2]  # the classifier's weight

    def weights():
        return safe_get_full_fp32_param(watched).clone()

    before, skipped, scale = weights(), engine.skipped_steps, engine.optimizer.loss_scale
    micro_step(engine, next(data), poison=True)
    after_overflow = weights()
    check = {
        "skipped_step": engine.skipped_steps == skipped + 1,
        "weights_unchanged": torch.equal(before, after_overflow),
        "scale_halved": engine.optimizer.loss_scale == scale / 2,
        "scale_before": scale,
        "scale_after": engine.optimizer.loss_scale,
    }
    losses = []
    for _ in range(3):
        losses.append(float(micro_step(engine, next(data))[0]))
    check["recovered"] = (
        engine.skipped_steps == skipped + 1
        and not torch.equal(after_overflow, weights())
        and all(map(lambda x: x == x and abs(x) != float("inf"), losses))
    )
    check["ok"] = all(check[k] for k in ("skipped_step", "weights_unchanged", "scale_halved", "recovered"))
    return check


def table(results: list[dict]) -> str:
    """The rows as one markdown table, for docs/gpu-clusters.md."""
    columns = [
        "precision",
        "zero",
        "recompute",
        "samples_per_s",
        "tflops",
        "mfu",
        "peak_mem_gib",
        "plan_gib",
        "plan_within_15pct",
        "loss_first_last",
        "loss_fell",
        "loss_scale",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c)) for c in columns) + " |" for r in results]
    return "\n".join(lines)


def report(name: str, ok: bool, detail: str) -> bool:
    """One line per check, printed as it finishes."""
    print(f"{'ok    ' if ok else 'FAILED'}  {name}: {detail}", flush=True)
    return ok


def main(argv=None) -> int:
    import tempfile

    from ..core import dist

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--precisions", nargs="+", help="default: fp16, and bf16 where the GPU has it")
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--steps", type=int, default=16, help=f"per row; at least {2 * DISTINCT}")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--launch-config", default=V100_CONFIG, help="DeepSpeed JSON of the ./launch.sh check (default: %(default)s)")
    p.add_argument("--no-launch", action="store_true", help="skip the ./launch.sh end-to-end check")
    args = p.parse_args(argv)
    if args.steps < 2 * DISTINCT or args.warmup >= args.steps:
        p.error(f"--steps must be at least {2 * DISTINCT} (two passes over the repeated batches) and more than --warmup")
    cuda = args.device == "cuda"
    args.precisions = args.precisions or ["fp16", *(["bf16"] if cuda and native_bf16() else [])]
    standalone_rank()
    dist.init(timeout_minutes=10)
    results, passed = [], True
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(args, tmp)
        runs = [(precision, stage, False) for precision in args.precisions for stage in args.stages]
        runs += [(args.precisions[0], args.stages[0], True)]  # gradient checkpointing's saving
        for precision, stage, recompute in runs:
            result = run_config(args, path, precision, stage, recompute)
            results.append(result)
            first, last = result["loss_first_last"]
            name = f"{precision} ZeRO-{stage}{' recompute' if recompute else ''}: loss fell"
            passed &= report(name, result["loss_fell"], f"{first} -> {last}, {result['samples_per_s']} samples/s")
            if "loss_scaler" in result:
                scaler = result["loss_scaler"]
                detail = f"scale {scaler['scale_before']:g} -> {scaler['scale_after']:g}" + ("" if scaler["ok"] else f" {scaler}")
                passed &= report("fp16 loss scaler skips an overflow and recovers", scaler["ok"], detail)
        if not args.no_launch:
            launched = launch_check(tmp, args.launch_config, args.device)
            detail = f"exit {launched['exit_code']}" + ("" if launched["ok"] else f"\n{launched['tail']}")
            passed &= report(
                f"./launch.sh {args.launch_config} on this {args.device}: trained, exported, verified", launched["ok"], detail
            )
    print(table(results))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
