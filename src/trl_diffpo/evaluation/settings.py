"""The decoding settings an evaluation compares: a sampler with a threshold, a step count or the learned head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..samplers import FIXED_SCHEDULE_SAMPLERS, SAMPLERS

LEARNED = "learned"  # the threshold token of a setting that uses the sampler head


@dataclass(frozen=True)
class SamplerSetting:
    """One decoding setting to evaluate.

    Args:
        sampler: one of ``low_confidence``, ``random``, ``confidence_threshold``, ``entropy_bounded``.
        threshold: the adaptive samplers' threshold (confidence in (0, 1] or EB gamma >= 0).
        steps: total denoising steps of the fixed-schedule samplers.
        learned: take each prompt's threshold from the sampler head (adaptive samplers only).
    """

    sampler: str
    threshold: float | None = None
    steps: int | None = None
    learned: bool = False

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        if self.sampler in FIXED_SCHEDULE_SAMPLERS:
            if self.steps is None or self.threshold is not None or self.learned:
                raise ValueError(
                    f"Sampler {self.sampler!r} has a fixed schedule: give `steps` (e.g. '{self.sampler}:steps=64') "
                    "and no threshold."
                )
        else:
            if self.steps is not None:
                raise ValueError(f"Sampler {self.sampler!r} is adaptive: give a threshold, not steps.")
            if self.learned == (self.threshold is not None):
                raise ValueError(
                    f"Sampler {self.sampler!r} needs exactly one of a threshold (e.g. '{self.sampler}:0.1') or "
                    f"the learned head ('{self.sampler}:{LEARNED}')."
                )

    @property
    def label(self) -> str:
        """Short name, e.g. ``entropy_bounded:0.1``, ``low_confidence:steps=64``, ``entropy_bounded:learned``."""
        if self.sampler in FIXED_SCHEDULE_SAMPLERS:
            return f"{self.sampler}:steps={self.steps}"
        return f"{self.sampler}:{LEARNED if self.learned else f'{self.threshold:g}'}"


def parse_sampler_settings(spec: str | Sequence[str]) -> list[SamplerSetting]:
    """Parse settings like ``"entropy_bounded:0.1,0.5 low_confidence:steps=64,128 confidence_threshold:0.9"``.

    Groups are separated by spaces (or given as a list); each is ``sampler:values`` with comma-separated values:
    thresholds for the adaptive samplers (or ``learned`` for the sampler head), ``steps=N`` or plain integers for
    the fixed-schedule samplers.
    """
    groups = spec.split() if isinstance(spec, str) else [part for item in spec for part in item.split()]
    settings: list[SamplerSetting] = []
    for group in groups:
        sampler, sep, values = group.partition(":")
        if not sep or not values:
            raise ValueError(
                f"Cannot read sampler setting {group!r}: write 'sampler:values', e.g. 'entropy_bounded:0.1,0.5' or "
                "'low_confidence:steps=64'."
            )
        if sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler {sampler!r} in {group!r}; choose one of {', '.join(SAMPLERS)}.")
        for value in values.split(","):
            value = value.strip()
            try:
                if sampler in FIXED_SCHEDULE_SAMPLERS:
                    settings.append(SamplerSetting(sampler, steps=int(value.removeprefix("steps="))))
                elif value == LEARNED:
                    settings.append(SamplerSetting(sampler, learned=True))
                else:
                    settings.append(SamplerSetting(sampler, threshold=float(value)))
            except ValueError as err:
                raise ValueError(f"Cannot read value {value!r} of sampler setting {group!r}: {err}") from err
    if not settings:
        raise ValueError("No sampler settings given.")
    return settings
