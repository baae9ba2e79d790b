"""The runtime's one call of `deepspeed.initialize` (the benchmark's hand-written baseline makes its own).

Optimizer, scheduler, precision, clipping and ZeRO come from the resolved DeepSpeed config; the
engine owns gradient accumulation (it scales each micro-batch loss by 1/accumulation in
`backward` and applies the update at the window's boundary in `step`).
"""

from __future__ import annotations


def build_engine(model, ds_config: dict):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
    )
    return engine
