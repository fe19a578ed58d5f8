"""The outer loop's actions: one job each, called after every inner loop.

An action is an `engine.loop.Action`: `steps_to_boundary(step)` cuts the next
loop to end where the action is due, `before_loop(step)` runs before a loop,
and calling it with the `LoopRecord` acts. `engine.train` lists them in order:

  profiling.StepProfiler       `--profile_steps`: a trace of exactly those steps
  divergence.CheckDivergence   marks a loop after which training cannot go on
  summaries.Summaries          TensorBoard scalars and the console line
  divergence.StopOnDivergence  raises before any save, so a good checkpoint stays
  histograms.Histograms        `--histogram_every` (absent when 0)
  evaluation.Evaluation        eval after each epoch (BatchNorm statistics recomputed
                               first, `batch_norm_stats`); the final eval
  checkpointing.Checkpoints    `--checkpoint_every`, and a save on a stop signal

`preemption` turns SIGTERM/SIGINT into the stop flag the loop reads; `export`
writes the SavedModel once training ends.
"""
