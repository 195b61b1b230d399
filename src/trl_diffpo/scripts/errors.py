"""The error type of the ``trl-diffpo`` commands and the "did you mean" hint they share."""

import difflib


class CliError(ValueError):
    """A user error in the command line or the YAML file (reported as one line, without a traceback)."""


def did_you_mean(name: str, known: list[str]) -> str:
    """`` (did you mean --a, --b?)`` for the options of ``known`` closest to ``name``; ``""`` when none is close."""
    matches = difflib.get_close_matches(name.lstrip("-").replace("-", "_"), known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join('--' + match for match in matches)}?)" if matches else ""
