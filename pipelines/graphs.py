"""The DALI graphs: what happens to each image between the file and the batch.

Both graphs run the same operators on the GPU ("mixed" nvJPEG/hardware-JPEG decoding, GPU
resize) or on the CPU (`device="cpu"`, built with `device_id=None`), and both emit HWC images,
which torch sees as an NCHW view that is already channels-last: no copy per batch.
"""
from __future__ import annotations

import math

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

from .cpu_resize import eval_resize_and_crop, resize_square
from .randaugment import parse_rand_augment, rand_augment, rand_augment_batched, rand_augment_draws

# ImageNet mean/std on the 0-255 scale the decoders produce.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
READER_NAME = "Reader"

PIXEL_DTYPES = {"float16": types.FLOAT16, "float32": types.FLOAT}


def _decoder_device(device: str) -> str:
    return "mixed" if device == "cuda" else "cpu"


def _read(files, labels, device, shard_id, num_shards, train, shuffle_seed):
    # Training: shuffle_after_epoch reshuffles the whole list every epoch with the same seed on
    # every rank, so shards stay disjoint and complete (random_shuffle only shuffles inside a
    # 1024-image buffer: epochs would come in nearly the same order); each pipeline keeps its shard.
    # Both: the shard's last batch is padded (its last sample repeated) instead of filled from the
    # next reshuffle, so that every epoch of the reader is one reshuffle of its shard; the loader
    # leaves the padding out (validation) or skips that batch (training: loader.DaliLoader).
    order = {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": shuffle_seed} if train else {}
    jpegs, labels = fn.readers.file(
        files=files, labels=labels, name=READER_NAME, shard_id=shard_id, num_shards=num_shards,
        pad_last_batch=True, stick_to_shard=not train, **order)
    labels = fn.cast(labels, dtype=types.INT64)
    if device == "cuda":
        labels = labels.gpu()
    return jpegs, fn.reshape(labels, shape=[])  # (N, 1) int32 -> (N,) int64: no conversion in torch


# Pixels as stored, whatever the file's EXIF orientation says: timm decodes with PIL, whose
# Image.open ignores that tag, and DALI's decoders (and peek_image_shape) would otherwise rotate or
# mirror such an image, a portrait photo stored sideways then training and testing upright.
AS_STORED = {"adjust_orientation": False}


def _decoder_args(device: str, hw_decoder_load: float) -> dict:
    """Every decoder's arguments: pixels as stored, and on the GPU the hardware engines' share.
    hw_decoder_load: the share of each batch sent to the hardware JPEG engines (A100/H100); the
    rest goes to nvJPEG's CUDA path, whose Huffman stage runs on CPU threads. That path's buffers
    keep DALI's defaults (16 MiB device, 2 x 8 MiB pinned host per thread, grown when an image
    needs more): it preallocates the padding per thread, and the 201 MB / 134 MB of NVIDIA's older
    ImageNet examples cost 16 threads 3.2 GiB of GPU memory (the H200 at 915cdf8: 4.1 GiB at
    hw_decoder_load 0.9, 1.16 GiB at 1.0, where that path never runs)."""
    return {**AS_STORED, **({"hw_decoder_load": hw_decoder_load} if device == "cuda" else {})}


def _normalize(images, dtype, mirror=None):
    extra = {"mirror": mirror} if mirror is not None else {}
    return fn.crop_mirror_normalize(images, dtype=PIXEL_DTYPES[dtype], output_layout="HWC",
                                    mean=IMAGENET_MEAN, std=IMAGENET_STD, **extra)


_CROP = dict(random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)


_INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def _interpolation(interpolation: str):
    """The crop's resampling as DALI's interp_type values: a constant, or for "random" a
    per-sample draw (int32) of bilinear or bicubic with equal odds, as timm's
    RandomResizedCropAndInterpolation draws for each image under its default, "random"."""
    if interpolation != "random":
        return _INTERP[interpolation]
    return fn.random.choice([int(types.INTERP_LINEAR), int(types.INTERP_CUBIC)])


def _interp_type(interp):
    """For DALI's resampling operators: a drawn value cast to their type, a constant as it is."""
    return interp if isinstance(interp, types.DALIInterpType) else fn.cast(interp, dtype=types.INTERP_TYPE)


def _resize(images, img_size, device, interpolation):
    """The random crop to img_size x img_size, antialiased, resampled as `interpolation` says:
    DALI's resize on the GPU, torch's uint8 kernels on the CPU (cpu_resize.py: 7x faster there,
    and closer to PIL's)."""
    interp = _interpolation(interpolation)
    if device == "cpu":
        return resize_square(images, img_size, interp)
    return fn.resize(images, size=[img_size, img_size], interp_type=_interp_type(interp), antialias=True)


def _random_resized_crop(decoded, img_size, device, interpolation):
    """One random-resized-crop view of decoded images (repeated augmentation cuts several)."""
    if device == "cpu":
        anchor, shape = fn.random_crop_generator(decoded.shape(), **_CROP)
        return _resize(fn.slice(decoded, start=anchor, shape=shape, axes=[0, 1]), img_size, device, interpolation)
    return fn.random_resized_crop(decoded, size=[img_size, img_size],
                                  interp_type=_interp_type(_interpolation(interpolation)), antialias=True, **_CROP)


@pipeline_def(enable_conditionals=True)  # RandAugment picks an op per sample with DALI conditionals
def train_pipeline(files, labels, img_size, device, shard_id, num_shards, shuffle_seed,
                   hw_decoder_load, dtype, repeats=1, aa=None, aa_impl="tree", interpolation="random",
                   aa_interpolation=None):
    """Random-resized-crop, horizontal flip, normalize.

    repeats == 1: decode only the random crop (ROI decoding). repeats = R > 1 (repeated
    augmentation): decode each image once and cut R independent crops/flips from it; the R views
    are stacked per sample, (R, H, W, C), so torch sees R * batch images by a reshape (a view).
    interpolation: how each crop is resampled: "random" (bilinear or bicubic, drawn per view, as
    timm's default train interpolation), "bilinear" or "bicubic".
    aa: timm's RandAugment string (e.g. rand-m6-mstd0.5-inc1), applied to each view at img_size;
    its geometric ops resample as aa_interpolation says (default: `interpolation`, as in timm).
    aa_impl: "tree" (conditionals: each op on its own samples) or "batch" (every op batch-wide
    with neutral parameters): the same policy, pixels within one level (randaugment.py); "torch":
    the pipeline only draws (each view's flip, ops and magnitudes, a third output "draws") and
    hands over uint8 HWC views, for pipelines/torch_augment.py to apply where the batch is."""
    policy = parse_rand_augment(aa) if aa else None
    apply = rand_augment_batched if aa_impl == "batch" else rand_augment
    in_torch = policy is not None and aa_impl == "torch"
    aa_interpolation = aa_interpolation or interpolation

    def finish(view):  # one view: (images, draws or None)
        if in_torch:
            draws = rand_augment_draws(policy, aa_interpolation)
            return view, draws.gpu() if device == "cuda" else draws
        augmented = apply(view, policy, img_size, interpolation=aa_interpolation) if policy else view
        return _normalize(augmented, dtype, fn.random.coin_flip(probability=0.5)), None

    jpegs, labels = _read(files, labels, device, shard_id, num_shards, True, shuffle_seed)
    if repeats == 1:
        images = fn.decoders.image_random_crop(jpegs, device=_decoder_device(device), output_type=types.RGB,
                                               **_CROP, **_decoder_args(device, hw_decoder_load))
        images, draws = finish(_resize(images, img_size, device, interpolation))
        return (images, labels, draws) if in_torch else (images, labels)
    decoded = fn.decoders.image(jpegs, device=_decoder_device(device), output_type=types.RGB,
                                **_decoder_args(device, hw_decoder_load))
    views = [finish(_random_resized_crop(decoded, img_size, device, interpolation)) for _ in range(repeats)]
    stacked = fn.stack(*[images for images, _ in views]), fn.stack(*([labels] * repeats))
    return (*stacked, fn.stack(*[draws for _, draws in views])) if in_torch else stacked


def val_resize_size(img_size: int, crop_pct: float) -> int:
    """timm's eval transform: resize the shorter side to floor(img_size / crop_pct)."""
    return math.floor(img_size / crop_pct)


def _half_even(x):
    """Python's round() of x / 2 for an integer-valued x (a DataNode): torchvision's CenterCrop
    places the crop at round((in - crop) / 2), with ties to even."""
    half = dmath.floor(x / 2)
    odd = x - 2 * half
    return half + odd * (half - 2 * dmath.floor(half / 2))


def _timm_eval_resize_and_crop(jpegs, images, img_size, crop_pct):
    """Exactly timm's eval geometry: shorter side to floor(img_size / crop_pct), the longer side
    to floor(resize * long / short) (torchvision truncates where DALI's resize_shorter rounds),
    then a centre crop at torchvision's anchor."""
    resize = val_resize_size(img_size, crop_pct)
    shape = fn.peek_image_shape(jpegs, **AS_STORED)  # (H, W, C) as the decoder gives it, from the header
    height = fn.cast(shape[0], dtype=types.FLOAT)
    width = fn.cast(shape[1], dtype=types.FLOAT)
    short = dmath.min(height, width)
    out_h, out_w = dmath.floor(resize * height / short), dmath.floor(resize * width / short)
    images = fn.resize(images, size=fn.stack(out_h, out_w), interp_type=types.INTERP_CUBIC, antialias=True)
    start = fn.cast(fn.stack(_half_even(out_h - img_size), _half_even(out_w - img_size)), dtype=types.INT32)
    return fn.slice(images, start=start, shape=[img_size, img_size], axes=[0, 1])


@pipeline_def
def val_pipeline(files, labels, img_size, crop_pct, device, shard_id, num_shards,
                 hw_decoder_load, dtype):
    """timm's eval transform: bicubic antialiased resize of the shorter side to
    floor(img_size / crop_pct), centre crop img_size, normalize."""
    jpegs, labels = _read(files, labels, device, shard_id, num_shards, False, None)
    images = fn.decoders.image(jpegs, device=_decoder_device(device), output_type=types.RGB,
                               **_decoder_args(device, hw_decoder_load))
    if device == "cpu":  # torch's bicubic kernel (cpu_resize.py): DALI's CPU one is ~10x slower
        images = eval_resize_and_crop(images, img_size, val_resize_size(img_size, crop_pct))
    else:
        images = _timm_eval_resize_and_crop(jpegs, images, img_size, crop_pct)
    return _normalize(images, dtype), labels
