"""The modes around the engine: benchmark, compare, predict, and the input benchmark.

Each is built on the engine's public API (`engine.train.train_and_evaluate`,
`engine.train_run.build_state`, ...), as a user's own script would be.
"""
