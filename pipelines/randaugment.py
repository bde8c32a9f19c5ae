"""timm's RandAugment (`rand-m6-mstd0.5-inc1` and the rest of its strings) as DALI operators,
running in the GPU pipeline on the GPU and in the CPU pipeline on the CPU.

DALI's stock `auto_aug.rand_augment` is a different policy (no Invert/SolarizeAdd, an identity
op, no magnitude noise, no per-op probability, weaker posterize, one grey fill). This module
follows timm 1.0.31's `timm/data/auto_augment.py` instead, per sample:
- `num_layers` (n, default 2) ops drawn uniformly, with replacement, from the 15 of the chosen set
  ("increasing" with inc1), each applied with probability `prob` (p, default 0.5);
- each op's magnitude drawn from gauss(m, mstd), clipped to [0, mmax] (10), then mapped to the
  op's argument exactly as timm's level functions do (random sign where timm negates);
- geometric ops fill with the ImageNet mean colour (124, 116, 104) and work at the training size.
Differences, measured or inherent: DALI's warp_affine has no bicubic mode, so the geometric ops
always interpolate bilinearly (timm picks bilinear or bicubic at random); Equalize follows OpenCV's
lookup table (DALI's equalize), which maps the cumulative histogram differently from PIL's (mean
difference 3.7 of 255 levels on photos, up to ~10 on narrow-histogram textures: tests/test_randaugment.py); the flip runs after RandAugment instead of before (the same distribution: every geometric
op's sign is symmetric).
"""
from __future__ import annotations

import math

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from .augment_spec import MAX_LEVEL, RandAugmentSpec, parse_rand_augment  # noqa: F401 (re-exported)

FILL = (124, 116, 104)  # timm: round(255 * ImageNet mean)
LUMA = (0.299, 0.587, 0.114)  # PIL's RGB -> L weights (ImageEnhance's grey image)


# --- helpers: uint8 HWC images in, uint8 HWC images out -------------------------------------------

def _float(images):
    return fn.cast(images, dtype=types.FLOAT)


def _to_uint8(values):
    """PIL's uint8 results truncate after clipping (ImagingBlend, point LUTs)."""
    return fn.cast(dmath.floor(dmath.clamp(values, 0.0, 255.0)), dtype=types.UINT8)


def _on(node, images):
    """Per-sample parameters live on the CPU; arithmetic with GPU images needs them on the GPU."""
    return node.gpu() if images.device == "gpu" else node


def _constant(values, shape):
    return types.Constant(np.asarray(values, dtype=np.float32).reshape(shape))


def _luma(images_f):
    """PIL's convert('L'), rounded: L = 0.299 R + 0.587 G + 0.114 B."""
    return dmath.floor(fn.reductions.sum(images_f * _constant(LUMA, (1, 1, 3)), axis_names="C", keep_dims=True) + 0.5)


def _blend(degenerate, images_f, factor, images):
    """PIL's Image.blend(degenerate, image, factor) = degenerate + factor * (image - degenerate)."""
    return _to_uint8(degenerate + _on(factor, images) * (images_f - degenerate))


def _warp(images, a, b, c, d, e, f, size):
    """Output pixel (x, y) takes the input at (a x + b y + c, d x + e y + f), as PIL's AFFINE
    transform; outside the image, the mean colour. warp_affine fills with one scalar only, so the
    image is first framed by a margin of the mean colour (a uint8 slice with per-channel padding)
    wide enough for every op's largest displacement (translate: 0.45 x size), and warped from there."""
    margin = size // 2 + 2
    framed = fn.slice(images, start=[-margin, -margin], shape=[size + 2 * margin, size + 2 * margin], axes=[0, 1],
                      out_of_bounds_policy="pad", fill_values=list(FILL))
    matrix = fn.reshape(fn.stack(*[fn.cast(v, dtype=types.FLOAT) for v in (a, b, c + margin, d, e, f + margin)]),
                        shape=[2, 3])
    return fn.warp_affine(framed, matrix=matrix, size=[size, size], inverse_map=True, fill_value=float(FILL[1]),
                          interp_type=types.INTERP_LINEAR)


# --- the 15 ops: (images, level in [0, mmax], sign in {-1, 1}, spec, size) -> images ------------------

def auto_contrast(images, level, sign, size):
    # ImageOps.autocontrast: stretch each channel's [min, max] to [0, 255]; a flat channel stays.
    low = fn.cast(fn.reductions.min(images, axis_names="HW", keep_dims=True), dtype=types.FLOAT)
    spread = fn.cast(fn.reductions.max(images, axis_names="HW", keep_dims=True), dtype=types.FLOAT) - low
    stretch = spread > 0.0
    if images.device == "cpu":  # one fused pass; its per-channel arguments must live on the CPU
        return fn.normalize(images, mean=low * stretch, stddev=spread * stretch + 255.0 * (spread <= 0.0),
                            scale=255.0, axis_names="HW", dtype=types.UINT8)
    images_f = _float(images)
    scale = 255.0 / (spread + (spread <= 0.0))
    return _to_uint8(stretch * ((images_f - low) * scale) + (spread <= 0.0) * images_f)


def equalize(images, level, sign, size):
    return fn.equalize(images)


def invert(images, level, sign, size):
    return types.Constant(255, dtype=types.UINT8) - images


# Each geometric op is an inverse affine map (a, b, c, d, e, f), as timm's PIL calls build it.

def _rotate_matrix(level, sign, size):
    # PIL's Image.rotate(degrees) about the centre, counter-clockwise.
    theta = -(level / MAX_LEVEL * 30.0 * sign) * (math.pi / 180.0)
    cos, sin = dmath.cos(theta), dmath.sin(theta)
    centre = size / 2.0
    return (cos, sin, cos * -centre + sin * -centre + centre, -sin, cos, -sin * -centre + cos * -centre + centre)


def _shear_x_matrix(level, sign, size):
    return (1.0, level / MAX_LEVEL * 0.3 * sign, 0.0, 0.0, 1.0, 0.0)


def _shear_y_matrix(level, sign, size):
    return (1.0, 0.0, 0.0, level / MAX_LEVEL * 0.3 * sign, 1.0, 0.0)


def _translate_x_matrix(level, sign, size):
    return (1.0, 0.0, level / MAX_LEVEL * 0.45 * sign * size, 0.0, 1.0, 0.0)


def _translate_y_matrix(level, sign, size):
    return (1.0, 0.0, 0.0, 0.0, 1.0, level / MAX_LEVEL * 0.45 * sign * size)


GEOMETRIC = {"Rotate": _rotate_matrix, "ShearX": _shear_x_matrix, "ShearY": _shear_y_matrix,
             "TranslateXRel": _translate_x_matrix, "TranslateYRel": _translate_y_matrix}


def _geometric_op(name):
    return lambda images, level, sign, size: _warp(images, *GEOMETRIC[name](level, sign, size), size)


def geometric(images, level, sign, size, kind):
    """All five geometric ops as one warp: `kind` (per sample, 0-4, in GEOMETRIC's order) picks
    the matrix by arithmetic on per-sample scalars, so the batch is split once for all of them
    (the CPU warp is the costliest op; one call over the combined sub-batch amortizes it)."""
    matrices = [build(level, sign, size) for build in GEOMETRIC.values()]
    chosen = [fn.cast(kind == k, dtype=types.FLOAT) for k in range(len(matrices))]
    entries = [sum(pick * matrix[i] for pick, matrix in zip(chosen, matrices)) for i in range(6)]
    return _warp(images, *entries, size)


def _posterize(images, bits):
    # ImageOps.posterize: keep the top `bits` bits (0 bits: black).
    mask = fn.cast(256.0 - dmath.pow(2.0, 8.0 - bits), dtype=types.UINT8)
    return images & _on(mask, images)


def posterize(images, level, sign, size):
    return _posterize(images, dmath.floor(level / MAX_LEVEL * 4.0))


def posterize_increasing(images, level, sign, size):
    return _posterize(images, 4.0 - dmath.floor(level / MAX_LEVEL * 4.0))


def _solarize(images, threshold):
    # ImageOps.solarize: invert every value >= threshold; for uint8, 255 - x == x XOR 255.
    inverted = fn.cast(images >= _on(threshold, images), dtype=types.UINT8) * types.Constant(255, dtype=types.UINT8)
    return images ^ inverted


def solarize(images, level, sign, size):
    return _solarize(images, dmath.min(256.0, dmath.floor(level / MAX_LEVEL * 256.0)))


def solarize_increasing(images, level, sign, size):
    return _solarize(images, 256.0 - dmath.min(256.0, dmath.floor(level / MAX_LEVEL * 256.0)))


def solarize_add(images, level, sign, size):
    # timm's solarize_add: x + add below 128 (add <= 110, so uint8 cannot overflow: 127 + 110 < 256).
    add = fn.cast(dmath.min(128.0, dmath.floor(level / MAX_LEVEL * 110.0)), dtype=types.UINT8)
    return images + fn.cast(images < types.Constant(128, dtype=types.UINT8), dtype=types.UINT8) * _on(add, images)


def _enhance_factor(level, sign):
    return level / MAX_LEVEL * 1.8 + 0.1


def _enhance_increasing_factor(level, sign):
    return dmath.max(0.1, 1.0 + level / MAX_LEVEL * 0.9 * sign)


# The enhancers use DALI's fused single-pass operators where they compute PIL's formula (their
# uint8 results round where PIL truncates: at most one level apart).

def _color(images, factor):
    # DALI's saturation scales I and Q in YIQ, keeping Y = PIL's luma: grey + factor * (x - grey).
    return fn.saturation(images, saturation=factor)


def _contrast(images, factor):
    # ImageEnhance.Contrast: blend with the image's mean luma, rounded to an integer.
    means = fn.reductions.mean(images, axis_names="HW", dtype=types.FLOAT)
    centre = dmath.floor(fn.reductions.sum(means * _constant(LUMA, (3,)), axes=[0]) + 0.5)
    if images.device == "cpu":  # contrast_center is a CPU argument: fused on the CPU only
        return fn.contrast(images, contrast=factor, contrast_center=centre)
    return _blend(centre, _float(images), factor, images)


def _brightness(images, factor):
    return fn.brightness(images, brightness=factor)


def _sharpness(images, factor, size):
    # ImageEnhance.Sharpness: factor * image + (1 - factor) * SMOOTH(image), one 3x3 filter. PIL
    # leaves the 1-pixel border as it is; here it is filtered too (reflected edges).
    blur = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0
    identity = np.zeros((3, 3), dtype=np.float32)
    identity[1, 1] = 1.0
    kernel = types.Constant(blur) * (1.0 - factor) + types.Constant(identity) * factor
    return fn.filter(images, _on(kernel, images))


def _enhancers(factor_of):
    return {
        "Color": lambda images, level, sign, size: _color(images, factor_of(level, sign)),
        "Contrast": lambda images, level, sign, size: _contrast(images, factor_of(level, sign)),
        "Brightness": lambda images, level, sign, size: _brightness(images, factor_of(level, sign)),
        "Sharpness": lambda images, level, sign, size: _sharpness(images, factor_of(level, sign), size),
    }


OPS = {"AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert,
       **{name: _geometric_op(name) for name in GEOMETRIC},
       "Posterize": posterize, "PosterizeIncreasing": posterize_increasing, "Solarize": solarize,
       "SolarizeIncreasing": solarize_increasing, "SolarizeAdd": solarize_add,
       **_enhancers(_enhance_factor),
       **{f"{name}Increasing": op for name, op in _enhancers(_enhance_increasing_factor).items()},
       "Identity": lambda images, level, sign, size: images}


def _select(ops, low: int, high: int, index, images, level, sign, size, kind):
    """ops[index](...) per sample: a binary tree of DALI conditionals splits the batch."""
    if low == high:
        if ops[low] == "Geometric":
            return geometric(images, level, sign, size, kind)
        return OPS[ops[low]](images, level, sign, size)
    middle = (low + high) // 2
    if index <= middle:
        out = _select(ops, low, middle, index, images, level, sign, size, kind)
    else:
        out = _select(ops, middle + 1, high, index, images, level, sign, size, kind)
    return out


def _magnitude(spec: RandAugmentSpec):
    if spec.magnitude_std == math.inf:
        level = fn.random.uniform(range=[0.0, spec.magnitude])
    elif spec.magnitude_std > 0:
        level = fn.random.normal(mean=spec.magnitude, stddev=spec.magnitude_std)
    else:
        level = fn.random.normal(mean=spec.magnitude, stddev=0.0)  # a per-sample node, like the others
    return dmath.clamp(level, 0.0, spec.magnitude_max)


def rand_augment(images, spec: RandAugmentSpec, size: int):
    """Apply the policy to a batch of uint8 HWC images of size x size (CPU or GPU). Needs a
    pipeline built with enable_conditionals=True."""
    # One draw per layer picks each op with probability prob / len(ops), or none (1 - prob): the
    # same law as timm's uniform choice followed by a prob coin. The geometric ops share one leaf
    # (probability prob * 5 / len(ops)) and a second uniform draw says which of them.
    others = [name for name in spec.ops if name not in GEOMETRIC]
    share = spec.prob / len(spec.ops)
    choices = (*others, "Geometric", "Identity")
    weights = [share] * len(others) + [share * len(GEOMETRIC), 1.0 - spec.prob]
    for _ in range(spec.num_layers):
        index = fn.random.choice(len(choices), p=weights)
        kind = fn.random.uniform(values=list(range(len(GEOMETRIC))), dtype=types.INT32)
        level = _magnitude(spec)
        sign = fn.cast(fn.random.coin_flip(probability=0.5, dtype=types.INT32), dtype=types.FLOAT) * 2.0 - 1.0
        images = _select(choices, 0, len(choices) - 1, index, images, level, sign, size, kind)
    return images
