"""timm's RandAugment strings ('rand-m6-mstd0.5-inc1'), parsed without importing DALI (the recipe
checks them when it loads). The policy itself: pipelines/randaugment.py."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes live on a 0-10 scale

INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
DEFAULT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
               "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@dataclass(frozen=True)
class RandAugmentSpec:
    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0  # math.inf: uniform in [0, magnitude]
    magnitude_max: float = MAX_LEVEL
    increasing: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else DEFAULT_OPS


def parse_rand_augment(config: str) -> RandAugmentSpec:
    """timm's string, e.g. 'rand-m6-mstd0.5-inc1': m magnitude, n layers, p probability per op,
    mstd magnitude noise (> 100: uniform), mmax magnitude bound, inc1 the increasing op set."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"'{config}' is not a RandAugment string (timm's form: rand-m6-mstd0.5-inc1)")
    values: dict = {}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)", part)
        if not match:
            raise ValueError(f"RandAugment '{config}': unknown or unsupported section '{part}' "
                             "(supported: m, n, p, mstd, mmax, inc; timm's t<set> transform sets are not)")
        key, text = match.groups()
        if key == "mstd":
            std = float(text)
            values["magnitude_std"] = math.inf if std > 100 else std
        elif key == "mmax":
            values["magnitude_max"] = float(int(float(text)))
        elif key == "inc":
            values["increasing"] = bool(int(float(text)))
        elif key == "m":
            values["magnitude"] = float(int(float(text)))
        elif key == "n":
            values["num_layers"] = int(float(text))
        else:
            values["prob"] = float(text)
    return RandAugmentSpec(**values)
