"""The GPU validation: one command on one free GPU, one line per check, one table and a JSON report.

    python -m pipeline.tools.gpu_check --report gpu-check.json    # one free GPU (CUDA_VISIBLE_DEVICES=N): under 8 minutes
    python -m pipeline.tools.gpu_check --device cpu --layers 2 --hidden 128 --seq 64 --precisions bf16 \
        --launch-config ds_configs/small_zero2.json    # CPU smoke of everything but CUDA (tests/test_gpu_check.py)

1. Rows: a RoBERTa-large-shaped classifier (24 layers, 1024 hidden, 16 heads:
   `models/roberta-wwm-ext-large-shape`, random init) at sequence length 512 trains through the
   pipeline's own `build_model`, `build_engine` and `train.micro_step`, one rank, for fp16 and bf16
   (bf16 only where the GPU has it natively) under ZeRO-2 and ZeRO-3, and once more with gradient
   checkpointing. Each row: samples/s (median step after warm-up), MFU against the GPU's dense 16-bit
   peak (`PEAKS`: PCIe and NVL cards are slower than SXM; goal >= 45% for bf16 on H100-class), peak
   allocated memory against `plan`'s estimate (goal within 15%), the fp16 loss scale, and whether the
   loss fell: on four repeated batches whose labels the tokens decide (`batches`), at a learning rate
   where a working step lowers the mean loss of the last pass to `FELL` of the first's and of chance's
   (ln 2) or less, and a step that changes nothing (a zero learning rate, gradients lost, every step
   skipped) cannot.
2. The fp16 loss scaler (ZeRO-2): a step whose loss `train.micro_step` poisons (multiplied by NaN, as
   the training's PIPELINE_TEST_NAN_AT_STEP hook does) must be skipped (DeepSpeed's skipped-step count
   rises by one, the weights stay bit-identical, the scale halves); the next steps train again. The
   scale halves on the first overflow only with `hysteresis: 1`, set here; DeepSpeed's default (2,
   kept by the shipped configs) spends the first overflow lowering the hysteresis instead
   (runtime/fp16/loss_scaler.py, `DynamicLossScaler.update_scale`).
3. The cluster path end to end, ZeRO-3: `./launch.sh` on this GPU with the shipped V100 fp16 ZeRO-3
   config (the doctor's GPU, driver, architecture, op-build and lock checks, the rank binding its
   device, training with a checkpoint at step `RESUME_AT`, the ZeRO-3 export gathered and verified),
   in an environment without this process's rank variables, on its own master port.
4. The resume of that run from its step-`RESUME_AT` checkpoint: the same losses again (within
   `RESUME_RTOL`: CUDA's attention backward is not bit-reproducible), exported and verified again.
5. `predict --device cuda` on that export at fp32, fp16 and (native only) bf16: the probabilities
   within `PREDICT_TOLERANCE` of fp32's, the same labels wherever fp32's top two are further apart.

Every command is printed before it runs; a JSON report (--report) holds the machine, the checks, the
commands and the rows, to paste into an issue. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..core.base import ConfigError, free_port
from ..core.ds_config import native_bf16
from ..core.options import PACKAGE_DIR
from .common import LABELS, REPO, standalone_rank

SHAPE = PACKAGE_DIR / "models" / "roberta-wwm-ext-large-shape"
# Dense fp16/bf16 tensor-core peaks by device name, most specific first: NVIDIA's datasheets (H100
# SXM 989 / PCIe 756 / NVL 835 TFLOPS; H200 SXM 989 / NVL 835; A100 SXM and PCIe 312; V100 SXM2
# 125, PCIe 112, V100S 130). Names as torch.cuda.get_device_name gives them, lowercased.
PEAKS = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),
    ("h200 nvl", 835e12),
    ("h200", 989e12),
    ("a100", 312e12),
    ("v100s", 130e12),
    ("v100-pcie", 112e12),
    ("v100", 125e12),
)
LAUNCH_CONFIG = "ds_configs/v100x8_fp16_zero3.json"
DISTINCT = 4  # batches in the repeated set
TOKENS_PER_LABEL = 16  # each label's own token ids: every record says its label many times over
LEARNING_RATE = 1e-4  # AdamW moves every weight by about this much per step, whatever the gradient's scale
FELL = 0.7  # the last pass's mean loss at most this fraction of the first's and of chance's ln 2 (0.49)
# This process is rank 0 of its own process group; ./launch.sh must start its ranks afresh.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_TIMEOUT_S = 240
LAUNCH_STEPS, RESUME_AT = 10, 5
RESUME_RTOL = 1e-2
PREDICT_TOLERANCE = {"fp16": 0.01, "bf16": 0.05}  # largest |probability - fp32's|
PREDICT_TEXTS = 64


class Checks:
    """The checks' lines and the commands, printed as they happen and kept for the report."""

    def __init__(self):
        self.checks, self.commands = [], []

    def check(self, name: str, ok: bool, detail: str) -> bool:
        print(f"{'ok    ' if ok else 'FAILED'}  {name}: {detail}", flush=True)
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        return ok

    def command(self, cmd: list[str], where: str = "") -> None:
        line = shlex.join(cmd) + (f"    # {where}" if where else "")
        print(f"$ {line}", flush=True)
        self.commands.append(line)

    @property
    def passed(self) -> bool:
        return all(c["ok"] for c in self.checks)


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


def ds_config(precision: str, stage: int, micro: int, lr: float = LEARNING_RATE) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01}},
        # hysteresis 1: the first overflow halves the scale (DeepSpeed's default 2 keeps it once)
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16, "hysteresis": 1},
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }


def batches(vocab: int, micro: int, seq: int, device, distinct: int = DISTINCT):
    """A few fixed batches of full-length records (no padding: the FLOP count assumes `seq` tokens per
    record), repeated. Half the records of each batch have each label, and a record's tokens are
    drawn from its label's own TOKENS_PER_LABEL ids: the labels are learnable from the input, so a
    model that trains lowers the loss on them well below ln 2, a constant guess's."""
    import torch

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(micro) % len(LABELS)
    fixed = [
        {
            "input_ids": (5 + labels[:, None] * TOKENS_PER_LABEL + torch.randint(0, TOKENS_PER_LABEL, (micro, seq), generator=g))
            .clamp(max=vocab - 1)
            .to(device),
            "attention_mask": torch.ones(micro, seq, dtype=torch.long, device=device),
            "labels": labels.to(device),
        }
        for _ in range(distinct)
    ]
    while True:
        yield from fixed


def loss_fell(losses: list[float]) -> bool:
    """The mean loss over the last pass of the repeated batches at most FELL of the first pass's and
    of a constant guess's (ln of the label count): a fall from an overconfident start back to chance,
    which a large random-init model shows after its first large updates, is no learning."""
    return statistics.mean(losses[-DISTINCT:]) <= FELL * min(statistics.mean(losses[:DISTINCT]), math.log(len(LABELS)))


def train_flops_per_sample(n_params: int, layers: int, hidden: int, seq: int) -> float:
    """Forward + backward = 3 x forward: 2 FLOPs per parameter per token, plus attention's two
    seq x seq matmuls (2 x 2 x seq^2 x hidden per layer) (Kaplan et al. 2020; Narayanan et al. 2021)."""
    return 3 * (2 * n_params * seq + 4 * layers * seq * seq * hidden)


def peak_flops(device_name: str) -> float | None:
    """The GPU's dense 16-bit peak (PEAKS), None for a GPU not listed."""
    name = device_name.lower()
    return next((peak for key, peak in PEAKS if key in name), None)


def planned_bytes(path: str, stage: int, micro: int, seq: int, recompute: bool) -> int:
    """`plan`'s per-GPU estimate for one rank: DeepSpeed's model-state estimate plus activations."""
    from ..cli.plan import activation_bytes, model_shape, model_state_bytes

    shape = model_shape(path)
    states, _ = model_state_bytes(shape, "zero2" if stage == 2 else "zero3", 1, 1)
    return states + activation_bytes(shape, micro, seq, recompute=recompute)


def free_gpu_memory() -> None:
    """What the last row's engine held, back to the driver: its tensors are freed once the reference
    cycles through the engine and its hooks are collected, and only then can empty_cache return them."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def run_config(args, path: str, precision: str, stage: int, recompute: bool = False) -> dict:
    import torch
    from transformers import AutoConfig

    from ..train.loop import micro_step
    from ..train.model import build_engine, build_model

    cuda = args.device == "cuda"
    if cuda:
        free_gpu_memory()
    ds = ds_config(precision, stage, args.micro, args.lr)
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
        "loss_fell": loss_fell(losses),
        "loss_scale": float(engine.optimizer.loss_scale) if precision == "fp16" else None,
    }
    if cuda:
        measured, planned = torch.cuda.max_memory_allocated(), planned_bytes(path, stage, args.micro, args.seq, recompute)
        result.update(
            peak_mem_gib=round(measured / 2**30, 2),
            plan_gib=round(planned / 2**30, 2),
            plan_within_15pct=abs(measured - planned) <= 0.15 * planned,
        )
    peak = peak_flops(torch.cuda.get_device_name(0)) if cuda else None
    flops = train_flops_per_sample(n_params, config.num_hidden_layers, config.hidden_size, args.seq) * args.micro / step
    result["tflops"] = round(flops / 1e12, 1)
    result["mfu"] = round(flops / peak, 3) if peak else None  # recomputation's extra forward is not counted
    if precision == "fp16" and stage == 2 and not recompute:
        result["loss_scaler"] = loss_scaler_check(engine, data)
    engine.destroy()
    return result


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


def row_checks(args, path: str, checks: Checks) -> list[dict]:
    """Every row (precision x stage, then gradient checkpointing), with its checks' lines."""
    results = []
    runs = [(precision, stage, False) for precision in args.precisions for stage in args.stages]
    runs += [(args.precisions[0], args.stages[0], True)]  # gradient checkpointing's saving
    for precision, stage, recompute in runs:
        result = run_config(args, path, precision, stage, recompute)
        results.append(result)
        first, last = result["loss_first_last"]
        name = f"{precision} ZeRO-{stage}{' recompute' if recompute else ''}: loss fell"
        checks.check(name, result["loss_fell"], f"{first} -> {last} (goal <= {FELL:g}x), {result['samples_per_s']} samples/s")
        if "loss_scaler" in result:
            scaler = result["loss_scaler"]
            detail = f"scale {scaler['scale_before']:g} -> {scaler['scale_after']:g}" + ("" if scaler["ok"] else f" {scaler}")
            checks.check("fp16 loss scaler skips an overflow and recovers", scaler["ok"], detail)
    return results


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


def launch_command(tmp: str, config: str, device: str, environ: dict[str, str], *extra: str) -> list[str]:
    """./launch.sh on one GPU of this machine (CPU ranks for a smoke test), on its own free port.

    With a hostfile DeepSpeed's launcher ignores CUDA_VISIBLE_DEVICES and gives local rank N GPU N
    (runner.py main: the variable is read only without a hostfile; launch.py sets it to the slots'
    ids): the GPU goes in as `--include localhost:N`, with slots up to N in the hostfile."""
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
        str(LAUNCH_STEPS),
        "--save-every",
        str(RESUME_AT),
        "--eval-every",
        str(RESUME_AT),
        "--log-every",
        "1",  # every step's loss in metrics.jsonl: the resume's are compared with these
        "--max-length",
        "128",
        *extra,
    ]


def run_launch(cmd: list[str], checks: Checks) -> tuple[int | None, str]:
    """(exit code, output) of a ./launch.sh command; exit code None when it ran out of time."""
    checks.command(cmd)
    try:
        done = subprocess.run(
            cmd, cwd=REPO, env=launch_env(dict(os.environ)), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        return None, f"no result within {LAUNCH_TIMEOUT_S} s: {str(e.stdout)[-1500:]}"
    return done.returncode, done.stdout + done.stderr


def launched(code: int | None, output: str, device: str) -> tuple[bool, str]:
    """Whether a launch trained on `device` to a verified export, and its line's detail."""
    bound = "device cuda:0" if device == "cuda" else "device cpu"
    ok = code == 0 and "export (verified)" in output and bound in output
    return ok, f"exit {code}" + ("" if ok else f"\n{output[-1500:]}")


def logged_losses(run_dir: Path) -> list[float]:
    """The per-optimizer-step training losses a run logged (metrics.jsonl rows without a split)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["loss"] for row in rows if "split" not in row]


def same_losses(before: list[float], after: list[float]) -> bool:
    return len(before) == len(after) and all(abs(a - b) <= RESUME_RTOL * abs(b) for a, b in zip(after, before))


def launch_checks(tmp: str, args, checks: Checks) -> Path | None:
    """./launch.sh to a verified export, then (unless --no-resume) the resume of that run; the last
    verified export, or None."""
    try:
        cmd = launch_command(tmp, args.launch_config, args.device, dict(os.environ))
    except ConfigError as e:
        checks.check(f"./launch.sh on this {args.device}", False, str(e))
        return None
    ok, detail = launched(*run_launch(cmd, checks), args.device)
    if not checks.check(f"./launch.sh {args.launch_config} on this {args.device}: trained, exported, verified", ok, detail):
        return None
    run_dir = Path(tmp, "runs", "gpu-check")
    if args.no_resume:
        return run_dir / "export"
    before, ckpt = logged_losses(run_dir), run_dir / "checkpoints" / f"step-{RESUME_AT}"
    again = launch_command(tmp, args.launch_config, args.device, dict(os.environ), "--resume", str(ckpt), "--no-doctor")
    code, output = run_launch(again, checks)
    ok, detail = launched(code, output, args.device)
    after = logged_losses(run_dir) if ok else []
    resumed = ok and f"resumed from {ckpt}" in output and same_losses(before, after)
    losses = f"; losses {[round(x, 4) for x in before[RESUME_AT:]]} then {[round(x, 4) for x in after[RESUME_AT:]]}"
    checks.check(
        f"resume from step {RESUME_AT}: the same losses (rtol {RESUME_RTOL:g}), exported, verified", resumed, detail + losses
    )
    return run_dir / "export" if resumed else None


def predict_precisions(device: str) -> list[str]:
    """fp32 first (the reference), then what the device runs: fp16 on a GPU, bf16 where native."""
    bf16 = device == "cpu" or native_bf16()
    return ["fp32", *(["fp16"] if device == "cuda" else []), *(["bf16"] if bf16 else [])]


def disagreement(reference: list[dict], other: list[dict], tolerance: float) -> tuple[float, int]:
    """(largest |probability difference|, labels that differ where the reference's top two
    probabilities are more than 2 x tolerance apart) between two predict runs on the same texts."""
    largest, flips = 0.0, 0
    for ref, row in zip(reference, other, strict=True):
        p, q = ref["probabilities"], row["probabilities"]
        largest = max(largest, *(abs(p[name] - q[name]) for name in p))
        top = sorted(p.values(), reverse=True)
        flips += ref["label"] != row["label"] and top[0] - top[1] > 2 * tolerance
    return largest, flips


def predict_check(export: Path, device: str, checks: Checks) -> None:
    """`predict` on the export at every precision the device runs (in this process: the command
    printed is what it equals), each against fp32."""
    from ..cli.predict import predict

    texts = [json.loads(line)["text"] for line in (PACKAGE_DIR / "sample_data" / "dev.jsonl").read_text().splitlines()]
    texts = texts[:PREDICT_TEXTS]
    rows = {}
    for precision in predict_precisions(device):
        cmd = ["python", "-m", "pipeline", "predict", "--model", str(export), "--device", device, "--precision", precision]
        checks.command(cmd, f"in this process, on the first {PREDICT_TEXTS} texts of sample_data/dev.jsonl")
        rows[precision] = predict(str(export), texts, device=device, precision=precision)
    for precision, got in list(rows.items())[1:]:
        largest, flips = disagreement(rows["fp32"], got, PREDICT_TOLERANCE[precision])
        ok = largest <= PREDICT_TOLERANCE[precision] and flips == 0
        detail = (
            f"largest probability difference {largest:.2g} (tolerance {PREDICT_TOLERANCE[precision]:g}), {flips} labels changed"
        )
        checks.check(f"predict --device {device} --precision {precision} agrees with fp32", ok, detail)


def machine(device: str) -> dict:
    """What the report says about where it ran."""
    import importlib.metadata

    import torch

    facts = {name: importlib.metadata.version(name) for name in ("torch", "deepspeed", "transformers")}
    facts.update(python=sys.version.split()[0], torch_cuda=torch.version.cuda, device=device)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        peak = peak_flops(props.name)
        facts.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            peak_16bit_tflops=peak / 1e12 if peak else None,
        )
    return facts


def write_report(path: str, args, checks: Checks, results: list[dict], seconds: float) -> None:
    """The JSON a person pastes into an issue: the machine, the arguments, every check, command and row."""
    report = {
        "passed": checks.passed,
        "seconds": round(seconds),
        "machine": machine(args.device),
        "arguments": {key: value for key, value in vars(args).items() if key != "report"},
        "checks": checks.checks,
        "commands": checks.commands,
        "rows": results,
    }
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {path}")


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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--precisions", nargs="+", help="rows' precisions (default: fp16, and bf16 where the GPU has it natively)")
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40, help=f"per row; at least {2 * DISTINCT}")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--lr", type=float, default=LEARNING_RATE, help="the rows' learning rate (default: %(default)s)")
    p.add_argument(
        "--launch-config", default=LAUNCH_CONFIG, help="DeepSpeed JSON of the ./launch.sh checks (default: %(default)s)"
    )
    p.add_argument("--no-launch", action="store_true", help="skip ./launch.sh, its resume and predict")
    p.add_argument("--no-resume", action="store_true", help="skip the resume of the ./launch.sh run")
    p.add_argument("--report", default="gpu-check-report.json", help="the JSON report (default: %(default)s)")
    args = p.parse_args(argv)
    if args.steps < 2 * DISTINCT or args.warmup >= args.steps:
        p.error(f"--steps must be at least {2 * DISTINCT} (two passes over the repeated batches) and more than --warmup")
    args.precisions = args.precisions or ["fp16", *(["bf16"] if args.device == "cuda" and native_bf16() else [])]
    return args


def main(argv=None) -> int:
    import tempfile
    import traceback

    from ..core import dist

    args = parse_args(argv)
    start, checks, results = time.perf_counter(), Checks(), []
    standalone_rank()
    dist.init(timeout_minutes=10)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            results = row_checks(args, model_dir(args, tmp), checks)
            if args.device == "cuda":
                free_gpu_memory()  # the last row's, before the launched rank needs the GPU
            export = None if args.no_launch else launch_checks(tmp, args, checks)
            if export:
                predict_check(export, args.device, checks)
        except Exception as e:  # the report still says how far it came
            traceback.print_exc()
            checks.check("gpu_check ran to its end", False, f"{type(e).__name__}: {e}")
    print(table(results))
    write_report(args.report, args, checks, results, time.perf_counter() - start)
    print(f"{'all checks passed' if checks.passed else 'FAILED'} in {time.perf_counter() - start:.0f} s")
    return 0 if checks.passed else 1


if __name__ == "__main__":
    sys.exit(main())
