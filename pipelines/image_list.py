"""Which images a loader reads: an ImageFolder-style tree or a file list, listed and checked
before DALI sees it. The one owner of the folder-walking rule (`walk_class`), which `fastrsb data
check` uses too, so that the checker inspects exactly the files the loaders read.

Classes are indexed in sorted order, exactly as torchvision's ImageFolder does, so labels agree
with every other ImageNet tool.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# What the DALI image decoders read (case-insensitive), as torchvision's IMG_EXTENSIONS minus
# the formats DALI cannot decode.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pnm", ".ppm", ".pgm", ".pbm")


# The names timm's folder data sets take for each split (timm.data.dataset_factory), in the order it
# tries them.
SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation", "eval", "evaluation")}


class DatasetError(ValueError):
    """The data folder or file list cannot be used as it is; the message says why."""


@dataclass(frozen=True)
class ImageList:
    """Absolute file paths, their int labels, and the class names indexed by label."""

    files: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.files)


def list_images(root: str | os.PathLike) -> ImageList:
    """List an ImageFolder tree (`root/<class>/<image>`) or a file list (a text file with lines
    `relative/path label`, paths relative to the list's folder)."""
    root = Path(root)
    if root.is_file():
        return _read_file_list(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist")
    classes = class_folders(root)
    if not classes:
        loose = sum(1 for p in root.iterdir() if p.name.lower().endswith(IMAGE_EXTENSIONS) and p.is_file())
        said = f"; it holds {loose:,} image(s) directly, outside any class folder (`fastrsb data check` says more)"
        raise DatasetError(f"{root} has no class folders (expected {root}/<class>/<image>.JPEG){said if loose else ''}")
    _refuse_splits_as_classes(root, classes)
    files, labels, folders = [], [], {}
    for label, name in enumerate(classes):
        found, _ = walk_class(root / name, folders.setdefault(name, {}))
        if not found:
            raise DatasetError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
        files += found
        labels += [label] * len(found)
    if shared := folders_in_two_classes(folders):
        raise DatasetError(shared[0] + (f" (and {len(shared) - 1} more such)" if len(shared) > 1 else ""))
    refuse_names_dali_cannot_take(files)
    return ImageList(files, labels, classes)


def _refuse_splits_as_classes(root: Path, classes: list[str]) -> None:
    """A data folder given where one split is wanted (imagenet/ for imagenet/train/): its train/
    and val/ would be read as two classes of many images each, and a model trained on them."""
    splits = [name for name in classes if name in SPLIT_NAMES["train"] + SPLIT_NAMES["val"]]
    if len(splits) == len(classes) and any(class_folders(root / name) for name in splits):
        raise DatasetError(f"{root} holds {' and '.join(f'{name}/' for name in splits)}, folders of class folders, "
                           f"not classes: give the loader one of them ({root / splits[0]})")


def names_dali_cannot_take(paths: list[str]) -> list[str]:
    """The paths that are not valid UTF-8 (an old archive's Latin-1 names: Python keeps their bytes
    as surrogates), shown with those bytes escaped. DALI's reader takes UTF-8 only: such a name
    failed it with "Unsupported argument type with name files". One encode of them all where none
    is (0.1 s for ImageNet's names)."""
    try:
        "\n".join(paths).encode("utf-8")
        return []
    except UnicodeEncodeError:
        pass
    bad = []
    for path in paths:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            bad.append(path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
    return bad


def refuse_names_dali_cannot_take(paths: list[str]) -> None:
    if bad := names_dali_cannot_take(paths):
        raise DatasetError(f"{len(bad)} file name(s) are not UTF-8, which DALI's reader needs: {bad[0]}"
                           f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} (rename them, e.g. "
                           "convmv -f latin1 -t utf8 -r --notest DIR)")


def class_folders(root: Path, refuse_dangling: bool = True) -> list[str]:
    """The class names under `root`, sorted: its sub-folders (symlinks to folders too), dot-folders
    skipped. A symbolic link whose target is gone (a data set linked together from a disk that is
    not mounted) is refused (`refuse_dangling`; `data check` lists each): skipped as a folder that
    is not there, its class would be left out of training and testing without a word."""
    entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    if refuse_dangling and (dangling := _dangling(entries)):
        more = f" (and {len(dangling) - 1} more there)" if len(dangling) > 1 else ""
        raise DatasetError(f"{dangling[0]}{more}")
    return sorted(e.name for e in entries if e.is_dir())


def dangling_links(root: Path) -> list[str]:
    """What is wrong with each symbolic link in `root` (dot-names skipped) whose target does not exist."""
    return _dangling([e for e in os.scandir(root) if not e.name.startswith(".")])


def _dangling(entries: list[os.DirEntry]) -> list[str]:
    gone = sorted(e.path for e in entries if e.is_symlink() and not os.path.exists(e.path))
    return [f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: its class would be left out; "
            "mount or restore what it links to, or remove the link" for path in gone]


def walk_files(folder: str | os.PathLike, real_folders: dict[str, str] | None = None):
    """(folder, file names) of every folder below `folder`, as the loaders list them: symlinked
    sub-folders followed, a loop of them refused, dot-files and dot-folders skipped. real_folders:
    where given, each folder's real path is added to it, with the path it was walked by."""
    # The real paths of each folder's own and its parents': a link to one of them is a loop, which
    # os.walk would follow ~40 links deep (until the kernel says ELOOP), listing every image below
    # the loop again at each turn, images of other classes under this class's label included.
    above: dict[str, set[str]] = {os.fspath(folder): set()}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        chain = above.pop(dirpath) | {real}
        if real_folders is not None:
            real_folders.setdefault(real, dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in dirnames:
            sub = os.path.join(dirpath, name)
            if (target := os.path.realpath(sub)) in chain:
                link = next((p for p in (Path(sub), *Path(sub).parents) if p.is_symlink()), Path(sub))
                via = "" if link == Path(sub) else f" to {os.path.realpath(link)}, and so {sub}"
                raise DatasetError(f"{link} links{via} back to {target}, which holds it: a loop of symbolic links "
                                   "(its images would be listed again and again): remove the link")
            above[sub] = chain
        yield dirpath, [name for name in filenames if not name.startswith(".")]


def walk_class(folder: Path, real_folders: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """(images, other files) of one class folder, each sorted: every file below it (walk_files,
    which adds the real path of each folder walked to real_folders, where given). Images by
    extension (IMAGE_EXTENSIONS, case-insensitive); the other files are what the loaders skip."""
    images, others = [], []
    for dirpath, names in walk_files(folder, real_folders):
        for name in names:
            (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(os.path.join(dirpath, name))
    return sorted(images), sorted(others)


def folders_in_two_classes(real_folders: dict[str, dict[str, str]]) -> list[str]:
    """What is wrong where one folder of images is walked under two classes (by class: the real
    path of each folder walked for it, and the path it was walked by): a symbolic link from one
    class's folder into another's, which would read each of its images with both labels. One line
    a pair of classes."""
    owner: dict[str, tuple[str, str]] = {}
    found: dict[tuple[str, str], str] = {}
    for name, folders in real_folders.items():
        for real in sorted(folders):  # a folder before its sub-folders: the link's target is named
            first, walked = owner.setdefault(real, (name, folders[real]))
            if first != name and (first, name) not in found:
                found[first, name] = (f"{walked} and {folders[real]} are one folder ({real}), walked under two "
                                      f"classes, {first} and {name} (a symbolic link from one's folder into the "
                                      "other's): each of its images would be read with both labels; remove the link")
    return list(found.values())


def _read_file_list(path: Path) -> ImageList:
    files, labels = [], []
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        if b"\0" in data[:4096]:  # a binary file (an image) where a list or folder belongs
            raise DatasetError(f"{path} is not a file list (text lines 'relative/path label'): a loader reads a "
                               "folder of class folders or such a list") from None
        line = data[:err.start].count(b"\n") + 1  # a list in another encoding: DALI's reader takes UTF-8 names
        raise DatasetError(f"{path}:{line}: not UTF-8 (a Latin-1 file name?), which DALI's reader needs: rename the "
                           "file and write its line in UTF-8") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdecimal():  # not isdigit: "²" is a digit int() refuses
            raise DatasetError(f"{path}:{number}: expected 'relative/path label', got {line!r}")
        file = path.parent / parts[0]
        if not file.is_file():
            raise DatasetError(f"{path}:{number}: no file {file}")
        files.append(str(file))
        labels.append(int(parts[1]))
    if not files:
        raise DatasetError(f"file list {path} names no images")
    count = max(labels) + 1
    missing = sorted(set(range(count)) - set(labels))
    if missing:
        raise DatasetError(f"file list {path}: label(s) {missing[:5]} have no images (labels must run 0..{count - 1})")
    return ImageList(files, labels, [str(i) for i in range(count)])
