"""ImageNet as users have it, turned into the folder a run reads: `fastrsb data prepare RAW OUT`.

Recognised layouts (RAW is the folder the download landed in):
- ILSVRC2012 as downloaded: RAW/ILSVRC2012_img_train.tar (a tar of 1,000 per-class tars) or a folder
  of per-class tars (RAW/train/nXXXXXXXX.tar, or RAW/nXXXXXXXX.tar), with the validation images in
  RAW/ILSVRC2012_img_val.tar or a flat RAW/val/, labelled by RAW/LOC_val_solution.csv, by
  RAW/ILSVRC2012_devkit_t12.tar.gz (its ground truth, with the class order of its meta.mat: scipy),
  or by the devkit's ILSVRC2012_validation_ground_truth.txt with --synsets;
- Kaggle's: RAW/ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/} with RAW/LOC_val_solution.csv;
- the Hugging Face hub's: ILSVRC/imagenet-1k's tar.gz archives (RAW/[data/]train_images_N.tar.gz,
  val_images.tar.gz) or timm/imagenet-1k-wds's shards (imagenet1k-train-NNNN.tar,
  imagenet1k-validation-NN.tar), labelled inside (fastrsb.hub_imagenet).
OUT gets OUT/train/<wnid>/*.JPEG and OUT/val/<wnid>/*.JPEG. The input is only read. Each class is
written to a hidden folder and renamed when complete, so an interrupted run is finished by
running it again (what is done is skipped, once checked to hold the download's images: names and
sizes, read from the tar headers); classes are extracted in parallel processes.
"""
from __future__ import annotations

import io
import os
import shutil
import tarfile
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from fastrsb import hub_imagenet
from fastrsb.errors import UserError
from fastrsb.file_jobs import (default_workers, each_result, foreign_classes, link_or_copy, make_folder,
                               nearest_existing, not_these_files, stops_writing, write_stopped)
from fastrsb.folder_lock import FolderLock
from fastrsb.progress import Progress

LABEL_FILES = ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt")
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"  # holds data/ILSVRC2012_validation_ground_truth.txt and data/meta.mat


@dataclass
class RawLayout:
    kind: str  # "ILSVRC2012 tars", "Kaggle" or "Hugging Face (<the copy>)"
    train_tar: Path | None = None  # the tar of per-class tars
    class_tars: list[Path] = field(default_factory=list)  # per-class tars in a folder
    class_dirs: Path | None = None  # Kaggle: train/<wnid>/
    val_tar: Path | None = None
    val_flat: Path | None = None
    labels: Path | None = None
    devkit: Path | None = None  # the devkit tar: the val labels and the synsets' ID order
    hub: hub_imagenet.HubCopy | None = None  # the Hugging Face hub's copy, and its archives:
    hub_train: list[Path] = field(default_factory=list)
    hub_val: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        if self.hub:
            return (f"{self.kind}: train from {len(self.hub_train)} archive(s) in {self.hub_train[0].parent}, val from "
                    f"{len(self.hub_val) or 'no'} archive(s), labels from the archives themselves")
        train = self.train_tar or (f"{len(self.class_tars)} class tars" if self.class_tars else self.class_dirs)
        val = self.val_tar or self.val_flat or "no validation images"
        return f"{self.kind}: train from {train}, val from {val}, labels from {self.labels or self.devkit or 'no label file'}"


def recognise(raw: Path) -> RawLayout | None:
    """The download layout of RAW, or None if it is none of those fastrsb knows."""
    if not raw.is_dir():
        return None
    labels = next((raw / name for name in LABEL_FILES if (raw / name).is_file()), None)
    kaggle = raw / "ILSVRC" / "Data" / "CLS-LOC"
    if (kaggle / "train").is_dir():
        return RawLayout("Kaggle", class_dirs=kaggle / "train", val_flat=kaggle / "val" if (kaggle / "val").is_dir()
                         else None, labels=labels)
    train_tar = raw / "ILSVRC2012_img_train.tar"
    class_tars = sorted((raw / "train").glob("n*.tar")) if (raw / "train").is_dir() else sorted(raw.glob("n*.tar"))
    if not train_tar.is_file() and not class_tars:
        found = hub_imagenet.find_archives(raw)
        if found is None:
            return None
        hub, train, val = found
        return RawLayout(f"Hugging Face ({hub.name})", hub=hub, hub_train=train, hub_val=val)
    val_tar = raw / "ILSVRC2012_img_val.tar"
    flat = raw / "val" if (raw / "val").is_dir() and any(p.is_file() for p in (raw / "val").iterdir()) else None
    return RawLayout("ILSVRC2012 tars", train_tar=train_tar if train_tar.is_file() else None, class_tars=class_tars,
                     val_tar=val_tar if val_tar.is_file() else None, val_flat=flat, labels=labels,
                     devkit=raw / DEVKIT if (raw / DEVKIT).is_file() else None)


def hint(root: Path) -> str:
    """' (... run: fastrsb data prepare ...)' for a folder that is a raw download, else ''."""
    layout = recognise(root)
    if layout is None:
        return ""
    return (f"; it looks like ImageNet as downloaded ({layout.kind}): make the folder a run reads with "
            f"fastrsb data prepare {root} {root.parent / (root.name + '-prepared')}")


# --- train: one job per class -------------------------------------------------------------------

def _source_images(kind: str, source: str, offset: int, size: int | None) -> dict[str, int]:
    """{file name: bytes} of the images one class's source holds, as _write_class writes them; for
    a tar, read from its headers alone (a class's 140 MB are not read to check it)."""
    if kind == "dir":
        return {p.name: p.stat().st_size for p in Path(source).iterdir() if p.is_file()}
    images = {}
    with open(source, "rb") as f:
        f.seek(offset)  # tarfile reads from where the file stands: the inner tar's first header
        with tarfile.open(fileobj=f, mode="r:*") as inner:  # compressed too, as _write_class reads it
            for member in inner:
                if size is not None and inner.fileobj is f and member.offset >= offset + size:
                    break  # past a plain inner tar: the outer tar's next member
                if member.isfile():
                    images[Path(member.name).name] = member.size
    return images


def _not_from_source(job: tuple) -> list[str]:
    """The entries of an existing OUT/train/<wnid>/ that are not its source's images (name and
    size): another data set's files, which a resume must not take for this class."""
    kind, source, offset, size, target = job
    return not_these_files(Path(target), _source_images(kind, source, offset, size))


def _write_class(job: tuple) -> str:
    """Extract (or link) one class into OUT/train/<wnid>/ through a hidden folder renamed at the
    end. job: (kind, source, offset, size, target). Returns 'done', 'skipped' (there already, with
    the source's images), 'foreign: why' or 'failed: why'."""
    kind, source, offset, size, target = job
    target = Path(target)
    if target.is_dir():
        try:
            foreign = _not_from_source(job)
        except (tarfile.TarError, EOFError, OSError) as err:
            return f"failed: {source}{f' (member at byte {offset})' if offset else ''}: {type(err).__name__}: {err}"
        if foreign:
            return (f"foreign: {target} holds {len(foreign):,} file(s) that are not the download's images of "
                    f"{target.name}, e.g. {foreign[0]}")
        return "skipped"
    if target.exists():
        return f"foreign: {target} is a file, where the class folder goes"
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        if kind == "dir":  # Kaggle: hard links where OUT is on the same file system, else copies
            for image in sorted(Path(source).iterdir()):
                link_or_copy(image, partial / image.name)
        else:  # a per-class tar: a whole file, or a member of the outer tar at `offset`
            with open(source, "rb") as f:
                f.seek(offset)
                data = f.read(size) if size is not None else f.read()
            with tarfile.open(fileobj=io.BytesIO(data)) as inner:
                for member in inner.getmembers():
                    if member.isfile():
                        with inner.extractfile(member) as image:
                            (partial / Path(member.name).name).write_bytes(image.read())
        os.replace(partial, target)
        return "done"
    except (tarfile.TarError, EOFError, OSError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        if stops_writing(err):  # OUT's disk: every other class would fail alike
            return f"unwritable: {err.strerror}"
        return f"failed: {source}{f' (member at byte {offset})' if offset else ''}: {type(err).__name__}: {err}"


def _write_classes(jobs: list[tuple], train: Path, workers: int | None) -> tuple[dict, list[str], list[str]]:
    """Every class job, in parallel processes: ({'done': n, 'skipped': n}, failures, foreign). A
    full disk stops them all; stopped (that, Ctrl-C), the classes half written go."""
    progress, counts = Progress("train classes", len(jobs), unit="classes"), {"done": 0, "skipped": 0}
    failures, foreign = [], []
    try:
        with closing(each_result(_write_class, jobs, default_workers(workers))) \
                as results:
            for done, result in enumerate(results, 1):
                if result.startswith("unwritable"):
                    raise write_stopped(train, result.removeprefix("unwritable: "), "the classes written so far are")
                if result.startswith("failed"):
                    failures.append(result.removeprefix("failed: "))
                elif result.startswith("foreign"):
                    foreign.append(result.removeprefix("foreign: "))
                else:
                    counts[result] += 1
                progress.update(done, done / max(time.perf_counter() - progress.start, 1e-9))
    except BaseException:  # the pool is down by now: no class is being written
        for partial in train.glob(".*.partial"):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        progress.close()
    return counts, failures, foreign


def _train_jobs(layout: RawLayout, out: Path) -> list[tuple]:
    train = out / "train"
    if layout.class_dirs:
        return [("dir", str(d), 0, None, str(train / d.name)) for d in sorted(layout.class_dirs.iterdir()) if d.is_dir()]
    if layout.class_tars:
        return [("tar", str(t), 0, None, str(train / t.stem)) for t in layout.class_tars]
    try:
        with tarfile.open(layout.train_tar) as outer:
            members = [m for m in outer.getmembers() if m.isfile() and m.name.endswith(".tar")]
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"{layout.train_tar} cannot be read as a tar ({type(err).__name__}: {err}): is it truncated? "
                        "Download it again (its size is 147,897,477,120 bytes)") from None
    return [("tar", str(layout.train_tar), m.offset_data, m.size, str(train / Path(m.name).stem)) for m in members]


# --- val ----------------------------------------------------------------------------------------

def _val(layout: RawLayout, out: Path, synsets: Path | None) -> None:
    from fastrsb.prepare import prepare_val
    if layout.val_tar is None and layout.val_flat is None:
        print("no validation images in the download: OUT/val/ is left to you")
        return
    if layout.labels is None and layout.devkit is not None:
        layout.labels, synsets = _from_devkit(layout.devkit, out / ".devkit", synsets)
    if layout.labels is None:
        raise UserError(f"the validation images need their labels: put {' or '.join(LABEL_FILES)} or {DEVKIT} "
                        "beside them")
    flat = layout.val_flat
    if layout.val_tar is not None:  # unpacked once into a hidden folder of OUT (the tar is flat)
        flat = out / ".val-flat"
        if not (flat / ".complete").is_file():
            shutil.rmtree(flat, ignore_errors=True)
            flat.mkdir(parents=True)
            try:
                with tarfile.open(layout.val_tar) as tar:
                    for member in tar.getmembers():
                        if member.isfile():
                            with tar.extractfile(member) as image:
                                (flat / Path(member.name).name).write_bytes(image.read())
            except (tarfile.TarError, EOFError, OSError) as err:
                if stops_writing(err):
                    raise write_stopped(flat, err.strerror, "the train classes are") from None
                raise UserError(f"{layout.val_tar} cannot be read as a tar ({type(err).__name__}: {err}): is it "
                                "truncated? Download it again") from None
            (flat / ".complete").write_text("")
    result = prepare_val(flat, layout.labels, synsets, copy_to=out / "val")
    if result["missing"]:
        raise UserError(f"{result['missing']:,} image(s) named in {layout.labels} are not among the validation images "
                        f"of {layout.val_tar or layout.val_flat}: is it the label file of this download?")
    if layout.val_tar is not None:
        shutil.rmtree(flat)  # our own unpacked copy, not the user's input
    shutil.rmtree(out / ".devkit", ignore_errors=True)


def _from_devkit(devkit: Path, folder: Path, synsets: Path | None) -> tuple[Path, Path]:
    """The devkit's ground truth and meta.mat (the synsets' ID order, unless --synsets gives it),
    copied out of its tar into a hidden folder of OUT."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {"ILSVRC2012_validation_ground_truth.txt", "meta.mat"}
    try:
        with tarfile.open(devkit) as tar:
            for member in tar.getmembers():
                if member.isfile() and Path(member.name).name in wanted:
                    with tar.extractfile(member) as f:
                        (folder / Path(member.name).name).write_bytes(f.read())
    except (tarfile.TarError, EOFError, OSError) as err:
        if stops_writing(err):
            raise write_stopped(folder, err.strerror, "the train classes are") from None
        raise UserError(f"{devkit} cannot be read ({type(err).__name__}: {err}): download it again") from None
    missing = sorted(name for name in wanted if not (folder / name).is_file())
    if missing:
        raise UserError(f"{devkit} holds no {' and no '.join(missing)}: is it ILSVRC2012's devkit (t12)?")
    return folder / "ILSVRC2012_validation_ground_truth.txt", synsets or folder / "meta.mat"


def _check_disk(layout: RawLayout, out: Path) -> None:
    sources = [layout.train_tar, layout.val_tar, *layout.class_tars]
    need = sum(p.stat().st_size for p in sources if p is not None)
    need += hub_imagenet.need_bytes([*layout.hub_train, *layout.hub_val], out)
    if layout.class_dirs:  # hard links cost nothing on one file system; copies cost the images
        same = os.stat(layout.class_dirs).st_dev == os.stat(out if out.exists() else out.parent).st_dev
        need += 0 if same else sum(f.stat().st_size for f in layout.class_dirs.rglob("*") if f.is_file())
    folder = nearest_existing(out)
    free = shutil.disk_usage(folder).free
    if free < need * 1.05:
        raise UserError(f"{folder} has {free / 2**30:,.1f} GiB free and the prepared data set needs about "
                        f"{need / 2**30:,.1f} GiB: free some space or choose another OUT")


def prepare(raw: str | Path, out: str | Path, synsets: str | Path | None = None, workers: int | None = None) -> list[str]:
    """RAW (a download) -> OUT/train/<wnid>/, OUT/val/<wnid>/; returns `data check`'s problems of OUT."""
    raw, out = Path(raw), Path(out)
    layout = recognise(raw)
    if layout is None:
        raise UserError(f"{raw} is not an ImageNet download fastrsb knows (ILSVRC2012_img_train.tar, a folder of "
                        "per-class nXXXXXXXX.tar, Kaggle's ILSVRC/Data/CLS-LOC/, or the Hugging Face hub's "
                        "train_images_N.tar.gz or imagenet1k-train-NNNN.tar): see fastrsb data prepare --help")
    if out.resolve() == raw.resolve() or raw.resolve() in out.resolve().parents:
        raise UserError(f"OUT {out} must lie outside the download {raw} (which is only read)")
    print(f"{raw}: {layout.describe()}")
    make_folder(out, "OUT")
    with FolderLock(out, "fastrsb data prepare"):
        _prepare_into(layout, out, Path(synsets) if synsets else None, workers)
    from fastrsb.data_folder import check
    problems, _ = check(out, decode=False)  # (once the lock is let go: check refuses a folder being written)
    return problems


def _prepare_into(layout: RawLayout, out: Path, synsets: Path | None, workers: int | None) -> None:
    _check_disk(layout, out)
    if layout.hub:
        hub_imagenet.prepare(layout.hub, layout.hub_train, layout.hub_val, out, workers)
        return
    jobs = _train_jobs(layout, out)
    counts, failures, foreign = _write_classes(jobs, out / "train", workers)
    print(f"train: {counts['done']:,} class(es) written, {counts['skipped']:,} already there")
    if foreign:  # left as they are: they are somebody's files
        raise foreign_classes(out / "train", foreign)
    if failures:
        raise UserError(f"{len(failures)} class(es) could not be read: {failures[0]}"
                        f"{f' and {len(failures) - 1} more' if len(failures) > 1 else ''} (is the tar truncated? "
                        "Download it again; the classes written so far stay)")
    _val(layout, out, synsets)
