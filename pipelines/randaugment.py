"""timm's RandAugment (`rand-m6-mstd0.5-inc1` and the rest of its strings) as DALI operators,
running in the GPU pipeline on the GPU and in the CPU pipeline on the CPU.

DALI's stock `auto_aug.rand_augment` is a different policy (no Invert/SolarizeAdd, an identity
op, no magnitude noise, no per-op probability, weaker posterize, one grey fill). This module
follows timm 1.0.31's `timm/data/auto_augment.py` instead, per sample:
- `num_layers` (n, default 2) ops drawn uniformly, with replacement, from the 15 of the chosen set
  ("increasing" with inc1), each applied with probability `prob` (p, default 0.5);
- each op's magnitude drawn from gauss(m, mstd), clipped to [0, mmax] (10), then mapped to the
  op's argument exactly as timm's level functions do (random sign where timm negates);
- geometric ops fill with the ImageNet mean colour (124, 116, 104), work at the training size and
  resample as timm's hparams say: under its default train interpolation ("random", the recipes')
  bilinear or bicubic drawn per op call with equal odds, else the one interpolation named.
Differences, measured or inherent: DALI's bicubic warp is OpenCV's cubic (a = -0.75) on the CPU
and CV-CUDA's Catmull-Rom (a = -0.5) on the GPU where PIL's affine transform takes a = -1 (on the
CPU 0.7-1.7 levels from PIL's bicubic on average, against 1.1-3.6 for a bilinear warp:
tests/test_randaugment.py; on the GPU 0.9-2.4 by a numpy model of its kernel, held by
tests/test_gpu.py), and it costs ~2.8x the bilinear warp on the CPU (~700
against ~250 us an image at 160 px); Equalize follows OpenCV's lookup table (DALI's equalize),
which maps the cumulative histogram differently from PIL's (mean difference 3.7 of 255 levels on
photos, up to ~10 on narrow-histogram textures: tests/test_randaugment.py); the flip runs after
RandAugment instead of before (the same distribution: every geometric op's sign is symmetric).
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


# AutoContrast, Contrast and Color compute on the GPU by other formulas than on the CPU (arithmetic
# where the CPU has fused operators; DALI's saturation where the CPU blends in fixed point). Set,
# the CPU computes the GPU's: the tests hold those to timm's without a GPU.
GPU_FORMULAS_ON_CPU = False


def _gpu_formulas(images) -> bool:
    return images.device == "gpu" or GPU_FORMULAS_ON_CPU


def _constant(values, shape):  # float32 constants of a given shape
    return types.Constant(np.asarray(values, dtype=np.float32).reshape(shape))


def _blend(degenerate, images_f, factor, images):
    """PIL's Image.blend(degenerate, image, factor) = degenerate + factor * (image - degenerate)."""
    return _to_uint8(degenerate + _on(factor, images) * (images_f - degenerate))


# How the geometric ops resample: timm's train interpolation ("random": bilinear or bicubic drawn
# per op call; its RandAugment takes the transform's interpolation unless that is "random").
INTERPOLATIONS = ("random", "bilinear", "bicubic")
_WARP_INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def _warp(images, matrix, size, interp=types.INTERP_LINEAR):
    """Output pixel (x, y) takes the input at matrix @ (x, y, 1) (matrix per sample, (3, 3), an
    affine map), as PIL's AFFINE transform does, bilinear or bicubic (interp: DALI's
    INTERP_LINEAR or INTERP_CUBIC); outside the image, the mean colour.
    DALI's experimental warp_perspective fills per channel and, on the CPU, ran 3.1x faster than
    warp_affine on a mean-colour frame (4,526 vs 1,458 images/s at 160 px, the same pixels within
    one level)."""
    return fn.experimental.warp_perspective(images, matrix=matrix, size=[size, size], inverse_map=True,
                                            interp_type=interp, border_mode="constant",
                                            fill_value=[float(v) for v in FILL], pixel_origin="corner")


# --- the 15 ops: (images, signed level, size) -> images -------------------------------------------
# `signed` is the op's magnitude (in [0, mmax]) times a random sign: the geometric ops and the
# "Increasing" enhancers use the sign as timm's _randomly_negate does; the other ops take the
# magnitude alone (|signed|), as timm draws no sign for them. Every DALI node costs a fixed
# ~50 us plus ~0.4-1.4 us per sample on the CPU whatever it computes (2026-12-01, 2 cores, one
# thread: an arithmetic node on one number per sample, ~50 us at batch 16, ~150 at 256; a
# subscript ~20 at 256), so the per-sample parameters are built with as few nodes as possible.

def _level(signed):
    return dmath.abs(signed)


def auto_contrast(images, signed, size):
    # ImageOps.autocontrast: stretch each channel's [min, max] to [0, 255]; a flat channel stays.
    low = fn.cast(fn.reductions.min(images, axis_names="HW", keep_dims=True), dtype=types.FLOAT)
    spread = fn.cast(fn.reductions.max(images, axis_names="HW", keep_dims=True), dtype=types.FLOAT) - low
    stretch = spread > 0.0
    if not _gpu_formulas(images):  # one fused pass; its per-channel arguments must live on the CPU
        return fn.normalize(images, mean=low * stretch, stddev=spread + (spread <= 0.0) * 255.0,
                            scale=255.0, axis_names="HW", dtype=types.UINT8)
    images_f = _float(images)
    scale = 255.0 / (spread + (spread <= 0.0))
    return _to_uint8(stretch * ((images_f - low) * scale) + (spread <= 0.0) * images_f)


def equalize(images, signed, size):
    return fn.equalize(images)


def invert(images, signed, size):
    return types.Constant(255, dtype=types.UINT8) - images


# Each geometric op is an inverse affine map -- output pixel (x, y) takes the input at
# (a x + b y + c, d x + e y + f) -- as timm's PIL calls build it, written as a 3 x 3 matrix
#   matrix = A + t B + cos(theta) C + sin(theta) D,   t = signed level, theta = t * -3 degrees,
# with constant A, B, C, D per op, so that the matrices of all five come from a handful of nodes.

def _geometric_terms(name: str, size: int) -> np.ndarray:
    """(A, B, C, D) of one op, each (3, 3)."""
    zero = np.zeros((3, 3), dtype=np.float32)
    centre = size / 2.0
    if name == "Rotate":  # PIL's Image.rotate(degrees) about the centre, counter-clockwise
        return np.array([[[0, 0, centre], [0, 0, centre], [0, 0, 1]], zero,
                         [[1, 0, -centre], [0, 1, -centre], [0, 0, 0]],
                         [[0, 1, -centre], [-1, 0, centre], [0, 0, 0]]], dtype=np.float32)
    row, column, per_level = {"ShearX": (0, 1, 0.3), "ShearY": (1, 0, 0.3),  # argument at level 10
                              "TranslateXRel": (0, 2, 0.45 * size), "TranslateYRel": (1, 2, 0.45 * size)}[name]
    slope = zero.copy()
    slope[row, column] = per_level / MAX_LEVEL
    return np.array([np.eye(3), slope, zero, zero], dtype=np.float32)


GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
ROTATE_DEGREES_PER_LEVEL = 30.0 / MAX_LEVEL


def _geometric_matrix(signed, size, kind, names=GEOMETRIC):
    """The inverse-map matrix of the geometric op names[kind] (kind: per-sample int32; None when
    there is one name), picked per sample by arithmetic; all zeros where kind names none of them."""
    terms = np.stack([_geometric_terms(name, size) for name in names])  # (K, 4, 3, 3)
    a, b, c, d = (types.Constant(np.ascontiguousarray(terms[:, i])) for i in range(4))  # each (K, 3, 3)
    theta = signed * (-ROTATE_DEGREES_PER_LEVEL * math.pi / 180.0)
    candidates = a + signed * b + dmath.cos(theta) * c + dmath.sin(theta) * d  # (K, 3, 3)
    if len(names) == 1:
        return fn.reshape(candidates, shape=[3, 3])
    chosen = kind == types.Constant(np.arange(len(names), dtype=np.int32).reshape(-1, 1, 1))
    return fn.reductions.sum(chosen * candidates, axes=[0])


def geometric(images, signed, size, kind, names=GEOMETRIC, interp=types.INTERP_LINEAR):
    """The geometric ops names[kind], all in one warp call: the matrix is picked per sample by
    arithmetic, so the batch is split once for all of them."""
    return _warp(images, _geometric_matrix(signed, size, kind, names), size, interp)


def _geometric_resampled(images, signed, size, kind, names, resample):
    """geometric() resampled as `resample` says: one DALI interp_type for the whole batch, or a
    per-sample bool DataNode, bicubic where True, that splits it in two (DALI conditionals: a
    warp takes one interp_type a call)."""
    if isinstance(resample, types.DALIInterpType):
        return geometric(images, signed, size, kind, names, resample)
    if resample:
        out = geometric(images, signed, size, kind, names, types.INTERP_CUBIC)
    else:
        out = geometric(images, signed, size, kind, names, types.INTERP_LINEAR)
    return out


def _geometric_op(name):
    return lambda images, signed, size: geometric(images, signed, size, None, (name,))


def _posterize(images, bits):
    # ImageOps.posterize: keep the top `bits` bits (0 bits: black).
    mask = fn.cast(256.0 - dmath.pow(2.0, 8.0 - bits), dtype=types.UINT8)
    return images & _on(mask, images)


def _bits(signed):
    return dmath.floor(_level(signed) * (4.0 / MAX_LEVEL))  # timm: int(level / 10 * 4)


def posterize(images, signed, size):
    return _posterize(images, _bits(signed))


def posterize_increasing(images, signed, size):
    return _posterize(images, 4.0 - _bits(signed))


def _solarize(images, threshold):
    # ImageOps.solarize: invert every value >= threshold; for uint8, 255 - x == x XOR 255.
    return images ^ ((images >= _on(threshold, images)) * types.Constant(255, dtype=types.UINT8))


def solarize(images, signed, size):
    return _solarize(images, dmath.min(256.0, dmath.floor(_level(signed) * (256.0 / MAX_LEVEL))))


def solarize_increasing(images, signed, size):
    return _solarize(images, 256.0 - dmath.min(256.0, dmath.floor(_level(signed) * (256.0 / MAX_LEVEL))))


def solarize_add(images, signed, size):
    # timm's solarize_add: x + add below 128 (add <= 110, so uint8 cannot overflow: 127 + 110 < 256).
    add = fn.cast(dmath.min(128.0, dmath.floor(_level(signed) * (110.0 / MAX_LEVEL))), dtype=types.UINT8)
    return images + (images < types.Constant(128, dtype=types.UINT8)) * _on(add, images)


def _enhance_factor(signed):
    return _level(signed) * (1.8 / MAX_LEVEL) + 0.1


def _enhance_increasing_factor(signed):
    return dmath.max(0.1, signed * (0.9 / MAX_LEVEL) + 1.0)


# The enhancers use DALI's fused single-pass operators where they compute PIL's formula (their
# uint8 results round where PIL truncates: at most one level apart), except Color on the CPU.

def _color(images, factor):
    """ImageEnhance.Color: Image.blend(grey, image, factor), grey = PIL's L in every channel."""
    if _gpu_formulas(images):  # DALI's saturation: I and Q scaled in YIQ (Y = PIL's luma), one kernel
        return fn.saturation(images, saturation=factor)
    # On the CPU every DALI conversion of floats to integers costs ~3 ns a value (saturation: ~500 us
    # an image at 160 px), integer arithmetic ~0.5 ns, so the blend runs in 16.16 fixed point:
    # grey + floor((x - grey) * round(factor * 2^16) / 2^16), clamped by the cast, which is PIL's
    # truncated float blend wherever (x - grey) * factor is not within 2^-9 of an integer: ~290 us.
    grey = _int32(fn.color_space_conversion(
        fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY),
        image_type=types.GRAY, output_type=types.RGB))  # PIL's L, +-1, in 3 channels: no broadcast
    weight = fn.cast(factor * 65536.0, dtype=types.INT32)  # the cast rounds to nearest
    blended = ((_int32(images) - grey) * weight >> types.Constant(16, dtype=types.INT32)) + grey
    return fn.cast(blended, dtype=types.UINT8)  # saturates: PIL's clip to 0..255


def _int32(node):
    return fn.cast(node, dtype=types.INT32)


def _contrast(images, factor):
    # ImageEnhance.Contrast: blend with the image's mean luma, rounded to an integer.
    means = fn.reductions.mean(images, axis_names="HW", dtype=types.FLOAT)
    centre = dmath.floor(fn.reductions.sum(means * _constant(LUMA, (3,)), axes=[0]) + 0.5)
    if not _gpu_formulas(images):  # contrast_center is a CPU argument: fused on the CPU only
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
        "Color": lambda images, signed, size: _color(images, factor_of(signed)),
        "Contrast": lambda images, signed, size: _contrast(images, factor_of(signed)),
        "Brightness": lambda images, signed, size: _brightness(images, factor_of(signed)),
        "Sharpness": lambda images, signed, size: _sharpness(images, factor_of(signed), size),
    }


OPS = {"AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert,
       **{name: _geometric_op(name) for name in GEOMETRIC},
       "Posterize": posterize, "PosterizeIncreasing": posterize_increasing, "Solarize": solarize,
       "SolarizeIncreasing": solarize_increasing, "SolarizeAdd": solarize_add,
       **_enhancers(_enhance_factor),
       **{f"{name}Increasing": op for name, op in _enhancers(_enhance_increasing_factor).items()},
       "Identity": lambda images, signed, size: images}


def _split_point(weights, low: int, high: int) -> int:
    """The last leaf of the left half of leaves low..high, halves as equal in probability as can be."""
    total, running, best, best_gap = sum(weights[low:high + 1]), 0.0, low, math.inf
    for i in range(low, high):
        running += weights[i]
        if abs(2 * running - total) < best_gap:
            best, best_gap = i, abs(2 * running - total)
    return best


def _select(leaves, weights, low: int, high: int, index, images, signed, size, resample):
    """Apply leaves[i] to the samples whose op index falls in leaf i's range: a binary tree of
    DALI conditionals splits the batch, each split halving the probability mass, so the likely
    leaves (no op: 1 - prob; the geometric leaf: 5 ops) sit near the root and most samples pass
    few splits. A leaf is (first index, op names); the geometric leaf applies its ops in one call,
    the op picked by index - first, resampled as `resample` says (_geometric_resampled); a leaf of
    no names leaves the images as they are."""
    if low == high:
        first, names = leaves[low]
        if names and names[0] in GEOMETRIC:
            kind = index - first if len(names) > 1 else None
            return _geometric_resampled(images, signed, size, kind, names, resample)
        return OPS[names[0]](images, signed, size) if names else images
    middle = _split_point(weights, low, high)
    if index < leaves[middle + 1][0]:
        out = _select(leaves, weights, low, middle, index, images, signed, size, resample)
    else:
        out = _select(leaves, weights, middle + 1, high, index, images, signed, size, resample)
    return out


def _magnitude(spec: RandAugmentSpec):
    if spec.magnitude_std == math.inf:
        level = fn.random.uniform(range=[0.0, spec.magnitude])
    elif spec.magnitude_std > 0:
        level = fn.random.normal(mean=spec.magnitude, stddev=spec.magnitude_std)
    else:
        level = fn.random.normal(mean=spec.magnitude, stddev=0.0)  # a per-sample node, like the others
    return dmath.clamp(level, 0.0, spec.magnitude_max)


def _policy(spec: RandAugmentSpec):
    """The conditionals tree of one layer: (op names by drawn index, leaves, leaf probabilities,
    the draw's probabilities). One draw per layer picks op i with probability prob / len(ops), or
    none (1 - prob, the last index): the same law as timm's uniform choice followed by a prob
    coin. The geometric ops come last, so that one leaf takes them all."""
    others = tuple(name for name in spec.ops if name not in GEOMETRIC)
    shapes = tuple(name for name in spec.ops if name in GEOMETRIC)
    ordered = others + shapes
    share = spec.prob / len(ordered)
    leaves = [(i, (name,)) for i, name in enumerate(others)] + ([(len(others), shapes)] if shapes else [])
    leaf_weights = [share * len(names) for _, names in leaves]
    leaves.append((len(ordered), ()))  # no op
    leaf_weights.append(1.0 - spec.prob)
    return ordered, leaves, leaf_weights, [share] * len(ordered) + [1.0 - spec.prob]


def _apply_drawn(images, spec: RandAugmentSpec, index, signed, size: int, resample=types.INTERP_LINEAR):
    """ordered[index] (from _policy) applied to each sample, with its signed magnitude; the
    geometric ops resampled as `resample` says (an interp_type, or per sample bicubic: a bool)."""
    _, leaves, leaf_weights, _ = _policy(spec)
    return _select(leaves, leaf_weights, 0, len(leaves) - 1, index, images, signed, size, resample)


def rand_augment(images, spec: RandAugmentSpec, size: int, batched: bool = False, interpolation: str = "random"):
    """Apply the policy to a batch of uint8 HWC images of size x size (CPU or GPU). The tree form
    needs a pipeline built with enable_conditionals=True; batched: every op batch-wide (below).
    interpolation: how the geometric ops resample (INTERPOLATIONS; timm's train interpolation)."""
    apply = _apply_drawn_batched if batched else _apply_drawn
    for _ in range(spec.num_layers):
        index, signed, resample = _draw_layer(spec, interpolation)
        images = apply(images, spec, index, signed, size, resample)
    return images


def _draw_layer(spec: RandAugmentSpec, interpolation: str):
    """One layer's draws, per sample: the op index into _policy's order (the last: none), the
    signed magnitude, and the geometric ops' resampling: for "random", bicubic or not (a bool,
    drawn whatever the op: the same law as timm's draw inside the op), else a fixed interp_type."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {interpolation!r}")
    draw = _policy(spec)[3]
    index = fn.random.choice(len(draw), p=draw)
    signed = _magnitude(spec) * fn.random.uniform(values=[-1.0, 1.0])
    if interpolation != "random":
        return index, signed, _WARP_INTERP[interpolation]
    return index, signed, fn.random.coin_flip(probability=0.5, dtype=types.BOOL)


def draws_per_layer(interpolation: str) -> int:
    """rand_augment_draws' columns for each layer: op index, signed magnitude and, where the
    resampling is drawn ("random"), bicubic (0/1)."""
    return 3 if interpolation == "random" else 2


def rand_augment_draws(spec: RandAugmentSpec, interpolation: str = "random"):
    """For the torch form (pipelines/torch_augment.py): per sample, float32 (1 + layers x
    draws_per_layer,): the flip (0/1), then each layer's op index (into _policy's order; the
    last: none), signed magnitude and, for "random", bicubic (0/1), drawn by rand_augment's law."""
    parts = [fn.cast(fn.random.coin_flip(probability=0.5), dtype=types.FLOAT)]
    for _ in range(spec.num_layers):
        index, signed, resample = _draw_layer(spec, interpolation)
        parts += [fn.cast(index, dtype=types.FLOAT), signed]
        if interpolation == "random":
            parts.append(fn.cast(resample, dtype=types.FLOAT))
    return fn.stack(*parts)


# --- the batch-wide form (meant for the GPU) --------------------------------------------------------
# The tree above splits the batch so that each op runs on its own samples: cheap per pixel, which
# is what the CPU pays for, but ~15 operators each on a sliver of the batch, plus the splits and
# merges, which is what a GPU pays for (launches: A3's RandAugment took the H200 loader from 26.5k
# to 9.1k img/s). Here every op runs once on the whole batch, with parameters that leave a sample
# exactly as it is (tested bit for bit) unless its draw named that op: one warp (identity matrix),
# one float pass for every op that is an affine map of the image, its grey or its equalized copy
# (AutoContrast, Invert, Brightness, Contrast, Color, Equalize), one integer pass for Solarize,
# SolarizeAdd and Posterize (x ^ 0, + 0, x & 255), one 3x3 filter (identity kernel). No conditionals.
# Each DALI arithmetic operator is a node of its own with a buffer of its own (DALI does not fuse
# expressions, and its arithmetic operator refuses a nested one given directly: "Complex
# expression trees are not yet supported", DALI 2.4), so the per-sample parameters are combined
# first, on a number per sample, and the image is touched by as few nodes as possible, in uint8
# where it can be: 20 image-sized nodes a layer, three of them float32 (the first version: 32,
# seventeen float32).
# Measured on the H200 at a70b3c8 it is the slowest form (the loader alone with A3's RandAugment at
# batch 256: 3,529 img/s, the tree 8,870, torch 13,685), though its GPU kernels took only ~7 ms a
# batch in the profile: the likely cost (not yet profiled on the host) is the CPU nodes that compute
# the per-sample parameters, ~150 us each at batch 256 on the CPU here: its graph for A3 has 176
# CPU arithmetic nodes and 37 casts (the tree's, 114 and 5, mostly on subsets of the batch), and
# on 8 x 8 images, where pixels cost nothing, it takes ~52 ms a batch of 256 on one thread here,
# the tree ~26. Kept as an option, tested against the tree; not the default anywhere.

# v - 0.5 + 2**-10, rounded to the nearest integer by the cast to uint8, is floor(v) -- PIL's
# truncation -- for every v whose fraction is below 1 - 2**-10 (exactly so for integer v, the
# untouched samples), in one node fewer than floor then cast, and whatever way the device breaks ties.
_FLOOR_BY_ROUNDING = -0.5 + 2.0 ** -10


def _where(flag, value, neutral):
    """Per sample: `value` where flag (0/1) is 1, else `neutral` (exactly either: 1 * v + 0 * n)."""
    return flag * value + (1.0 - flag) * neutral


def _uint8(node):
    return fn.cast(node, dtype=types.UINT8)


def _apply_drawn_batched(images, spec: RandAugmentSpec, index, signed, size: int, resample=types.INTERP_LINEAR):
    """What _apply_drawn computes (ordered[index] on each sample), batch-wide."""
    ordered = _policy(spec)[0]
    flag = {name: fn.cast(index == ordered.index(name), dtype=types.FLOAT) for name in ordered}

    def is_op(*names):  # 1.0 where the sample drew one of `names` (0.0 if none is in the set)
        present = [flag[n] for n in names if n in flag]
        return sum(present[1:], present[0]) if present else types.Constant(0.0)

    shapes = [name for name in ordered if name in GEOMETRIC]
    if shapes:  # one warp: the drawn geometric op's matrix, the identity for every other sample
        kind = index - ordered.index(shapes[0])
        matrix = _geometric_matrix(signed, size, kind if len(shapes) > 1 else None, tuple(shapes))
        if len(shapes) == 1:
            matrix = matrix * is_op(*shapes)
        identity = types.Constant(np.eye(3, dtype=np.float32))
        drawn = is_op(*shapes)
        images = _warp_batched(images, matrix + (1.0 - drawn) * identity, size, resample, drawn)
    images = _affine_pass(images, spec, flag, is_op, signed)
    images = _integer_pass(images, spec, is_op, signed)
    return _sharpen(images, spec, is_op, signed)


def _warp_batched(images, matrix, size, resample, drawn):
    """One warp of the batch as `resample` says; drawn per sample: both warps (a warp takes one
    interp_type a call), the bicubic one picked in uint8 (x ^ (x ^ y) = y) where the sample drew
    bicubic and a geometric op (`drawn`, 0/1): the others keep the bilinear identity warp, which
    is exact. (A warp and three image-sized uint8 nodes more than one interpolation takes.)"""
    if isinstance(resample, types.DALIInterpType):
        return _warp(images, matrix, size, resample)
    linear = _warp(images, matrix, size, types.INTERP_LINEAR)
    cubic = _warp(images, matrix, size, types.INTERP_CUBIC)
    pick = _uint8(drawn * fn.cast(resample, dtype=types.FLOAT))
    return linear ^ (_on(pick, images) * (linear ^ cubic))


def _affine_pass(images, spec: RandAugmentSpec, flag: dict, is_op, signed):
    """v = A (s - L) + b grey + c, one cast to uint8. s: the image, or its equalized copy where
    the sample drew Equalize (picked in uint8: x ^ (x ^ eq) = eq). Per sample: AutoContrast,
    A = 255 / (max - min) and L = min per channel (a flat channel: A = 1, L = 0); Brightness,
    Contrast, Color with factor f: A = f, and b = 1 - f (Color's grey, PIL's L) or c = (1 - f)
    x the mean grey, rounded (Contrast's); Invert: A = -1, c = 255; otherwise A = 1, b = c = 0."""
    enhance = _enhance_increasing_factor if spec.increasing else _enhance_factor
    color, contrast, bright = (is_op(f"{op}Increasing" if spec.increasing else op)
                               for op in ("Color", "Contrast", "Brightness"))
    factor, invert = enhance(signed), is_op("Invert")
    enhancer = color + contrast + bright
    slope = _where(enhancer, factor, 1.0 - 2.0 * invert)  # one number per sample, on the CPU
    offset = invert * 255.0 + _FLOOR_BY_ROUNDING
    source = images
    if "Equalize" in flag:
        source = images ^ (_on(_uint8(flag["Equalize"]), images) * (images ^ fn.equalize(images)))
    if "AutoContrast" in flag:  # min and max per channel, (1, 1, 3) per sample
        low = fn.reductions.min(images, axis_names="HW", keep_dims=True)
        spread = fn.cast(fn.reductions.max(images, axis_names="HW", keep_dims=True) - low, dtype=types.FLOAT)
        stretch = flag["AutoContrast"] * (spread > 0.0)
        slope = _where(stretch, 255.0 / (spread + (spread <= 0.0)), slope)
        source = source - _uint8(stretch * low)  # >= 0: the stretched channels' samples hold their own min
    value = slope * source
    if any(name in flag for name in ("Color", "Contrast", "ColorIncreasing", "ContrastIncreasing")):
        grey = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)  # PIL's L, +-1
        centre = dmath.floor(fn.reductions.mean(grey, axis_names="HW", keep_dims=True, dtype=types.FLOAT) + 0.5)
        value = value + color * (1.0 - factor) * grey
        offset = offset + contrast * (1.0 - factor) * centre
    return _uint8(value + offset)


def _integer_pass(images, spec: RandAugmentSpec, is_op, signed):
    """Solarize (x ^ 255 from a threshold on; 256: none), SolarizeAdd (+ add below 128) and
    Posterize (x & mask), neutral for every other sample; all in uint8."""
    level = _level(signed)
    solar = is_op("SolarizeIncreasing" if spec.increasing else "Solarize")
    solar_threshold = dmath.min(256.0, dmath.floor(level * (256.0 / MAX_LEVEL)))
    if spec.increasing:
        solar_threshold = 256.0 - solar_threshold
    threshold = _where(solar, solar_threshold, 256.0)
    add = is_op("SolarizeAdd") * dmath.min(128.0, dmath.floor(level * (110.0 / MAX_LEVEL)))
    poster = is_op("PosterizeIncreasing" if spec.increasing else "Posterize")
    bits = 4.0 - _bits(signed) if spec.increasing else _bits(signed)
    mask = _where(poster, 256.0 - dmath.pow(2.0, 8.0 - bits), 255.0)
    x = images & _on(_uint8(mask), images)
    x = x ^ ((x >= _on(threshold, images)) * types.Constant(255, dtype=types.UINT8))  # uint8 >= float: exact
    return x + (x < types.Constant(128, dtype=types.UINT8)) * _on(_uint8(add), images)


def _sharpen(images, spec: RandAugmentSpec, is_op, signed):
    """Sharpness: one 3x3 filter, the identity kernel where the sample drew another op."""
    enhance = _enhance_increasing_factor if spec.increasing else _enhance_factor
    factor = _where(is_op("SharpnessIncreasing" if spec.increasing else "Sharpness"), enhance(signed), 1.0)
    return _sharpness(images, factor, None)  # factor 1: the identity kernel


def rand_augment_batched(images, spec: RandAugmentSpec, size: int, interpolation: str = "random"):
    """rand_augment with every op batch-wide (no conditionals): the same law and the same draws."""
    return rand_augment(images, spec, size, batched=True, interpolation=interpolation)
