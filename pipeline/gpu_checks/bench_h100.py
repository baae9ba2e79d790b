"""Throughput, MFU, memory and the fp16 loss scaler on one GPU (prepared for an H100; not yet run).

    python -m pipeline.gpu_checks.bench_h100 [--steps 20] [--micro 8]     # about 3-5 minutes on one H100
    python -m pipeline.gpu_checks.bench_h100 --device cpu --layers 2 --hidden 128 --seq 64 --precisions bf16   # CPU smoke

A BERT-large-shaped classifier (24 layers, 1024 hidden, 16 heads, the shape in
`pipeline/models/roberta-wwm-ext-large-shape`, random init) at sequence length 512 trains through the
pipeline's engine (`build_model`, `build_engine`, `engine.backward`/`engine.step`) on random tokens,
for fp16 and bf16 under ZeRO-2 and ZeRO-3, one rank. For each it prints samples/s (median step after
warm-up), model FLOPs utilisation against the GPU's dense 16-bit peak, and peak allocated memory.

Then the fp16 loss-scaler check (ZeRO-2): one step whose loss is multiplied by inf must be skipped
(DeepSpeed's skipped-step count rises by one, the weights stay bit-identical, the loss scale halves),
and the following steps must train again (weights change, finite loss, no further skips). Exits 1
when that check fails.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from ..config import PACKAGE_DIR

SHAPE = PACKAGE_DIR / "models" / "roberta-wwm-ext-large-shape"
PEAK_16BIT_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense fp16/bf16 tensor-core peak (SXM)


def model_dir(args, tmp: str) -> str:
    """The BERT-large shape, or a smaller one for a CPU smoke, as a config-only model directory."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(SHAPE, num_hidden_layers=args.layers, hidden_size=args.hidden,
                                        intermediate_size=4 * args.hidden, num_attention_heads=max(args.hidden // 64, 1))
    config.save_pretrained(tmp)
    return tmp


def ds_config(precision: str, stage: int, micro: int) -> dict:
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "train_batch_size": micro,
            "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 2e-5, "weight_decay": 0.01}},
            "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16}, "bf16": {"enabled": precision == "bf16"},
            "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}


def batches(vocab: int, micro: int, seq: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    while True:
        yield {"input_ids": torch.randint(5, vocab, (micro, seq), generator=g).to(device),
               "attention_mask": torch.ones(micro, seq, dtype=torch.long, device=device),
               "labels": torch.randint(0, 2, (micro,), generator=g).to(device)}


def train_flops_per_sample(n_params: int, layers: int, hidden: int, seq: int) -> float:
    """Forward + backward = 3 x forward: 2 FLOPs per parameter per token, plus attention's two
    seq x seq matmuls (2 x 2 x seq^2 x hidden per layer) (Kaplan et al. 2020; Narayanan et al. 2021)."""
    return 3 * (2 * n_params * seq + 4 * layers * seq * seq * hidden)


def run_config(args, path: str, precision: str, stage: int) -> dict:
    import torch
    from transformers import AutoConfig

    from ..engine import build_engine
    from ..model import build_model

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ds = ds_config(precision, stage, args.micro)
    config = AutoConfig.from_pretrained(path)
    model = build_model(path, ["a", "b"], config.vocab_size, ds, seed=0)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine = build_engine(model, ds)
    data = batches(config.vocab_size, args.micro, args.seq, engine.device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.backward(engine(**next(data)).loss)
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[args.warmup:])
    result = {"precision": precision, "zero": stage, "params_m": round(n_params / 1e6, 1), "micro": args.micro, "seq": args.seq,
              "samples_per_s": round(args.micro / step, 2),
              "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    peak = next((v for k, v in PEAK_16BIT_FLOPS.items() if cuda and k in torch.cuda.get_device_name(0)), None)
    flops = train_flops_per_sample(n_params, config.num_hidden_layers, config.hidden_size, args.seq) * args.micro / step
    result["tflops"] = round(flops / 1e12, 1)
    result["mfu"] = round(flops / peak, 3) if peak else None
    if precision == "fp16" and stage == 2:
        result["loss_scaler"] = loss_scaler_check(engine, data)
    engine.destroy()
    return result


def loss_scaler_check(engine, data) -> dict:
    """An overflowing step is skipped (weights unchanged, scale halved); training then goes on."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    watched = [p for p in engine.module.parameters()][-2]  # the classifier's weight
    weights = lambda: safe_get_full_fp32_param(watched).clone()
    before, skipped, scale = weights(), engine.skipped_steps, engine.optimizer.loss_scale
    engine.backward(engine(**next(data)).loss * float("inf"))
    engine.step()
    after_overflow = weights()
    check = {"skipped_step": engine.skipped_steps == skipped + 1, "weights_unchanged": torch.equal(before, after_overflow),
             "scale_halved": engine.optimizer.loss_scale == scale / 2, "scale_before": scale,
             "scale_after": engine.optimizer.loss_scale}
    losses = []
    for _ in range(3):
        loss = engine(**next(data)).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    check["recovered"] = (engine.skipped_steps == skipped + 1 and not torch.equal(after_overflow, weights())
                          and all(map(lambda x: x == x and abs(x) != float("inf"), losses)))
    check["ok"] = all(check[k] for k in ("skipped_step", "weights_unchanged", "scale_halved", "recovered"))
    return check


def main(argv=None) -> int:
    import tempfile

    from .. import dist
    from ..audit import standalone_rank

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--precisions", nargs="+", default=["fp16", "bf16"])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    standalone_rank()
    dist.init(timeout_minutes=10)
    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(args, tmp)
        for precision in args.precisions:
            for stage in args.stages:
                result = run_config(args, path, precision, stage)
                checks += [result["loss_scaler"]["ok"]] if "loss_scaler" in result else []
                print(json.dumps(result), flush=True)
    print("fp16 loss scaler: " + ("not checked (needs fp16 with ZeRO-2)" if not checks else
                                  "skips the overflowing step and recovers" if all(checks) else "FAILED"))
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
