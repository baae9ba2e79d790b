"""Benchmarks and diagnostics, apart from the runtime: `bench`, `comms`, `audit` (verify-accumulation),
`gpu_check`, `plan_memory` and the sample-data generator, with what they share in `common`.

They use the runtime's public functions (`train.run.Run`, `train.loop.micro_step`, `train.model.build_model`
and `build_engine`, the config resolvers), so they measure and check the pipeline's own loop. The
runtime never imports this package: only the command line (`pipeline/cli/main.py`) does, lazily, for
the command being run (tests/test_layout.py).
"""
