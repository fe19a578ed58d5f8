"""`--freeze_steps=N`: train only the head for the first N steps, then every layer.

Fine-tuning puts a new, random head on pretrained layers; its first gradients
are large and would wreck what the layers learned. So for the first N steps
every layer but the head is frozen (`trainable=False`): its weights are not
among the step's variables, so they are neither updated nor part of the
finiteness check and the gradient norm, and its BatchNorm normalises with its
moving statistics (inference mode), which stay as they are. A skipped step
still leaves every variable bit-identical.

At step N the `Unfreeze` action makes every layer trainable and has the step
rebuilt (traced again) over every weight. The optimizer holds slots for every
weight from the start; a frozen weight's stay at zero until it trains.
"""

from engine.loop import Action
from models.weights import HEAD


def set_frozen(model, frozen):
    """Freezes (or unfreezes) every top-level layer of `model` but the head."""
    for layer in model.layers:
        if layer.name != HEAD:
            layer.trainable = not frozen


class Unfreeze(Action):
    """At step `freeze_steps`: every layer trainable, then the step rebuilt over them.

    `step` is the run's `train_run.CurrentStep`: the loop and the actions that
    use the step read it from there, so rebuilding it is all that changes.
    """

    def __init__(self, freeze_steps, model, step):
        self.freeze_steps, self.model, self.step = freeze_steps, model, step
        self.frozen = True

    def steps_to_boundary(self, step):
        return self.freeze_steps - step if step < self.freeze_steps else None

    def __call__(self, record):
        if self.frozen and record.step >= self.freeze_steps:
            set_frozen(self.model, False)
            self.step.rebuild()
            self.frozen = False
