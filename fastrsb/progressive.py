"""Progressive resizing, as FFCV trains its ResNets: the first epochs at a smaller crop size, the
size rising linearly over a ramp of epochs to the recipe's img_size, which the last epochs train
at. A smaller crop costs less (a ResNet's work goes with the pixels: 128 px is 0.64 of 160 px's),
and the train-test resolution discrepancy (FixRes) makes the low-resolution epochs count towards a
test at a larger size. Off in the RSB recipes (ramp_img_size = "none"), which train at one size.

The size of an epoch is a function of the epoch alone, so a resumed run, every process of a
multi-process one, and a run of another micro-batch train each epoch at the same size. The
sizes change between epochs: the train loader rebuilds its pipelines at the new size where its
stream stands (DaliLoader.resize), and the model is compiled for each size once, a static graph
of its own (fastrsb.step.wrap_model)."""
from __future__ import annotations

import math


def size_at(recipe: dict, epoch: int) -> int:
    """The crop size epoch `epoch` (from 1) trains at: ramp_img_size up to ramp_start_epoch,
    img_size from ramp_end_epoch on, linear between, rounded to ramp_img_size plus a multiple of
    ramp_step (the nearest, halves to even, as FFCV's np.round)."""
    small, big = recipe.get("ramp_img_size"), recipe["img_size"]
    if small is None:
        return big
    start, end, step = recipe["ramp_start_epoch"], recipe["ramp_end_epoch"], recipe["ramp_step"]
    share = min(1.0, max(0.0, (epoch - start) / (end - start)))
    return small + step * round(share * (big - small) / step)


def sizes(recipe: dict) -> list[tuple[int, int, int]]:
    """(first epoch, last epoch, size) for each run of epochs at one size, in order."""
    runs: list[tuple[int, int, int]] = []
    for epoch in range(1, recipe["epochs"] + 1):
        size = size_at(recipe, epoch)
        if runs and runs[-1][2] == size:
            runs[-1] = (runs[-1][0], epoch, size)
        else:
            runs.append((epoch, epoch, size))
    return runs


def describe(recipe: dict) -> str:
    """'100 epochs at 160 px', or each size's epochs: '100 epochs: 1-62 at 128 px, 63-100 at 160
    px (progressive resizing: 0.78 of the pixels)'."""
    runs = sizes(recipe)
    if len(runs) == 1:
        return f"{recipe['epochs']} epochs at {runs[0][2]} px"
    parts = [f"{first}{'-' + str(last) if last > first else ''} at {size} px" for first, last, size in runs]
    return f"{recipe['epochs']} epochs: {', '.join(parts)} (progressive resizing: {pixel_share(recipe):.2f} of the pixels)"


def pixel_share(recipe: dict) -> float:
    """The run's pixels (its crops' area summed over the epochs) as a share of img_size's for
    every epoch: about the share of the model's work the ramp leaves."""
    big = recipe["img_size"]
    return sum(size_at(recipe, epoch) ** 2 for epoch in range(1, recipe["epochs"] + 1)) / (recipe["epochs"] * big**2)


def train_seconds_ahead(recipe: dict, done: float, paces: dict[int, float]) -> float:
    """The training time left after `done` epochs (fractional within an epoch), from `paces`
    ({crop size: an epoch's training seconds at it}, as measured so far): each epoch ahead at its
    size's pace, or where the size has not been trained yet, at pace_at's estimate of it."""
    return sum(min(1.0, epoch - done) * pace_at(size_at(recipe, epoch), paces)
               for epoch in range(math.floor(done) + 1, recipe["epochs"] + 1))


def pace_at(size: int, paces: dict[int, float]) -> float:
    """An epoch's training seconds at `size`: measured, or from two or more measured sizes a line
    in the pixels through them (least squares: a cost an image, the decode's, plus a cost a pixel,
    the model's), or from one the nearest's scaled by the pixels, which overestimates where the
    costs that do not go with the pixels weigh (the CPU's small demo images: 2x at the first
    epoch; an A3 step on a GPU is the model's work)."""
    if size in paces:
        return paces[size]
    if len(paces) > 1:
        xs, ys = [measured**2 for measured in paces], list(paces.values())
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
                 / sum((x - mean_x) ** 2 for x in xs))
        if slope > 0:
            return mean_y + slope * (size**2 - mean_x)
    near = min(paces, key=lambda measured: (abs(measured - size), measured))
    return paces[near] * (size / near) ** 2
