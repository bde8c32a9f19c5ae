"""`fastrsb data prepare-val | shrink`: turn what the ImageNet download gives into the folder a run
reads. prepare-val: ILSVRC2012's flat validation folder into class folders. shrink: a compact
re-encoded copy (decode cost grows with pixels). Checking a folder: fastrsb.data_folder."""
from __future__ import annotations

import csv
import json
import os
import time
from contextlib import closing
from pathlib import Path

from PIL import Image, ImageOps

from fastrsb.data_folder import as_the_loaders_read, is_16_bit_grey, no_folder
from fastrsb.errors import UserError
from fastrsb.file_jobs import each_result, make_folder, stops_writing, write_stopped
from fastrsb.folder_lock import FolderLock
from fastrsb.progress import Progress
from fastrsb.pipelines import IMAGE_EXTENSIONS, walk_files


def _workers(workers: int | None) -> int:
    return workers or max(1, len(os.sched_getaffinity(0)))


# --- prepare-val ------------------------------------------------------------------------------------

def _read_solution_csv(path: Path) -> dict[str, str]:
    """LOC_val_solution.csv: ImageId,PredictionString ('n01751748 x y x y ...') -> {image id: wnid}."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise UserError(f"{path}: expected the header 'ImageId,PredictionString' of LOC_val_solution.csv")
    labels = {}
    for number, row in enumerate(rows[1:], 2):
        if len(row) < 2 or not row[1].split():
            raise UserError(f"{path}:{number}: expected 'ImageId,wnid ...', got {','.join(row)!r}")
        labels[row[0].strip()] = row[1].split()[0]
    return labels


def read_meta_synsets(meta: Path) -> list[str]:
    """The wnids of the devkit's meta.mat in ILSVRC2012_ID order: its leaf synsets (no children),
    IDs 1..1000. The ID order is not the sorted order of the wnids: a sorted list mislabels."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError(f"reading {meta} needs scipy (pip install scipy), or give --synsets a text file of the wnids "
                        "in ILSVRC2012_ID order") from None
    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        leaves = sorted((int(s["ILSVRC2012_ID"]), str(s["WNID"])) for s in synsets if int(s["num_children"]) == 0)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{meta} is not the devkit's meta.mat ({type(err).__name__}: {err})") from None
    if [i for i, _ in leaves] != list(range(1, len(leaves) + 1)):
        raise UserError(f"{meta}: the leaf synsets' ILSVRC2012_IDs do not run 1..{len(leaves)}")
    return [wnid for _, wnid in leaves]


def _labels_from_names(flat: dict[str, Path]) -> dict[str, str]:
    """{image id: wnid} of images named <image>_<wnid>.JPEG (the Hugging Face hub's names)."""
    from fastrsb.hub_imagenet import member_target
    labels = {}
    for stem, path in sorted(flat.items()):
        try:
            labels[stem] = member_target(path.name)[0]
        except ValueError:
            raise UserError(f"{path} is not named <image>_<wnid>.JPEG, as the Hugging Face hub's archives name "
                            "ImageNet's images: give the label file (LOC_val_solution.csv, or the devkit's ground "
                            "truth with --synsets)") from None
    return labels


def _read_ground_truth(path: Path, synsets: Path | None) -> dict[str, str]:
    """The devkit's ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per line, image 1
    first) with the synsets in ILSVRC2012_ID order (a text file, one 'wnid ...' per line)."""
    if synsets is None:
        raise UserError(f"{path} holds class numbers: give --synsets with the devkit's meta.mat (or a text file of "
                        "the wnids in ILSVRC2012_ID order, one per line), or use LOC_val_solution.csv instead")
    if synsets.suffix == ".mat":
        wnids = read_meta_synsets(synsets)
    else:
        wnids = [line.split()[0] for line in synsets.read_text().splitlines() if line.strip()]
    labels = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            index = int(line)
            if not 1 <= index <= len(wnids):
                raise ValueError
        except ValueError:
            raise UserError(f"{path}:{number}: {line!r} is not a class number 1..{len(wnids)} of {synsets}") from None
        labels[f"ILSVRC2012_val_{number:08d}"] = wnids[index - 1]
    return labels


def prepare_val(val_dir: str | Path, labels_file: str | Path | None, synsets: str | Path | None = None,
                copy_to: str | Path | None = None) -> dict:
    """Move VAL_DIR/<image id>.JPEG into VAL_DIR/<wnid>/, or copy it into COPY_TO/<wnid>/ and leave
    VAL_DIR as it was (class folders next to the flat originals would leave images outside any
    class folder, which the loaders skip). Without a label file, each image's name must end in its
    wnid, <image>_<wnid>.JPEG, as the Hugging Face hub's archives name them (unpacked by hand, a
    train archive too). Resumable: images already in their class folder are left alone, so a
    second run finishes an interrupted one."""
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise UserError(no_folder(val_dir, "validation folder"))
    if labels_file is not None and not Path(labels_file).is_file():
        raise UserError(f"no label file {labels_file}")
    target_dir = Path(copy_to) if copy_to else val_dir
    if copy_to and target_dir.resolve() == val_dir.resolve():
        raise UserError(f"--copy-to {copy_to} is the validation folder itself: copy into another folder, or move "
                        "(leave out --copy-to)")
    flat = {p.stem: p for p in val_dir.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)}
    if labels_file is None:
        labels = _labels_from_names(flat)
    elif Path(labels_file).suffix.lower() == ".csv":
        labels = _read_solution_csv(Path(labels_file))
    else:
        labels = _read_ground_truth(Path(labels_file), Path(synsets) if synsets else None)
    unknown = sorted(set(flat) - set(labels))
    if unknown:
        raise UserError(f"{len(unknown)} image(s) in {val_dir} have no label in {labels_file}, e.g. {unknown[0]}: "
                        "is it the label file of this folder?")
    if copy_to:
        make_folder(target_dir, "the --copy-to folder")
    with FolderLock(target_dir, "fastrsb data prepare-val"):
        if copy_to:
            _refuse_foreign_copies(target_dir, flat, labels)
        moved = _place(flat, labels, target_dir, bool(copy_to))
    in_folders = {(p.parent.name, p.stem) for p in target_dir.glob("*/*") if p.is_file() and not p.name.startswith(".")}
    placed = sum(1 for stem, wnid in labels.items() if (wnid, stem) in in_folders)
    missing = len(labels) - placed
    print(f"{'copied' if copy_to else 'moved'} {moved:,} image(s) into {len({labels[s] for s in flat}) if flat else 0} "
          f"class folder(s) of {target_dir}; {placed:,} of {len(labels):,} labelled images are in place"
          f"{f', {missing:,} missing' if missing else ''}")
    return {"moved": moved, "placed": placed, "missing": missing}


def _place(flat: dict[str, Path], labels: dict[str, str], target_dir: Path, copy: bool) -> int:
    """Each image into its class folder, moved or copied; how many were."""
    moved = 0
    for stem, path in sorted(flat.items()):
        target = target_dir / labels[stem] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if copy and target.exists():
            continue
        if copy:
            tmp = target.with_name(f".{target.name}.tmp")
            try:
                tmp.write_bytes(path.read_bytes())
                os.replace(tmp, target)
            except BaseException as err:  # a full disk, Ctrl-C: no half-written copy left
                tmp.unlink(missing_ok=True)
                if stops_writing(err):
                    raise write_stopped(target_dir, err.strerror, "the images copied so far are") from None
                raise
        else:
            os.replace(path, target)
        moved += 1
    return moved


def _refuse_foreign_copies(target_dir: Path, flat: dict[str, Path], labels: dict[str, str]) -> None:
    """A resumed copy skips the images already in place; the files in COPY_TO's class folders must
    then be this folder's own copies (same name, class and size), not another set's files that would
    pass for them or join them."""
    if not target_dir.is_dir():
        return
    for path in sorted(target_dir.glob("*/*")):
        if path.name.startswith("."):
            continue  # a copy's hidden temporary file: written again
        source = flat.get(path.stem) if path.is_file() else None
        if source is None or labels.get(path.stem) != path.parent.name or source.name != path.name \
                or source.stat().st_size != path.stat().st_size:
            raise UserError(f"{path} is not a copy of an image of this validation folder (another name, class or "
                            f"size): {target_dir} holds other files; copy into an empty folder, or remove them")


# --- shrink -----------------------------------------------------------------------------------------

def _shrink_one(job: tuple[str, str, int, int, bool]) -> str:
    """Re-encode one image to DST (RGB JPEG, longer side <= max_side; with `upright`, turned as
    its EXIF orientation says); 'skipped' if DST exists. The copy carries no EXIF: its pixels are
    what any reader shows."""
    source, target, max_side, quality, upright = job
    target = Path(target)
    if target.exists():
        return "skipped"
    tmp = target.with_name(f".{target.name}.tmp")
    # Shrinking is the way `data check` gives for an image over PIL's decompression-bomb limit: read
    # it (a JPEG DCT-scaled by draft, at 1/64 of its pixels).
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(source) as image:
            image.draft("RGB", (max_side, max_side))  # DCT-scaled decode when it shrinks a lot
            deep = is_16_bit_grey(image)
            if upright:
                image = ImageOps.exif_transpose(image)
            image = as_the_loaders_read(image, deep)  # CMYK, grey, palette, 16-bit, PNG-in-disguise: RGB JPEGs
            if max(image.size) > max_side:
                scale = max_side / max(image.size)
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                     Image.BICUBIC, reducing_gap=3.0)
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(tmp, "JPEG", quality=quality)
        os.replace(tmp, target)  # never a half-written image under its real name
        return "written"
    except Exception as err:  # noqa: BLE001 - report the file, go on with the rest
        tmp.unlink(missing_ok=True)
        if stops_writing(err):  # the target's disk: every other image would fail alike
            return f"unwritable: {err.strerror}"
        return f"failed: {type(err).__name__}: {err}"
    except BaseException:  # Ctrl-C (it reaches the workers too): no half-written copy left
        tmp.unlink(missing_ok=True)
        raise
    finally:
        Image.MAX_IMAGE_PIXELS = limit


_SETTINGS_FILE = ".fastrsb-shrink.json"  # a dot-file: the loaders and data check skip it


def _claim_target(target: Path, source: Path, settings: dict) -> None:
    """Record the source and settings a target is written with. A rerun with others would skip
    the files already there and mix two sizes (or two data sets) in one without a word, so it is
    refused; so is a target that holds files no shrink wrote (they would pass for shrunk ones)."""
    marker = target / _SETTINGS_FILE
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("source", str(source)) != str(source):  # (a target written before the source was recorded)
            raise UserError(f"{target} is a shrunk copy of {saved['source']}: write a copy of {source} to another "
                            "target")
        if {k: v for k, v in saved.items() if k != "source"} != settings:
            upright = " --upright" if saved.get("upright") else ""
            raise UserError(f"{target} was written with --max-side {saved['max_side']} --quality {saved['quality']}"
                            f"{upright}: rerun with those to finish it, or write the new settings to another target")
        return
    if target.is_dir() and (held := sorted(p.name for p in target.iterdir())):
        raise UserError(f"{target} holds files that no `fastrsb data shrink` wrote ({held[0]}, ...): a file there "
                        "under an image's name would be taken for its shrunk copy; write to a new or empty folder")
    make_folder(target, "the target")
    marker.write_text(json.dumps({**settings, "source": str(source)}) + "\n")


def shrink(source: str | Path, target: str | Path, max_side: int = 500, quality: int = 90,
           workers: int | None = None, upright: bool = False) -> dict:
    """A copy of SOURCE's image tree under TARGET with every image re-encoded as an RGB JPEG whose
    longer side is at most `max_side` (names and folders kept, so it is still an ImageFolder).
    upright: images turned as their EXIF orientation says (else their pixels as stored, as the
    loaders and timm read them). Resumable: images already in TARGET are skipped."""
    source, target = Path(source).resolve(), Path(target).resolve()
    if not source.is_dir():
        raise UserError(no_folder(source, "source folder"))
    if target == source or source in target.parents:
        raise UserError(f"the target {target} must lie outside the source {source}")
    if not 16 <= max_side <= 100_000 or not 1 <= quality <= 100:
        raise UserError(f"--max-side must be >= 16 and --quality 1..100 (got {max_side}, {quality})")
    # "upright" recorded only when set: a target written before the option existed still matches.
    jobs = _shrink_jobs(source, target, max_side, quality, upright)  # refused before the target is touched
    _claim_target(target, source, {"max_side": max_side, "quality": quality, **({"upright": True} if upright else {})})
    with FolderLock(target, "fastrsb data shrink"):
        return _shrink_into(jobs, target, workers)


def _refuse_what_a_copy_would_hide(dirpath: str, names: list[str], walked: dict[str, str]) -> None:
    """What the loaders refuse in a data folder, and a copy of plain files would hide from them: a
    folder reached twice (a link from one class's folder into another's: in the copy, its images
    twice, under two labels) and a link to nothing (a class on a disk not mounted: left out of the
    copy). walked: the real path of each folder walked so far, and the path it was walked by."""
    real = os.path.realpath(dirpath)
    first = walked.setdefault(real, dirpath)
    if first != dirpath:
        raise UserError(f"{first} and {dirpath} are one folder ({real}): the copy would hold its images twice (in a "
                        "data folder, under two classes' labels); remove the link")
    for name in names:  # os.walk lists a link to nothing with the files; an image's is named when it fails
        path = os.path.join(dirpath, name)
        if not name.lower().endswith(IMAGE_EXTENSIONS) and os.path.islink(path) and not os.path.exists(path):
            raise UserError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: the copy would "
                            "leave out what it held; mount or restore what it links to, or remove the link")


def _shrink_jobs(source: Path, target: Path, max_side: int, quality: int, upright: bool) -> list[tuple]:
    """A job an image: what the loaders would read in SOURCE (symlinked folders too), and where its
    copy goes."""
    jobs, walked = [], {}
    for dirpath, names in walk_files(source):
        _refuse_what_a_copy_would_hide(dirpath, names, walked)
        for name in sorted(names):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = Path(dirpath) / name
                jobs.append((str(path), str(target / path.relative_to(source)), max_side, quality, upright))
    return jobs


def _shrink_into(jobs: list[tuple], target: Path, workers: int | None) -> dict:
    counts = {"written": 0, "skipped": 0, "failed": 0}
    failures = []
    progress = Progress("shrinking", len(jobs), unit="files")
    with closing(each_result(_shrink_one, jobs, _workers(workers), chunksize=64)) as results:
        for done, (job, result) in enumerate(zip(jobs, results), 1):
            kind = result.split(":")[0]
            if kind == "unwritable":
                progress.close()
                raise write_stopped(target, result.removeprefix("unwritable: "),
                                    "the images written so far (skipped by the next run) are")
            counts[kind] += 1
            if kind == "failed":
                failures.append(f"{job[0]} ({result.removeprefix('failed: ')})")
            if done % 500 == 0 or done == len(jobs):
                progress.update(done, done / (time.perf_counter() - progress.start))
    progress.close()
    print(f"{target}: {counts['written']:,} written, {counts['skipped']:,} already there, {counts['failed']:,} failed")
    for failure in failures[:20]:
        print(f"  cannot read {failure}")
    return {**counts, "failures": failures}
