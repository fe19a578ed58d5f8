"""The checkpoint action: saves every `--checkpoint_every` steps and on a stop signal.

What a checkpoint holds, where it lives and how a run resumes is the checkpoint
library's (`engine.checkpoints`); this is only when the outer loop saves.
"""

from engine.loop import Action, steps_to_multiple


class Checkpoints(Action):
    """Saves every `--checkpoint_every` steps (0 = only at the end) and on a stop signal.

    `last_good` is the newest checkpoint written: the one a divergence or a
    failure falls back to.
    """

    def __init__(self, manager, checkpoint_every, last_good=None, saved_step=None):
        self.manager, self.checkpoint_every = manager, checkpoint_every
        self.last_good, self.saved_step = last_good, saved_step

    def steps_to_boundary(self, step):
        return steps_to_multiple(self.checkpoint_every, step)

    def __call__(self, record):
        if record.step == record.total and not record.stop:
            return  # saved once training ends, after BatchNorm's statistics are recomputed
        if record.stop or (self.checkpoint_every and record.step % self.checkpoint_every == 0):
            self.save(record.step)

    def save(self, step):
        self.last_good, self.saved_step = self.manager.save(checkpoint_number=step), step

    def save_unless_saved(self, step, changed=False):
        """The last step's save at the end of training, unless a loop saved this very state.

        `changed`: the state changed since that save (recalibrated statistics).
        """
        if changed or self.saved_step != step:
            self.save(step)
