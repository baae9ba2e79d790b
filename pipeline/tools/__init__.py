"""Benchmarks and diagnostics, apart from the runtime: `bench`, `comms`, `audit` (verify-accumulation),
`gpu_check`, `plan_memory` and the sample-data generator, with what they share in `common`.

They use the runtime's public functions (`train.micro_step`, `engine.build_engine`, `model.build_model`,
the config resolvers), so they measure and check the pipeline's own loop. The runtime never imports
this package: only `pipeline/__main__.py` does, lazily, for the command being run (tests/test_layout.py).
"""
