"""The data folder a run reads (DIR/train/<class>/..., DIR/val/<class>/...): opened and checked
before any work starts, reported in full by `fastrsb data check`, and searched for the file that
broke the loader when a run fails on one.

The files are listed by fastrsb.pipelines.image_list (the loaders' own rule), so the checks here
look at exactly the files a run reads.
"""
from __future__ import annotations

import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from fastrsb.errors import UserError
from fastrsb.file_jobs import default_workers
from fastrsb.folder_lock import in_use
from fastrsb.progress import Progress
from fastrsb.raw_imagenet import hint
from fastrsb.pipelines import IMAGE_EXTENSIONS, DatasetError, ImageList, class_folders, list_images, walk_class
from fastrsb.pipelines.image_list import (SPLIT_NAMES, dangling_links, folders_in_two_classes,
                                         refuse_names_dali_cannot_take)

LAYOUT = "DIR/train/<class>/<image>.JPEG and DIR/val/<class>/<image>.JPEG"

def split_folder(root: Path, split: str) -> Path:
    """ROOT's folder of SPLIT ("train" or "val"): the first of timm's names for it that is a
    folder there (a copy of ImageNet whose val/ is validation/ runs in timm, and runs here), else
    ROOT/SPLIT (to name in a message)."""
    return next((root / name for name in SPLIT_NAMES[split] if (root / name).is_dir()), root / split)


def no_split(root: Path, split: str) -> str:
    """What ROOT lacks, where it has no SPLIT to read."""
    others = ", ".join(f"{name}/" for name in SPLIT_NAMES[split][1:])
    return f"no '{split}' folder (nor {others}: expected {root}/{split}/<class>/<image>.JPEG)"


def open_split(root: Path, split: str) -> ImageList:
    folder = split_folder(root, split)
    if not folder.is_dir():
        raise UserError(f"{root} has {no_split(root, split)}")
    return open_class_tree(folder, root)


def open_class_tree(folder: Path, root: Path) -> ImageList:
    """FOLDER's images, FOLDER/<class>/<image> (a split of the data folder ROOT, or a folder of
    classes by any name: eval's), or one line saying what is wrong with it."""
    try:
        return list_images(folder)
    except DatasetError as err:
        raise UserError(f"{err}{hint(root)}") from None


def no_folder(root: Path, what: str = "data folder") -> str:
    """Why `root`, which is no folder, cannot be read as one."""
    if root.exists():
        return f"{what} {root} is a file, not a folder"
    return f"{what} {root} does not exist"


def check_layout(root: Path) -> None:
    """The folder and its train/ and val/ exist, and no data tool is writing them: checked in
    microseconds, before torch is imported."""
    if not root.is_dir():
        raise UserError(f"{no_folder(root)} (expected {LAYOUT.replace('DIR', str(root))})")
    refuse_data_being_written(root)
    for split in ("train", "val"):
        if not split_folder(root, split).is_dir():
            raise UserError(f"{root} has {no_split(root, split)}{hint(root) or split_hint(root)}")


def split_hint(root: Path) -> str:
    """'; ... fastrsb data split ...' for a folder of class folders that lacks a val/ (one's own data
    set, not split yet), else ''. Looks at folder names alone: microseconds."""
    train = split_folder(root, "train")
    whole = train if train.is_dir() else root
    try:
        classes = [name for name in class_folders(whole, refuse_dangling=False)
                   if name not in SPLIT_NAMES["train"] + SPLIT_NAMES["val"]]
    except OSError:
        return ""
    if len(classes) < 2:
        return ""
    what = f"its {train.name}/ holds" if whole == train else "it holds"
    return (f"; {what} {len(classes):,} class folders: to hold some of each class's images out for validation, "
            f"fastrsb data split {whole} {root.parent / (root.name + '-split')}")


def refuse_data_being_written(root: Path) -> None:
    """A data folder that `data prepare`, `shrink` or `prepare-val` is writing now
    (fastrsb.folder_lock) holds only part of its classes or images: a run or a check of it would
    see a data set that is not there yet (or stop on a file written halfway)."""
    for folder in (root, split_folder(root, "train"), split_folder(root, "val")):
        if (who := in_use(folder)) is not None:
            raise UserError(f"the data folder {root} is being written by {who}: use it once that has ended")


def refuse_a_run_inside_the_splits(out: Path, root: Path) -> None:
    """A run folder in DATA/train or DATA/val would be listed as a class of images by the next run
    (one without images: refused), or its checkpoints read as data."""
    for split in ("train", "val"):
        named = split_folder(Path(root), split)
        folder = named.resolve()
        if Path(out).resolve() == folder or folder in Path(out).resolve().parents:
            raise UserError(f"the run folder {out} lies inside the data's {named.name}/ folder, where every folder is "
                            f"a class of images: choose an --out outside {named}")


def open_dataset(root: str | Path) -> tuple[ImageList, ImageList]:
    """(train, val) image lists of an ImageNet-style folder, with the same classes (two or more)
    in both."""
    root = Path(root)
    check_layout(root)
    train, val = open_split(root, "train"), open_split(root, "val")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UserError(f"{root}: train and val classes differ (only in train: {only_train[:5]}, only in val: {only_val[:5]})")
    if len(train.classes) < 2:
        raise UserError(f"{root} holds one class ({train.classes[0]}): a classifier needs two or more "
                        "(its top-1 would be 100% whatever it learns)")
    return train, val


# --- ImageNet-1k's counts ------------------------------------------------------------------------

IMAGENET_1K = {"train": 1_281_167, "val": 50_000, "classes": 1000}
# ImageNet-1k's smallest train class has 732 images, and every val class 50.
IMAGENET_MIN_PER_CLASS = {"train": 732, "val": 50}


def _per_class(images: ImageList) -> dict[str, int]:
    counts = dict.fromkeys(images.classes, 0)
    for label in images.labels:
        counts[images.classes[label]] += 1
    return counts


def describe_counts(train: ImageList, val: ImageList) -> str:
    """One line: the data's counts against ImageNet-1k's. Other counts are allowed (a subset,
    another data set) and stated; with 1,000 classes, the classes short of ImageNet's are named."""
    counts = (len(train), len(val), len(train.classes))
    ours = f"{counts[0]:,} train / {counts[1]:,} val images in {counts[2]:,} classes"
    if counts == tuple(IMAGENET_1K.values()):
        return f"{ours}: ImageNet-1k's counts"
    line = (f"{ours}: not ImageNet-1k's ({IMAGENET_1K['train']:,} / {IMAGENET_1K['val']:,} / "
            f"{IMAGENET_1K['classes']:,}), a subset or another data set")
    if counts[2] == IMAGENET_1K["classes"]:
        short = [f"{split}/{name} {n}" for split, images in (("train", train), ("val", val))
                 for name, n in _per_class(images).items() if n < IMAGENET_MIN_PER_CLASS[split]]
        if short:
            line += f"; {len(short):,} class folder(s) short of ImageNet's: {', '.join(short[:5])}"
    else:
        smallest = sorted(_per_class(train).items(), key=lambda item: item[1])[:3]
        line += "; smallest train classes: " + ", ".join(f"{name} {n}" for name, n in smallest)
    return line


def val_shares_train(train_files: list[str], val_files: list[str]) -> str | None:
    """A note where val and train list images of the same folders (val/ linked to train/, or to
    some of its classes, for a validation set at hand): the top-1 then measures images the model
    trains on. Folders by their real paths: one per class of ImageNet, so ~2,000 resolved."""
    def real_folders(files: list[str]) -> set[str]:
        return {os.path.realpath(folder) for folder in {f.rpartition(os.sep)[0] for f in files}}
    shared = sorted(real_folders(train_files) & real_folders(val_files))
    if not shared:
        return None
    return (f"val and train share {len(shared):,} folder(s) of images (e.g. {shared[0]}): the validation top-1 "
            "measures images the model trains on")


# --- cheap checks at start-up -------------------------------------------------------------------

# The first bytes of every format the decoders read (by content: ImageNet holds PNGs named .JPEG):
# JPEG, PNG, BMP, TIFF (both byte orders), WebP (in RIFF), JPEG 2000 (its JP2 box and its bare
# codestream), PNM. What else PIL opens (GIF, ICO, TGA, ...) DALI does not decode: refused here, and
# by `data check`, which applies this rule before decoding.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"RIFF",
               b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xffO\xffQ", *(b"P%d" % k for k in range(1, 7)))


def _header_problem(path: str) -> str | None:
    """Why `path` cannot be an image, judged from its size and first bytes; None if it may be."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError as err:
        return f"unreadable: {err.strerror or type(err).__name__}"
    if not head:
        return "empty file (0 bytes)"
    if not head.startswith(_SIGNATURES) or (head.startswith(b"RIFF") and head[8:12] != b"WEBP"):
        return f"not an image: it starts with {head[:8]!r}"
    return None


def _scan_chunk(files: list[str]) -> list[tuple[str, str]]:
    return [(path, reason) for path in files if (reason := _header_problem(path))]


def scan_headers(files: list[str], workers: int | None = None) -> list[tuple[str, str]]:
    """(path, reason) for every file that is empty, unreadable, or not an image by its first bytes,
    in file order. One open and a 12-byte read per file, in processes over chunks of files:
    100,000 files in 0.4 s on 2 cores from the page cache (a pool of 32 threads took 5 s: the GIL),
    so ImageNet's 1.33M in ~5 s plus what cold storage adds. It catches at start-up what would
    otherwise stop a run hours in."""
    workers = default_workers(workers)
    size = max(256, -(-len(files) // (workers * 8)))
    chunks = [files[i:i + size] for i in range(0, len(files), size)]
    if len(chunks) == 1:
        return _scan_chunk(files)
    with ProcessPoolExecutor(workers) as pool:
        return [bad for found in pool.map(_scan_chunk, chunks) for bad in found]


def check_headers(train: ImageList, val: ImageList) -> float:
    """Raise a UserError naming the broken files (up to 3) of train and val; returns the seconds taken."""
    start = time.perf_counter()
    bad = scan_headers(train.files + val.files)
    if bad:
        raise UserError(f"{_name_files(bad)}: remove or replace the file(s) before training "
                        "(fastrsb data check lists every problem)")
    return time.perf_counter() - start


def _name_files(bad: list[tuple[str, str]]) -> str:
    listed = "; ".join(f"{path} ({reason})" for path, reason in bad[:3])
    return f"{len(bad)} bad file(s): {listed}{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}"


# --- full decode ----------------------------------------------------------------------------------

# EXIF orientations other than 1 ("as stored"): the photo is meant to be shown rotated or mirrored.
TURNED = frozenset(range(2, 9))


def is_16_bit_grey(image) -> bool:
    """A 16-bit grey image (PNG, TIFF or PGM; Pillow opens a PGM, and older Pillows a PNG, as "I").
    DALI's decoders scale its values to 8 bits, round(v / 257); PIL's convert("RGB"), and so timm,
    clips them at 255, which leaves such an image nearly white."""
    return image.mode.startswith("I;16") or (image.mode == "I" and image.format in ("PNG", "PPM"))


def as_the_loaders_read(image, deep: bool | None = None):
    """A PIL image as RGB with the pixels the loaders decode from its file: PIL's convert("RGB"),
    but a 16-bit grey image scaled to 8 bits as DALI's decoders scale it. deep: whether it is one
    (default: is_16_bit_grey(image), which needs the image as opened: a transposed copy of a PGM
    has lost its format)."""
    if is_16_bit_grey(image) if deep is None else deep:
        import numpy as np
        from PIL import Image
        scaled = np.clip(np.round(np.asarray(image, dtype=np.float64) / 257), 0, 255).astype(np.uint8)
        image = Image.fromarray(scaled, "L")
    return image.convert("RGB")


def _decode(path: str) -> tuple[str | None, bool, bool]:
    """(why the file does not decode, or None; whether its EXIF orientation turns it; whether it
    is a 16-bit grey image)."""
    from PIL import ExifTags, Image
    try:
        with Image.open(path) as image:
            turned = image.getexif().get(ExifTags.Base.Orientation, 1) in TURNED
            image.draft("RGB", (64, 64))  # DCT-scaled JPEG decode: reads every byte, 8x faster
            image.load()
            return None, turned, is_16_bit_grey(image)
    except Image.DecompressionBombError:
        return _over_pils_limit(path), False, False
    except Exception as err:  # noqa: BLE001 - any failure means "cannot decode"
        return f"{type(err).__name__}: {err}", False, False


OVER_PILS_LIMIT = "over PIL's decompression-bomb limit"


def _over_pils_limit(path: str) -> str:
    """Why an image over PIL's decompression-bomb limit is a problem, from its header alone (not
    decoded here: a real bomb would take the checker's memory)."""
    from PIL import Image
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as image:
            width, height = image.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return (f"{width:,} x {height:,} pixels, {OVER_PILS_LIMIT} of {2 * limit:,}: timm cannot read it, and the "
            f"loaders would decode it into {3 * width * height / 2**30:.1f} GiB; fastrsb data shrink makes it small")


def find_undecodable(files: list[str], workers: int | None = None, limit: int | None = 10,
                     progress: Progress | None = None, turned: list[str] | None = None,
                     deep: list[str] | None = None) -> list[tuple[str, str]]:
    """(path, reason) for the files that do not decode (the first `limit`, or all), in file order.
    turned, deep: lists to which the files whose EXIF orientation turns them, and the 16-bit grey
    ones, are appended."""
    workers = default_workers(workers)
    bad = []
    with ProcessPoolExecutor(workers) as pool:
        for done, (path, (reason, is_turned, is_deep)) in enumerate(zip(files, pool.map(_decode, files,
                                                                                        chunksize=64)), 1):
            if reason:
                bad.append((path, reason))
                if limit is not None and len(bad) >= limit:
                    break
            if is_turned and turned is not None:
                turned.append(path)
            if is_deep and deep is not None:
                deep.append(path)
            if progress is not None and (done % 1000 == 0 or done == len(files)):
                progress.update(done, done / (time.perf_counter() - progress.start))
    return bad


_PATH = re.compile(r"(/[^\s:'\"]+)")
RECHECK_LIMIT = 10  # the broken files a CPU re-check after a loader's failure looks for


def explain_loader_error(err: RuntimeError, images: ImageList) -> UserError:
    """A DALI loader failed: name the file. DALI 2.4's message names it ('File mapping failed:
    PATH' from the reader, 'Failed to decode sample #3 : PATH' from a decoder) under a last line
    that does not ('Current pipeline object is no longer valid'); where no listed file is named,
    a decoder error has the files decoded once more on the CPU to find it. Only for errors raised
    by a loader: a model's error is not a data error. Memory run out is said first: DALI's message
    then names the decoder where its buffers outgrew the GPU, and no file is to blame."""
    from fastrsb.pipelines.loader import out_of_memory
    text = str(err)
    if line := out_of_memory(text):
        where = "host" if re.search(r"on host|bad_alloc", line, re.IGNORECASE) else "GPU"
        # DALI's words, or torch's from the torch RandAugment form, which runs at the hand-over.
        return UserError(f"the data pipeline ran out of {where} memory ({line}): its buffers grow with the batch "
                         "and the largest image decoded; a smaller batch per process fits (fastrsb train "
                         "--micro-batch N keeps the recipe's batch by accumulation; fastrsb eval --batch-size N)")
    listed = set(images.files)
    named = [path for path in _PATH.findall(text) if path in listed]
    if not named:  # a name the pattern cuts short (spaces, quotes): look for every listed name (0.13 s for 1.28 M)
        named = sorted((path for path in images.files if path in text), key=len, reverse=True)
    if named:
        line = next(line for line in text.splitlines() if named[0] in line)
        reason = line.replace(named[0], "").strip(" :")
        verb = "cannot decode" if "decod" in reason.lower() else "cannot read"
        if verb == "cannot read" and not os.path.lexists(named[0]):  # deleted or moved while a run read the data
            return UserError(f"{named[0]} is gone since the data was listed (DALI: {reason}): put it back, or start "
                             "again to list the files there are (a run: --resume auto)")
        return UserError(f"{verb} {named[0]} (DALI: {reason}): remove or replace it "
                         "(fastrsb data check lists every problem)")
    if "decod" not in text.lower() and "nvImageCodec" not in text:
        lines = [line for line in text.splitlines() if line.strip() and "no longer valid" not in line]
        # A DALI build for a CUDA the driver cannot run fails here, at the loader's first batch.
        hint = ("; `fastrsb doctor` checks the driver against the CUDA that torch and DALI were built for"
                if re.search(r"driver|insufficient|no cuda-capable|nvml", text, re.IGNORECASE) else "")
        return UserError(f"data pipeline failed: {lines[-1] if lines else type(err).__name__}{hint}")
    # An image over PIL's limit is no decode failure of DALI's: not the one to blame here. The
    # re-check stops at RECHECK_LIMIT broken files: `data check` lists them all.
    found = find_undecodable(images.files, limit=RECHECK_LIMIT)
    bad = [(path, reason) for path, reason in found if OVER_PILS_LIMIT not in reason]
    if not bad:
        return UserError("the data pipeline could not decode an image, and a CPU re-check of every file found none "
                         f"broken; DALI said: {' '.join(text.split())[:300]}")
    listed_bad = "; ".join(f"{path} ({reason})" for path, reason in bad[:3])
    at_least = "at least " if len(found) == RECHECK_LIMIT else ""  # the re-check stopped there
    more = f" and {at_least}{len(bad) - 3} more" if len(bad) > 3 else ""
    return UserError(f"cannot decode {listed_bad}{more}: remove or replace the file(s) (fastrsb data check lists them all)")


def loader_batches(loader, images: ImageList):
    """Iterate a loader; an error raised by the loader itself becomes a UserError naming the file.
    Only `next()` is guarded: whatever the caller does with a batch (the model's forward, a CUDA
    out-of-memory error) propagates as it is."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as err:
            raise explain_loader_error(err, images) from None
        yield batch


# --- fastrsb data check ---------------------------------------------------------------------------

def _split_listing(split: Path) -> tuple[dict[str, tuple[list[str], list[str]]], list[str]]:
    """(class -> (images, other files), by the loaders' own rule; what is wrong where a folder is
    walked under two classes). Class folders whose links lead nowhere are left to dangling_links."""
    folders: dict[str, dict[str, str]] = {}
    listing = {name: walk_class(split / name, folders.setdefault(name, {}))
               for name in class_folders(split, refuse_dangling=False)}
    return listing, folders_in_two_classes(folders)


def _how_to_sort(folder: Path, loose: list[str]) -> str:
    """How to sort images lying outside any class folder into class folders."""
    from fastrsb.hub_imagenet import member_target
    try:
        for name in loose:
            member_target(name)
    except ValueError:
        return "sort them into class folders, e.g. with fastrsb data prepare-val and ImageNet's label file"
    return (f"their names end in their wnid, as the Hugging Face hub's archives name them: fastrsb data prepare-val "
            f"{folder} sorts them by those")


def check(root: str | Path, workers: int | None = None, decode: bool = True) -> tuple[list[str], list[str]]:
    """Every problem of DIR/train and DIR/val that would stop or skew a run, and notes on what the
    loaders skip (files without an image extension, images outside class folders); or of the
    images of a file list (`relative/path label` lines, as the loaders take one). Prints a summary."""
    root = Path(root)
    if root.is_file():
        return _check_file_list(root, workers, decode)
    if not root.is_dir():
        raise UserError(no_folder(root))
    refuse_data_being_written(root)
    problems, notes, splits, files = [], [], {}, []
    for split in ("train", "val"):
        folder = split_folder(root, split)
        if not folder.is_dir():
            problems.append(f"{no_split(root, split)}{hint(root) or split_hint(root)}")
            continue
        problems += dangling_links(folder)
        try:
            splits[split], shared = _split_listing(folder)
        except DatasetError as err:  # a loop of symbolic links: no listing to check
            problems.append(str(err))
            continue
        problems += shared
        loose = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.name.lower().endswith(IMAGE_EXTENSIONS))
        if loose:
            problems.append(f"{folder.name}/: {len(loose)} image(s) outside any class folder, e.g. {loose[0]} (the "
                            f"loaders skip them: {_how_to_sort(folder, loose)})")
        if not splits[split]:
            problems.append(f"{folder.name}/ holds no class folders{hint(root)}")
        for name, (images, others) in splits[split].items():
            if not images:
                problems.append(f"{folder.name}/{name}: empty class (no {'/'.join(IMAGE_EXTENSIONS[:2])} ... files)")
            if others:
                notes.append(f"{folder.name}/{name}: {len(others)} file(s) without an image extension, skipped by "
                             f"the loaders, e.g. {Path(others[0]).name}")
            files += images
        nested = [name for name, (images, _) in splits[split].items()
                  if any(os.path.dirname(image) != str(folder / name) for image in images)]
        if nested:  # (ImageNet has none; data sets with sub-folders a class do)
            notes.append(f"{folder.name}/: {len(nested)} class folder(s) hold images in sub-folders, e.g. {nested[0]}/: "
                         "fastrsb labels them by the class folder, as torchvision does; timm's ImageFolder by the "
                         "innermost folder's name, so timm's tools would see other classes here")
    if len(splits) == 2 and splits["train"].keys() != splits["val"].keys():
        only_train = sorted(set(splits["train"]) - set(splits["val"]))
        only_val = sorted(set(splits["val"]) - set(splits["train"]))
        problems.append(f"train and val classes differ: {len(only_train)} only in train {only_train[:5]}, "
                        f"{len(only_val)} only in val {only_val[:5]}")
    if len(splits.get("train", {})) == 1:
        problems.append("train/ holds one class: a classifier needs two or more")
    if len(splits) == 2 and (shared := val_shares_train(*([f for images, _ in splits[split].values() for f in images]
                                                          for split in ("train", "val")))):
        notes.append(shared)
    try:
        refuse_names_dali_cannot_take(files)
    except DatasetError as err:
        problems.append(str(err))
    found, noted = _check_images(files, workers, decode)
    counts = ", ".join(f"{sum(len(i) for i, _ in c.values()):,} {s} images in {len(c):,} classes"
                       for s, c in splits.items())
    print(f"{root}: {counts or 'no images'}; {len(problems) + len(found)} problem(s)")
    return problems + found, notes + noted


def _check_file_list(path: Path, workers: int | None, decode: bool) -> tuple[list[str], list[str]]:
    """A loader's file list: its lines (the loaders' own reading of it), then its images."""
    try:
        images = list_images(path)
    except DatasetError as err:
        print(f"{path}: a file list that the loaders refuse; 1 problem(s)")
        return [str(err)], []
    problems, notes = _check_images(images.files, workers, decode)
    print(f"{path}: a file list of {len(images):,} images in {len(images.classes):,} classes; {len(problems)} problem(s)")
    return problems, notes


def _check_images(files: list[str], workers: int | None, decode: bool) -> tuple[list[str], list[str]]:
    """(problems, notes) of the image files themselves: what the start-up check refuses, and with
    `decode` what does not decode, what is over PIL's limit, turned or 16-bit grey."""
    problems, notes = [], []
    if decode and files:
        # First the start-up check's rule, so that a clean check means a run that starts: PIL (the
        # decode below) opens formats that DALI does not read (GIF, ICO, TGA, ...).
        refused = scan_headers(files, workers)
        problems += [f"{path}: {reason}" for path, reason in refused]
        named = {path for path, _ in refused}
        files = [path for path in files if path not in named]
        progress, turned, deep = Progress("decoding", len(files), unit="files"), [], []
        for path, reason in find_undecodable(files, workers, limit=None, progress=progress, turned=turned,
                                             deep=deep):
            problems.append(f"{path}: {reason}" if OVER_PILS_LIMIT in reason else f"cannot decode {path} ({reason})")
        progress.close()
        if turned:  # phone photos, mostly: as stored they lie on their side
            notes.append(f"{len(turned):,} image(s) carry an EXIF orientation (meant to be shown rotated or "
                         f"mirrored), e.g. {turned[0]}: the loaders read the pixels as stored, as timm does; "
                         "`fastrsb data shrink DIR OUT --upright` writes a copy with them turned upright")
        if deep:  # scientific or medical images, say: timm would train on them white
            notes.append(f"{len(deep):,} image(s) are 16-bit grey, e.g. {deep[0]}: the loaders (and `fastrsb data "
                         "shrink`) scale them to 8 bits; timm's PIL clips them at 255, nearly white")
    elif files:
        problems += [f"{path}: {reason}" for path, reason in scan_headers(files)]
    return problems, notes
