"""ImageNet as the Hugging Face hub serves it, in archives that label their images themselves:
- dataset ILSVRC/imagenet-1k (its tar.gz archives): data/train_images_0.tar.gz .. _4.tar.gz and
  data/val_images.tar.gz, flat tars whose members are named <image>_<wnid>.JPEG
  (n01440764_10026_n01440764.JPEG, ILSVRC2012_val_00000001_n01751748.JPEG: the hub's loading
  script labels each by the wnid after the last underscore);
- dataset timm/imagenet-1k-wds (timm's copy, in webdataset shards): imagenet1k-train-0000.tar ..
  -1023.tar and imagenet1k-validation-00.tar .. -63.tar, each sample members <key>.jpg, <key>.cls
  (its class index in ImageNet-1k's standard order: the wnids sorted, as timm's classifiers index
  them) and <key>.json.
`fastrsb data prepare` writes them as OUT/<split>/<wnid>/<image>.JPEG under ImageNet's own file
names where the archive gives them (ImageNet-ReaL's labels are looked up by those): the hub's
names less their _<wnid>; a shard's sample JSON's "filename", else its key.

A class may span archives, so each archive is extracted whole into a hidden staging folder of OUT,
an archive a process, and its listing (each image's class, name and size, read as it goes) is
written beside when it is complete. Once every archive of a split is, each class folder is renamed
into place. Run again after an interruption, the archives already extracted are skipped; run again
after it finished, the class folders are checked against the listings, so another data set's files
are not taken for the download's."""
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
from dataclasses import dataclass
from pathlib import Path

from fastrsb.errors import UserError
from fastrsb.file_jobs import default_workers, each_result, foreign_classes, not_these_files, stops_writing, \
    write_stopped
from fastrsb.progress import Progress, clock

_WNID = re.compile(r"n\d{8}")
STATE = ".fastrsb-hf"  # OUT's hidden folder: the staged classes and the archives' listings
_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # a webdataset sample's image, by its extension


@dataclass(frozen=True)
class HubCopy:
    """One of the hub's copies: its name, its archives' names by split, and the val ones' as said."""
    name: str
    train: re.Pattern
    val: re.Pattern
    val_said: str


ILSVRC = HubCopy("ILSVRC/imagenet-1k", re.compile(r"train_images_\d+\.tar\.gz"), re.compile(r"val_images\.tar\.gz"),
                 "val_images.tar.gz")
TIMM_WDS = HubCopy("timm/imagenet-1k-wds", re.compile(r"imagenet1k-train-\d+\.tar"),
                   re.compile(r"imagenet1k-validation-\d+\.tar"), "imagenet1k-validation-NN.tar")


def find_archives(raw: Path) -> tuple[HubCopy, list[Path], list[Path]] | None:
    """(the copy, its train archives, its val archives) in RAW or RAW/data/ (where the hub's
    download puts ILSVRC/imagenet-1k's), or None where there are none."""
    for folder in (raw, raw / "data"):
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file())
        for copy in (ILSVRC, TIMM_WDS):
            train = [p for p in files if copy.train.fullmatch(p.name)]
            if train:
                return copy, train, [p for p in files if copy.val.fullmatch(p.name)]
    return None


def member_target(name: str) -> tuple[str, str]:
    """An ILSVRC/imagenet-1k member's (wnid, file name in its class folder):
    'n01440764_10026_n01440764.JPEG' -> ('n01440764', 'n01440764_10026.JPEG'). ValueError for a
    name of another form."""
    base = name.rsplit("/", 1)[-1]
    stem, dot, extension = base.rpartition(".")
    image, _, wnid = stem.rpartition("_")
    if not dot or not image or image.startswith(".") or not _WNID.fullmatch(wnid):
        raise ValueError(f"member {name!r} is not named <image>_<wnid>.JPEG")
    return wnid, f"{image}.{extension}"


def _named_images(tar: tarfile.TarFile):
    """ILSVRC/imagenet-1k: (wnid, file name, bytes) of each member, labelled by its name."""
    for member in tar:
        if member.isfile():
            wnid, name = member_target(member.name)
            with tar.extractfile(member) as image:
                yield wnid, name, image.read()


def _webdataset_images(tar: tarfile.TarFile, wnids: list[str]):
    """timm/imagenet-1k-wds: (wnid, file name, bytes) of each sample, the members sharing a key
    in a row (the key: the path up to the first dot of the file's name, as webdataset groups them)."""
    key, parts = None, {}
    for member in tar:
        if not member.isfile():
            continue
        folder, _, base = member.name.rpartition("/")
        stem, _, extension = base.partition(".")
        this = f"{folder}/{stem}" if folder else stem
        if this != key and key is not None:
            yield _sample(key, parts, wnids)
            parts = {}
        key = this
        with tar.extractfile(member) as data:
            parts[extension.lower()] = data.read()
    if key is not None:
        yield _sample(key, parts, wnids)


def _sample(key: str, parts: dict[str, bytes], wnids: list[str]) -> tuple[str, str, bytes]:
    """One webdataset sample's (wnid, file name, image bytes); ValueError where it has no image or
    no class index of ImageNet-1k."""
    image = next((extension for extension in _IMAGE_KEYS if extension in parts), None)
    try:
        index = int(parts["cls"])
    except (KeyError, ValueError):
        index = -1
    if image is None or not 0 <= index < len(wnids):
        raise ValueError(f"sample {key!r} has no {'image' if image is None else 'class index 0..999 (.cls)'}")
    try:  # where its JSON names the original file, that name (a val image's number is what ReaL's labels go by)
        name = Path(str(json.loads(parts.get("json", b"{}")).get("filename", ""))).name
    except (ValueError, AttributeError):
        name = ""
    name = name if name and not name.startswith(".") else f"{key.rsplit('/', 1)[-1]}.{image}"
    if name.startswith("."):  # a hidden file (the loaders skip those), or no name at all
        raise ValueError(f"sample {key!r} gives no file name to write its image under")
    return wnids[index], name, parts[image]


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


def _extract(job: tuple[str, str, str, str]) -> str:
    """Extract one archive into STAGING/<wnid>/<image> and then write its listing. job: (archive,
    staging, out, the copy's name). Returns 'done: <images>', 'failed: why' or 'unwritable: why'."""
    archive, staging, out, copy = Path(job[0]), Path(job[1]), Path(job[2]), job[3]
    classes: dict[str, dict[str, int]] = {}
    try:
        with tarfile.open(archive, "r|*") as tar:  # a stream (compressed or not): read once, front to back
            if copy == ILSVRC.name:
                images = _named_images(tar)
            else:
                from fastrsb.class_order import imagenet_classes
                images = _webdataset_images(tar, imagenet_classes())
            for wnid, name, data in images:
                folder = staging / wnid
                if wnid not in classes:
                    folder.mkdir(parents=True, exist_ok=True)
                    classes[wnid] = {}
                (folder / name).write_bytes(data)
                classes[wnid][name] = len(data)
        listing = _listing_path(archive, out)
        tmp = listing.with_name(f".{listing.name}.tmp")
        with gzip.open(tmp, "wt") as f:
            json.dump({"identity": _identity(archive), "classes": classes}, f)
        os.replace(tmp, listing)  # the archive counts as extracted only once its listing is whole
        return f"done: {sum(map(len, classes.values()))}"
    except ValueError as err:
        return f"failed: {archive}: {err}: is it an archive of the hub's {copy}?"
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


def _extract_all(copy: HubCopy, archives: list[Path], staging: Path, out: Path, workers: int) -> None:
    """Every archive, in parallel processes: a line as each of a few ends (minutes each), a
    progress bar over many (timm's 1,024 train shards)."""
    start, failures, images = time.perf_counter(), [], 0
    jobs = [(str(a), str(staging), str(out), copy.name) for a in archives]
    progress = Progress("archives", len(jobs), unit="archives", enabled=len(jobs) > 16)
    with closing(each_result(_extract, jobs, min(workers, len(jobs)))) as results:
        for done, (archive, result) in enumerate(zip(archives, results), 1):
            if result.startswith("unwritable"):
                progress.close()
                raise write_stopped(out, result.removeprefix("unwritable: "),
                                    "the archives extracted so far (skipped by the next run) are")
            if result.startswith("failed"):
                failures.append(result.removeprefix("failed: "))
                continue
            images += int(result.removeprefix("done: "))
            elapsed = time.perf_counter() - start
            progress.update(done, done / max(elapsed, 1e-9))
            if not progress.enabled:
                print(f"  {archive.name}: {int(result.removeprefix('done: ')):,} images "
                      f"({archive.stat().st_size / 1e9:,.1f} GB) extracted by {clock(elapsed)}", flush=True)
    progress.close()
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
        raise foreign_classes(target, foreign)
    shutil.rmtree(staging, ignore_errors=True)  # the staged copies of classes that were there already
    return placed, there


def prepare_split(copy: HubCopy, split: str, archives: list[Path], out: Path, workers: int) -> None:
    """OUT/<split>/<wnid>/ from the hub's archives of that split."""
    target, staging = out / split, out / STATE / split
    stale = _stale(archives, target, staging, out)
    if stale:
        (out / STATE).mkdir(parents=True, exist_ok=True)
        for archive in stale:
            _listing_path(archive, out).unlink(missing_ok=True)  # extracted again: not complete until it is
        print(f"{split}: extracting {len(stale)} of {len(archives)} archive(s), in "
              f"{min(workers, len(stale))} process(es)")
        _extract_all(copy, stale, staging, out, workers)
    target.mkdir(exist_ok=True)
    placed, there = _place(archives, target, staging, out)
    print(f"{split}: {placed:,} class(es) written, {there:,} already there")


def need_bytes(archives: list[Path], out: Path) -> int:
    """The disk an extraction needs: the archives still to extract (JPEGs do not shrink in gzip)."""
    return sum(a.stat().st_size for a in archives if read_listing(a, out) is None)


def prepare(copy: HubCopy, train: list[Path], val: list[Path], out: Path, workers: int | None) -> None:
    """OUT/train/ and OUT/val/ from the hub's archives."""
    workers = default_workers(workers)
    prepare_split(copy, "train", train, out, workers)
    if val:
        prepare_split(copy, "val", val, out, workers)
    else:
        print(f"no {copy.val_said} in the download: OUT/val/ is left to you")
