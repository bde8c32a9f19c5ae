"""fastrsb's DALI loaders, usable on their own: they depend on DALI, torch and numpy only.

    from fastrsb.pipelines import train_loader, val_loader
    for images, labels in train_loader("imagenet/train", batch_size=256, img_size=160):
        ...  # images: (256, 3, 160, 160) float16 channels-last on the GPU; labels: int64

DALI and torch are imported on first use of a loader, so listing folders and catching
DatasetError stay cheap (the command line's `recipe` starts in a fraction of a second).
"""
from .augment_spec import RandAugmentSpec, parse_rand_augment
from .image_list import (IMAGE_EXTENSIONS, DatasetError, ImageList, class_folders, list_images, walk_class,
                         walk_files)

_LAZY = {"DaliLoader": ".loader", "train_loader": ".loader", "val_loader": ".loader", "default_pixel_dtype": ".loader", "default_aa_impl": ".loader",
         "continues_exactly": ".loader",
         "IMAGENET_MEAN": ".graphs", "IMAGENET_STD": ".graphs", "val_resize_size": ".graphs"}

__all__ = ["DatasetError", "ImageList", "list_images", "class_folders", "walk_class", "walk_files", "IMAGE_EXTENSIONS", "RandAugmentSpec", "parse_rand_augment", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
