"""ImageNet as the Hugging Face hub serves it (dataset ILSVRC/imagenet-1k, its tar.gz archives):
data/train_images_0.tar.gz .. train_images_4.tar.gz and data/val_images.tar.gz, flat tars whose
members are named <image>_<wnid>.JPEG (n01440764_10026_n01440764.JPEG,
ILSVRC2012_val_00000001_n01751748.JPEG: the hub's loading script labels each by the wnid after the
last underscore). `fastrsb data prepare` writes them as OUT/<split>/<wnid>/<image>.JPEG, the names
ImageNet's own tars give (ImageNet-ReaL's labels are looked up by those).

A class may span archives, so each archive is extracted whole into a hidden staging folder of OUT, an
archive a process (gzip decompresses serially), and its listing (each image's class, name and size,
read from the tar headers as it goes) is written beside when it is complete. Once every archive of a
split is, each class folder is renamed into place. Run again after an interruption, the archives
already extracted are skipped; run again after it finished, the class folders are checked against
the listings, so another data set's files are not taken for the download's."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tarfile
import time
import zlib
from contextlib import closing
from pathlib import Path

from fastrsb.errors import UserError
from fastrsb.file_jobs import each_result, not_these_files, stops_writing, write_stopped
from fastrsb.progress import clock

TRAIN_ARCHIVE = re.compile(r"train_images_\d+\.tar\.gz")
VAL_ARCHIVE = "val_images.tar.gz"
_WNID = re.compile(r"n\d{8}")
STATE = ".fastrsb-hf"  # OUT's hidden folder: the staged classes and the archives' listings


def find_archives(raw: Path) -> tuple[list[Path], Path | None]:
    """The hub's train archives and val archive in RAW or RAW/data/ (where the hub's download puts
    them); ([], None) where there are none."""
    for folder in (raw, raw / "data"):
        if folder.is_dir():
            train = sorted(p for p in folder.iterdir() if TRAIN_ARCHIVE.fullmatch(p.name) and p.is_file())
            if train:
                return train, folder / VAL_ARCHIVE if (folder / VAL_ARCHIVE).is_file() else None
    return [], None


def member_target(name: str) -> tuple[str, str]:
    """A member's (wnid, file name in its class folder): 'n01440764_10026_n01440764.JPEG' ->
    ('n01440764', 'n01440764_10026.JPEG'). ValueError for a name of another form."""
    base = name.rsplit("/", 1)[-1]
    stem, dot, extension = base.rpartition(".")
    image, _, wnid = stem.rpartition("_")
    if not dot or not image or not _WNID.fullmatch(wnid):
        raise ValueError(f"member {name!r} is not named <image>_<wnid>.JPEG")
    return wnid, f"{image}.{extension}"


# --- one archive, in a process of its own ------------------------------------------------------------

def _listing_path(archive: Path, out: Path) -> Path:
    return out / STATE / f"{archive.name}.listing.json.gz"


def _identity(archive: Path) -> dict:
    """What a listing was made from: an archive downloaded again (another size or time) is extracted again."""
    stat = archive.stat()
    return {"archive": archive.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_listing(archive: Path, out: Path) -> dict[str, dict[str, int]] | None:
    """{wnid: {file name: bytes}} of an archive extracted completely into OUT, else None."""
    path = _listing_path(archive, out)
    try:
        with gzip.open(path, "rt") as f:
            listing = json.load(f)
    except (OSError, ValueError):  # none yet, or cut short by a kill: extracted again
        return None
    return listing["classes"] if listing.get("identity") == _identity(archive) else None


def _extract(job: tuple[str, str, str]) -> str:
    """Extract one archive into STAGING/<wnid>/<image>.JPEG and then write its listing. Returns
    'done: <images>', 'failed: why' or 'unwritable: why'."""
    archive, staging, out = Path(job[0]), Path(job[1]), Path(job[2])
    classes: dict[str, dict[str, int]] = {}
    try:
        with tarfile.open(archive, "r|gz") as tar:  # a stream: read once, front to back
            for member in tar:
                if not member.isfile():
                    continue
                wnid, name = member_target(member.name)
                folder = staging / wnid
                if wnid not in classes:
                    folder.mkdir(parents=True, exist_ok=True)
                    classes[wnid] = {}
                with tar.extractfile(member) as image:
                    (folder / name).write_bytes(image.read())
                classes[wnid][name] = member.size
        listing = _listing_path(archive, out)
        tmp = listing.with_name(f".{listing.name}.tmp")
        with gzip.open(tmp, "wt") as f:
            json.dump({"identity": _identity(archive), "classes": classes}, f)
        os.replace(tmp, listing)  # the archive counts as extracted only once its listing is whole
        return f"done: {sum(map(len, classes.values()))}"
    except ValueError as err:
        return f"failed: {archive}: {err}: is it an archive of the hub's ILSVRC/imagenet-1k?"
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        if stops_writing(err):
            return f"unwritable: {err.strerror}"
        return f"failed: {archive} cannot be read to its end ({type(err).__name__}: {err}): is it truncated? " \
               "Download it again"


# --- a split ----------------------------------------------------------------------------------------

def _stale(archives: list[Path], target: Path, staging: Path, out: Path) -> list[Path]:
    """The archives to extract: those without a complete listing, and those holding a class that is
    neither in place nor staged (a class folder removed by hand since, to have it written again)."""
    stale = []
    for archive in archives:
        listing = read_listing(archive, out)
        if listing is None or any(not (target / w).is_dir() and not (staging / w).is_dir() for w in listing):
            stale.append(archive)
    return stale


def _extract_all(archives: list[Path], staging: Path, out: Path, workers: int) -> None:
    """Every archive, in parallel; a line as each ends (in order: a few, minutes each, so no bar)."""
    start, failures = time.perf_counter(), []
    jobs = [(str(a), str(staging), str(out)) for a in archives]
    with closing(each_result(_extract, jobs, min(workers, len(jobs)))) as results:
        for archive, result in zip(archives, results):
            if result.startswith("unwritable"):
                raise write_stopped(out, result.removeprefix("unwritable: "),
                                    "the archives extracted so far (skipped by the next run) are")
            if result.startswith("failed"):
                failures.append(result.removeprefix("failed: "))
                continue
            print(f"  {archive.name}: {int(result.removeprefix('done: ')):,} images "
                  f"({archive.stat().st_size / 1e9:,.1f} GB) extracted by {clock(time.perf_counter() - start)}",
                  flush=True)
    if failures:
        raise UserError(f"{failures[0]}{f' (and {len(failures) - 1} more archive(s))' if len(failures) > 1 else ''}; "
                        "the archives extracted so far are kept for the next run")


def _place(archives: list[Path], target: Path, staging: Path, out: Path) -> tuple[int, int]:
    """Each staged class folder renamed into TARGET; a class already there checked against the
    listings. Returns (placed, already there)."""
    images: dict[str, dict[str, int]] = {}
    for archive in archives:
        for wnid, files in read_listing(archive, out).items():
            images.setdefault(wnid, {}).update(files)
    foreign, placed, there = [], 0, 0
    for wnid in sorted(images):
        if (target / wnid).exists():
            folder = target / wnid
            why = not_these_files(folder, images[wnid]) if folder.is_dir() else ["a file, where it goes"]
            if why:
                foreign.append(f"{target / wnid}: {why[0]}")
            else:
                there += 1
            continue
        os.replace(staging / wnid, target / wnid)
        placed += 1
    if foreign:  # left as they are: they are somebody's files (the staged copies wait for the next run)
        raise UserError(f"{len(foreign)} class folder(s) of {target} already hold other files than the download's: "
                        f"{foreign[0]}{f'; and {len(foreign) - 1} more' if len(foreign) > 1 else ''}. Does OUT hold "
                        "another data set (a shrunk copy, another download)? Prepare into an empty folder, or remove "
                        "those class folders to have them written again")
    shutil.rmtree(staging, ignore_errors=True)  # the staged copies of classes that were there already
    return placed, there


def prepare_split(split: str, archives: list[Path], out: Path, workers: int) -> None:
    """OUT/<split>/<wnid>/ from the hub's archives of that split."""
    target, staging = out / split, out / STATE / split
    stale = _stale(archives, target, staging, out)
    if stale:
        (out / STATE).mkdir(parents=True, exist_ok=True)
        for archive in stale:
            _listing_path(archive, out).unlink(missing_ok=True)  # extracted again: not complete until it is
        print(f"{split}: extracting {len(stale)} of {len(archives)} archive(s), an archive a process")
        _extract_all(stale, staging, out, workers)
    target.mkdir(exist_ok=True)
    placed, there = _place(archives, target, staging, out)
    print(f"{split}: {placed:,} class(es) written, {there:,} already there")


def need_bytes(archives: list[Path], out: Path) -> int:
    """The disk an extraction needs: the archives still to extract (JPEGs do not shrink in gzip)."""
    return sum(a.stat().st_size for a in archives if read_listing(a, out) is None)


def prepare(train: list[Path], val: Path | None, out: Path, workers: int | None) -> None:
    """OUT/train/ and OUT/val/ from the hub's archives."""
    workers = workers or max(1, min(16, len(os.sched_getaffinity(0))))
    prepare_split("train", train, out, workers)
    if val is None:
        print(f"no {VAL_ARCHIVE} in the download: OUT/val/ is left to you")
    else:
        prepare_split("val", [val], out, workers)
