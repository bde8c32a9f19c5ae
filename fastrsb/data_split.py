"""`fastrsb data split SOURCE TARGET`: one's own data set, a folder of class folders, made into the
layout a run reads (TARGET/train/<class>/..., TARGET/val/<class>/...; where asked, a TARGET/test/
too, for a figure of the model that val chose on images it was not chosen by). Each class is split
on its own (stratified), so that val holds the same share of every class, as ImageNet's val does.

Which images go to val depends on the seed, the class's name and that class's own files alone: the
same command gives the same split on any machine and any file system (files sorted, a seeded
shuffle), and a class added later, or images added to another class, leave a class's split as it
was. The images are hard-linked where TARGET lies on SOURCE's disk (no space taken; SOURCE may be
removed afterwards), else copied. TARGET is written beside and renamed into place whole, so a split
stopped halfway (Ctrl-C, a full disk) leaves nothing that passes for one.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from fastrsb.errors import UserError
from fastrsb.file_jobs import free_gb, link_or_copy, nearest_existing, stops_writing
from fastrsb.folder_lock import in_use
from fastrsb.label_table import classes_from_table
from fastrsb.pipelines import IMAGE_EXTENSIONS, DatasetError, class_folders, list_images
from fastrsb.pipelines.image_list import SPLIT_NAMES
from fastrsb.progress import Progress
from fastrsb.shards import listing_fingerprint
from fastrsb.staging import staged_folder

RECORD = "split.json"  # beside train/, val/ (and test/): outside them, so no loader reads it


@dataclass(frozen=True)
class Portion:
    """How many of each class's images a held-out split ("val", "test") takes: a share of the
    class (`share`, 0 < share < 1, rounded), or the same number of each (`per_class`)."""

    split: str
    share: float | None
    per_class: int | None

    def __post_init__(self):
        if self.share is not None and not 0 < self.share < 1:
            raise UserError(f"--{self.split} {self.share}: a share of each class's images, between 0 and 1 (0.1 = 10%)")
        if self.per_class is not None and self.per_class < 1:
            raise UserError(f"--{self.split}-per-class {self.per_class}: one image or more")

    def wanted(self, images: int) -> int:
        return self.per_class if self.per_class is not None else math.floor(images * self.share + 0.5)

    def said(self) -> str:
        if self.per_class is not None:
            return f"{self.per_class} {self.split} image(s) a class"
        return f"{self.split} {self.share:.0%} of each class"


@dataclass(frozen=True)
class SplitRule:
    """How each class's images are held out: `val`, and `test` where asked (a third split, for a
    figure of the model chosen by its val top-1 on images it was not chosen by), and the seed."""

    val: Portion
    test: Portion | None
    seed: int

    def __post_init__(self):
        shares = [p.share for p in (self.val, self.test) if p is not None and p.share is not None]
        if len(shares) == 2 and sum(shares) >= 1:
            raise UserError(f"--val {shares[0]} and --test {shares[1]} leave no training images: together they must be under 1")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed {self.seed}: 0 or more")

    def counts(self, images: int) -> tuple[int, int]:
        """(val, test) images of a class of IMAGES: as asked, but at least one in each split, the
        training split included, where the class is small (a share of 3 images, say)."""
        held = 1 if self.test else 0  # what test needs at least
        val = min(max(self.val.wanted(images), 1), images - 1 - held)
        test = min(max(self.test.wanted(images), 1), images - 1 - val) if self.test else 0
        return val, test

    def smallest(self) -> int:
        """The fewest images a class may have: more than the per-class numbers asked, and one for each split."""
        need = sum(p.per_class or 1 for p in (self.val, self.test) if p is not None)
        return need + 1

    def rounded_off(self, images: int) -> bool:
        """True where a class is too small for the shares asked: its counts are not theirs."""
        wanted = (self.val.wanted(images), self.test.wanted(images) if self.test else 0)
        return self.counts(images) != wanted

    def said(self) -> str:
        return ", ".join([p.said() for p in (self.val, self.test) if p is not None] + [f"seed {self.seed}"])

    def record(self) -> dict:
        test = self.test or Portion("test", None, None)
        return {"val": self.val.share, "val_per_class": self.val.per_class, "test": test.share,
                "test_per_class": test.per_class, "seed": self.seed}


def held_out(class_name: str, files: list[str], rule: SplitRule) -> tuple[set[str], set[str]]:
    """The files of one class (paths below its folder) that go to val and to test: sorted, then
    shuffled by a generator seeded by the seed and the class's name alone (random.Random hashes a str
    seed with SHA-512: the same on every machine and Python); val the first of them, test the next.
    So asking for a test split too leaves val as it was (but in a class too small for both)."""
    order = sorted(files)
    random.Random(f"fastrsb data split {rule.seed} {class_name}").shuffle(order)
    val, test = rule.counts(len(files))
    return set(order[:val]), set(order[val:val + test])


def split(source: str | Path, target: str | Path, rule: SplitRule, labels: str | Path | None = None,
          columns: tuple[str | None, str | None] = (None, None)) -> dict:
    """Write TARGET/train and TARGET/val (and test) from SOURCE's class folders, or from the images
    below SOURCE as the table LABELS classes them (fastrsb.label_table; COLUMNS: its file and label
    columns, None to find them); the record it wrote (or found: the same split of the same images
    already there), with "left_out": the images below SOURCE in no class (no class folder, no row)."""
    source, target = Path(source).absolute(), Path(target).absolute()
    _check_source(source, target)
    if labels is None:
        classes, left_out = _source_classes(source), _loose_images(source)
        origins = {name: source / name for name in classes}  # a class's images are below its folder
    else:
        classes, left_out = classes_from_table(source, Path(labels), *columns)
        origins = dict.fromkeys(classes, source)  # below SOURCE, as the table names them
        if len(classes) < 2:
            raise UserError(f"{labels} names one class ({next(iter(classes))}): a classifier needs two or more")
    plan = _plan(classes, rule)
    record = {"source": str(source), **({"labels": str(Path(labels).absolute())} if labels else {}), **rule.record(),
              "listing": _fingerprint(classes), "classes": {name: [len(files) - len(val) - len(test), len(val),
                                                                  len(test)] for name, (files, val, test) in plan.items()}}
    if _already_split(target, record):
        return {**record, "written": False, "left_out": left_out}
    _refuse_a_copy_that_will_not_fit(source, target, classes, origins)
    progress = Progress("splitting", sum(len(files) for files, _, _ in plan.values()), unit="files")
    try:
        # "keep": a TARGET another process filled meanwhile is not written over, ours dropped: checked below.
        with staged_folder(target, existing="keep") as staging:
            linked = _place(origins, staging, plan, progress)
            (staging / RECORD).write_text(json.dumps({**record, "linked": linked}, indent=1) + "\n")
    except OSError as err:
        if stops_writing(err):
            raise UserError(f"cannot write into {target} ({err.strerror}; {free_gb(target):,.1f} GB free on its "
                            "disk): nothing of it kept; make room, then run the same command again") from None
        raise
    finally:
        progress.close()
    # Where another process's split landed first (staged_folder kept it, ours dropped), the same
    # split is taken as ours; another one is refused here, naming its rule and source.
    _already_split(target, record)
    return {**record, "linked": linked, "written": True, "left_out": left_out}


def _check_source(source: Path, target: Path) -> None:
    if not source.is_dir():
        raise UserError(f"source folder {source} {'is a file, not a folder' if source.exists() else 'does not exist'}")
    if target == source or source in target.parents:
        raise UserError(f"the target {target} must lie outside the source {source} (its images would be listed "
                        "again)")
    if (who := in_use(source)) is not None:
        raise UserError(f"{source} is being written by {who}: split it once that has ended")


def _source_classes(source: Path) -> dict[str, list[str]]:
    """{class: its image paths below the class folder} of SOURCE, listed as the loaders list a
    split (fastrsb.pipelines.list_images: its refusals too), or one line on why it cannot be split."""
    _refuse_a_split_folder(source)
    try:
        images = list_images(source)
    except DatasetError as err:
        raise UserError(str(err)) from None
    if len(images.classes) < 2:
        raise UserError(f"{source} holds one class ({images.classes[0]}): a classifier needs two or more")
    classes: dict[str, list[str]] = {name: [] for name in images.classes}
    for file, label in zip(images.files, images.labels):
        name = images.classes[label]
        classes[name].append(os.path.relpath(file, source / name))
    return classes


def _loose_images(source: Path) -> int:
    """The images directly in SOURCE, outside any class folder: no class's, so left out (said)."""
    return sum(1 for entry in os.scandir(source) if not entry.name.startswith(".") and entry.is_file()
               and entry.name.lower().endswith(IMAGE_EXTENSIONS))


def _refuse_a_split_folder(source: Path) -> None:
    """SOURCE/train/<class>/... is split already; as a folder of classes it would be read as one
    class "train" (and one "val") of every image."""
    for name in class_folders(source, refuse_dangling=False):
        if name in SPLIT_NAMES["train"] + SPLIT_NAMES["val"] and class_folders(source / name, refuse_dangling=False):
            raise UserError(f"{source} is split already ({name}/ holds class folders): to split one of its folders "
                            f"anew, give that folder ({source / name})")


def _plan(classes: dict[str, list[str]], rule: SplitRule) -> dict[str, tuple[list[str], set[str], set[str]]]:
    """{class: (its files, those that go to val, those that go to test)}; a class that cannot give
    every split an image (the validation set needs every class the training set has) is refused, the
    first five named."""
    short = {name: len(files) for name, files in classes.items() if len(files) < rule.smallest()}
    if short:
        named = ", ".join(f"{name} ({count})" for name, count in list(short.items())[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        raise UserError(f"{len(short)} class(es) have too few images to split: {named}{more}; each needs "
                        f"{rule.smallest()} or more ({rule.said().rsplit(', seed', 1)[0]}, and one to train on)")
    return {name: (files, *held_out(name, files, rule)) for name, files in classes.items()}


def _already_split(target: Path, record: dict) -> bool:
    """True where TARGET holds this very split (the same source, rule and counts): a setup script
    run again goes on. A TARGET holding anything else is refused: nothing is written over."""
    if not target.exists():
        return False
    if not target.is_dir():
        raise UserError(f"the target {target} is a file, not a folder")
    held = sorted(p.name for p in target.iterdir())
    if not held:
        return False  # an empty folder: replaced by the split
    try:
        saved = json.loads((target / RECORD).read_text())
        saved.pop("linked", None)
    except (OSError, ValueError):
        raise UserError(f"{target} holds files ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): split into "
                        "a new or empty folder") from None
    if saved == record:
        return True
    facts = ("classes", "listing")
    if {k: v for k, v in saved.items() if k not in facts} == {k: v for k, v in record.items() if k not in facts}:
        raise UserError(f"{target} is this split of {record['source']} as it was ({_images(saved)} images); it now "
                        f"holds {_images(record)}, or other files: split it into a new folder (or remove {target})")
    try:
        test = Portion("test", saved["test"], saved["test_per_class"])
        rule = SplitRule(Portion("val", saved["val"], saved["val_per_class"]),
                         test if test.share or test.per_class else None, saved["seed"])
        theirs = f"of {saved['source']}, {rule.said()}"
    except (KeyError, TypeError, UserError):
        theirs = f"its {RECORD} unlike this one's"
    raise UserError(f"{target} holds another split ({theirs}): split into a new folder, or remove {target}")


def _fingerprint(classes: dict[str, list[str]]) -> str:
    """A short hash of the images split, by class and path below the class folder: a source with
    images renamed, added or taken out fingerprints otherwise (an image rewritten under its own
    name does not)."""
    return listing_fingerprint([f"{name}/{file}" for name, files in classes.items() for file in files],
                               [k for k, files in enumerate(classes.values()) for _ in files])


def _images(record: dict) -> str:
    return f"{sum(map(sum, record['classes'].values())):,}"


def _refuse_a_copy_that_will_not_fit(source: Path, target: Path, classes: dict[str, list[str]],
                                     origins: dict[str, Path]) -> None:
    """Across disks every image is copied: refused before the first where they would not fit."""
    if os.stat(source).st_dev == os.stat(nearest_existing(target.parent)).st_dev:
        return  # hard links: no room needed but the folders'
    size = sum(os.path.getsize(origins[name] / file) for name, files in classes.items() for file in files)
    if size / 1e9 > free_gb(target.parent):
        raise UserError(f"{target} is on another disk than {source}, so its images would be copied ({size / 1e9:,.1f} "
                        f"GB), and its disk has {free_gb(target.parent):,.1f} GB free: choose a target on "
                        f"{source}'s disk (hard links, no room taken) or make room")


def _place(origins: dict[str, Path], staging: Path, plan: dict[str, tuple[list[str], set[str], set[str]]],
           progress: Progress) -> bool:
    """Every image (its path below its class's folder in ORIGINS) into staging/train, /val or /test
    under its class and that path; True where all were hard-linked, False where any was copied."""
    linked, done, start, made = True, 0, time.perf_counter(), set()
    for name, (files, val, test) in plan.items():
        for file in files:
            copy = staging / ("val" if file in val else "test" if file in test else "train") / name / file
            if copy.parent not in made:  # once a folder, not a stat an image
                copy.parent.mkdir(parents=True, exist_ok=True)
                made.add(copy.parent)
            linked &= link_or_copy(origins[name] / file, copy)
            done += 1
            if done % 2000 == 0 or done == progress.total:
                progress.update(done, done / max(time.perf_counter() - start, 1e-9))
    return linked


def summary(target: Path, result: dict, rule: SplitRule) -> list[str]:
    """What `fastrsb data split` says it did: counts, how, the classes the shares could not be kept
    in, and the commands that train and test on it."""
    counts = result["classes"]
    train, val, test = (sum(each[i] for each in counts.values()) for i in (0, 1, 2))
    how = "" if not result["written"] else "; hard links" if result["linked"] else "; copies"
    tested = f" / {test:,} test" if rule.test else ""
    lines = [f"{target}: {train:,} train / {val:,} val{tested} images in {len(counts):,} classes ({rule.said()}{how})"
             + ("" if result["written"] else ": there already, as asked")]
    small = [f"{name} ({sum(each)} images: {each[1]} val{f', {each[2]} test' if rule.test else ''})"
             for name, each in counts.items() if rule.rounded_off(sum(each))]
    if small:
        more = f" and {len(small) - 3} more" if len(small) > 3 else ""
        lines.append(f"note: {len(small)} class(es) too small for the shares asked kept an image in each split: "
                     f"{', '.join(small[:3])}{more}")
    if result["left_out"]:
        why = (f"no row of {result['labels']} names them" if "labels" in result else
               f"directly in {result['source']}, outside any class folder")
        lines.append(f"note: {result['left_out']:,} image(s) are in no split: {why} (they have no class)")
    lines.append(f"train on it: fastrsb train RECIPE --data {target}")
    if rule.test:
        lines.append(f"test the model chosen: fastrsb eval RUN_DIR/best.pt --data {target / 'test'}")
    return lines
