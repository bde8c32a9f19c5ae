"""fastrsb's DALI loaders, usable on their own: they depend on DALI, torch and numpy only.

    from fastrsb.pipelines import train_loader, val_loader
    for images, labels in train_loader("imagenet/train", batch_size=256, img_size=160):
        ...  # images: (256, 3, 160, 160) float16 channels-last on the GPU; labels: int64
"""
from .folder import DatasetError, ImageList, list_images
from .graphs import IMAGENET_MEAN, IMAGENET_STD, val_resize_size
from .loader import DaliLoader, train_loader, val_loader

__all__ = ["DatasetError", "ImageList", "list_images", "DaliLoader", "train_loader", "val_loader",
           "IMAGENET_MEAN", "IMAGENET_STD", "val_resize_size"]
