"""`--histogram_every`: weight and unscaled-gradient histograms."""

from engine.actions import summaries
from engine.extras import diagnostics
from engine.loop import Action, steps_to_multiple


class Histograms(Action):
    """Every `histogram_every` steps: `weights/<path>` and `gradients/<path>`.

    The gradients are recomputed on one fixed batch (the one shown as
    `input/train_batch`) at the current weights and scale, changing nothing.
    """

    def __init__(self, writer, train_step, images, labels, histogram_every):
        self.writer, self.images, self.labels = writer, images, labels
        self.histogram_every = histogram_every
        self.trainable = train_step.model.trainable_variables
        self.probe = diagnostics.create_gradient_probe(train_step)

    def steps_to_boundary(self, step):
        return steps_to_multiple(self.histogram_every, step)

    def __call__(self, record):
        if record.step % self.histogram_every == 0:
            grads = self.probe(self.images, self.labels)
            self.writer.histograms(
                record.step, summaries.weight_and_gradient_histograms(self.trainable, grads)
            )
