"""Scopes: where an option applies, and how a run that sets it elsewhere is refused.

An option declared with scopes (`engine.config.option(scopes=...)`) applies only to
runs whose setting (mode, precision or data set) is in each of them. Set away from
its default anywhere else it would be ignored, yet recorded with the run, and a
resume without it refused: `engine.validation.refuse_out_of_scope` refuses it in
one line, with the scope's own reason. The scopes themselves are declared beside
the options, in `engine.config`.
"""

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True, eq=False)
class Scope:
    """Where some options apply: runs whose `setting` is one of `values`.

    Set away from its default anywhere else, such an option would be ignored,
    yet recorded with the run (and a resume without it refused):
    `refuse_out_of_scope` refuses it in one line, `refusal(given, config)`.
    """

    setting: str  # the Config field the scope looks at: mode, precision or dataset
    values: tuple  # where the options apply (for dataset: kinds, e.g. "tfds:")
    refusal: Callable  # (["--flag", ...], config) -> the one-line error message

    def covers(self, value):
        """Whether a run whose `setting` is `value` is in this scope."""
        if self.setting == "dataset":  # named by kind and NAME or PATH: tfds:NAME
            return str(value).startswith(self.values)
        return value in self.values


def applies_only(applies_to, why_not_here):
    """A refusal: "--a, --b apply only to `applies_to`; `why_not_here(config)`: drop them"."""

    def refusal(given, config):
        verb, them = ("applies", "it") if len(given) == 1 else ("apply", "them")
        return (
            f"{', '.join(given)} {verb} only to {applies_to}; {why_not_here(config)}: drop {them}"
        )

    return refusal


def traces_training(given, config):
    return (
        f"{', '.join(given)} traces training steps; use it with --mode=train or --mode=compare, "
        f"not --mode={config.mode} (e.g. on the configuration a benchmark shows as slow)"
    )


def acts_on_training(does, instead):
    """A refusal: "--a DOES; INSTEAD[mode]: use it with --mode=train or --mode=compare, or drop it".

    `does` holds `{s}`, the verb's ending for one option; `instead` says, per
    mode outside the scope, what that mode does in its place.
    """

    def refusal(given, config):
        one = len(given) == 1
        them = "it" if one else "them"
        return (
            f"{', '.join(given)} {does.format(s='s' if one else '')}; {instead[config.mode]}: "
            f"use {them} with --mode=train or --mode=compare, or drop {them}"
        )

    return refusal


def not_in_benchmark(given, config):
    del config  # the benchmark's reason is the same for every run
    verb, them = ("does", "it") if len(given) == 1 else ("do", "them")
    choose = (
        " (choose precisions and XLA with --compare, e.g. --compare=fp32,mixed_bf16+xla)"
        if {"--precision", "--xla"} & set(given)
        else ""
    )
    return (
        f"{', '.join(given)} {verb} not apply to --mode=benchmark, "
        f"which times the single-device training step of each --compare configuration "
        f"against Keras fit: drop {them}{choose}"
    )
