"""The index each class gets, in fastrsb and in timm. fastrsb indexes a data folder's classes in
sorted order, as torchvision's ImageFolder does. timm's ImageFolder indexes them in natural order
(timm.utils.natural_key: case aside, a run of digits compared as a number: 'a' before 'B', 'c2'
before 'c10'), or by the --class-map its train.py was given. The two agree on ImageNet's wnids
(n01440764, ...: one case, digits of one width) and differ on many other data sets, where weights
read in the other's order classify every image under another class's name. So where weights cross
between the two, classes go by name: `fastrsb export` writes its classifier in timm's order,
timm's checkpoints and folders that name no classes are read in it, and weights that name theirs
are matched to a data folder's classes by name."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from fastrsb.errors import UserError
from fastrsb.pipelines import ImageList


def timm_order(classes: list[str], class_map: dict[str, int] | None = None) -> list[str]:
    """CLASSES by the index timm's ImageFolder gives them: by CLASS_MAP ({name: index}, as timm's
    load_class_map reads --class-map), else in natural order (names equal but for case, which
    timm leaves in no fixed order, in sorted order)."""
    if class_map is not None:
        return [name for name, _ in sorted(class_map.items(), key=lambda item: item[1])]
    from timm.utils import natural_key
    return sorted(sorted(classes), key=natural_key)


def read_class_map(name: str, places: list[Path]) -> dict[str, int]:
    """The class map train.py was given (--class-map NAME: a .txt of a class name a line, or timm's
    .pkl), read by timm's own load_class_map from where it is found: NAME, else NAME under one of
    PLACES (train.py looks under its data folder); one line saying where it was looked for where it
    is nowhere, or what is wrong with it."""
    from timm.data.readers.class_map import load_class_map
    found = next((path for path in [Path(name), *(place / name for place in places)] if path.is_file()), None)
    if found is None:
        raise UserError(f"the checkpoint was trained with --class-map {name}, which sets which class each output is; "
                        f"it is not at {', '.join(str(p) for p in [Path(name), *(p / name for p in places)])}: "
                        "put it there to read the checkpoint's classes")
    try:
        class_map = load_class_map(str(found))
    except (OSError, ValueError, AssertionError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read the class map {found}: {err}") from None
    if sorted(class_map.values()) != list(range(len(class_map))):
        raise UserError(f"the class map {found} does not give its {len(class_map)} classes the indices 0 to "
                        f"{len(class_map) - 1} once each")
    return class_map


def relabelled(images: ImageList, classes: list[str]) -> ImageList:
    """IMAGES, each labelled by its class's index in CLASSES (the class names by index); images of
    a class CLASSES lacks are left out, as timm leaves out those its class map lacks."""
    index = {name: i for i, name in enumerate(classes)}
    kept = [(path, index[images.classes[label]]) for path, label in zip(images.files, images.labels)
            if images.classes[label] in index]
    return ImageList([path for path, _ in kept], [label for _, label in kept], list(classes))


def imagenet_classes() -> list[str]:
    """ImageNet-1k's wnids, sorted: the order its classifiers index them in (timm's, torchvision's)."""
    from timm.data import ImageNetInfo
    return ImageNetInfo().label_names()


def named_by_index(folders: list[str], count: int) -> bool:
    """Whether class FOLDERS are named by class index, "0" to str(COUNT - 1), as ImageNet-V2's are
    (its folder k holds class k's images: ImageNet's classes in the order timm's tools index them)."""
    return bool(folders) and all(re.fullmatch("0|[1-9][0-9]*", name) and int(name) < count for name in folders)


def by_index(images: ImageList, classes: list[str] | None, count: int) -> ImageList:
    """IMAGES of folders named by index (named_by_index), each labelled by the output of weights
    classifying CLASSES (by output; None: COUNT classes that name none, output k being class k)
    that folder's index stands for: the class of that index in timm's order of them."""
    if classes is None:
        names = [str(index) for index in range(count)]
        return ImageList(images.files, [int(images.classes[label]) for label in images.labels], names)
    output = {name: i for i, name in enumerate(classes)}
    by_timm_index = [output[name] for name in timm_order(classes)]
    labels = [by_timm_index[int(images.classes[label])] for label in images.labels]
    return ImageList(images.files, labels, list(classes))


def reordered(weights: dict, rows: set[str], theirs: list[str], ours: list[str]) -> dict:
    """WEIGHTS with the classifier's tensors (their names: ROWS, a row a class) taken from THEIR
    class order into OURS (the same names)."""
    position = {name: i for i, name in enumerate(theirs)}
    order = torch.tensor([position[name] for name in ours])
    return {key: value.index_select(0, order) if key in rows else value for key, value in weights.items()}


def classifier_keys(model: nn.Module) -> set[str]:
    """The state_dict keys of the model's final classifier (timm names its module in pretrained_cfg)."""
    name = getattr(model, "pretrained_cfg", {}).get("classifier")
    if not name:
        raise UserError(f"{type(model).__name__} does not name its classifier: its outputs cannot be matched to "
                        "classes")
    return {key for key in model.state_dict() if key.startswith(f"{name}.")}


def imagenet_descriptions(classes: list[str]) -> dict | None:
    """ImageNet's words for its synsets (n01440764 -> "tench, Tinca tinca"), from timm's own
    tables, where every class is one of ImageNet-1k's wnids."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    known = set(info.label_names())
    if not classes or not all(name in known for name in classes):
        return None
    return {name: info.label_name_to_description(name) for name in classes}


def with_words(name: str, words: str) -> str:
    """A class for a line: its name, and the first of its words where it has them ("n01440764
    (tench)")."""
    return f"{name} ({words.split(',')[0]})" if words else name
