"""`--histogram_every`: weight and unscaled-gradient histograms."""

from engine.actions import summaries
from engine.extras import diagnostics
from engine.loop import Action, steps_to_multiple


class Histograms(Action):
    """Every `histogram_every` steps: `weights/<path>` and `gradients/<path>`.

    The gradients are recomputed on one fixed batch (the one shown as
    `input/train_batch`) at the current weights and scale, changing nothing,
    with the current step (`train_run.CurrentStep`): after --freeze_steps, over
    every weight.
    """

    def __init__(self, writer, step, images, labels, histogram_every):
        self.writer, self.step, self.images, self.labels = writer, step, images, labels
        self.histogram_every = histogram_every
        self.probed, self.probe = None, None  # the train step the probe was made for

    def steps_to_boundary(self, step):
        return steps_to_multiple(self.histogram_every, step)

    def __call__(self, record):
        if record.step % self.histogram_every:
            return
        train_step = self.step.train_step
        if self.probed is not train_step:
            self.probed, self.probe = train_step, diagnostics.create_gradient_probe(train_step)
        grads = self.probe(self.images, self.labels)
        self.writer.histograms(
            record.step,
            summaries.weight_and_gradient_histograms(train_step.trainable, grads),
        )
