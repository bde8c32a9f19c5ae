"""timm's RandAugment in torch, batch-wide, on the uint8 batch a DALI pipeline hands over
(`aa_impl="torch"`), then the flip and ImageNet normalization.

The pipeline decodes, crops and resizes, and draws every sample's ops, magnitudes and flip (so the
draws are DALI's: saved and restored with its checkpoints, seeded per shard); this module applies
them where the batch is, with the same kernels whatever was drawn: per layer one warp (the
geometric ops, on a fixed number of samples, those that drew one first: warp_capacity), one lookup
in a per-sample, per-channel table of 256 values for every op that is a function of the value alone
(AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd, Brightness, Contrast), one blend
with the grey image (Color) and one with the smoothed image (Sharpness), each leaving the samples
that drew another op as they are. No host sync and no shape that depends on the draws, so the GPU
never waits for the host.

Each op computes what PIL computes when timm calls it: the tables and the blends in PIL's integer
and float32 arithmetic (the same values, tested), Equalize with PIL's own table (DALI's follows
OpenCV), Color on PIL's integer grey, Sharpness with PIL's rounded 3x3 smoothing and untouched
border; the warp samples with PIL's bilinear or bicubic filter, per sample as drawn (fill where the
sample point leaves the image, edge pixels repeated inside it, in double as PIL computes). As in the
DALI forms, the flip comes after RandAugment.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .augment_spec import MAX_LEVEL, RandAugmentSpec
from .cuda_graphs import first_line
from .graphs import IMAGENET_MEAN, IMAGENET_STD
from .randaugment import FILL, GEOMETRIC, INTERPOLATIONS, _policy, draws_per_layer


# Compiled or on the CPU (TorchRandAugment.chunk_size), the batch is augmented in chunks of at most
# this many pixels (64 images at 160 px, 32 at 224): every intermediate -- above all the eager
# warp's taps and float64 rows (_resample) -- then takes a chunk's memory, not the batch's, whatever
# the batch size. Measured with benchmarks/augment_memory.py on 2 CPU cores at 459a77c, A3's policy,
# torch's peak in one call (its float32 output included), whole batch -> chunks: at batch 256,
# eager 1,180 -> 374 MB, compiled 648 -> 241 MB (1.75 -> 1.58 s a batch); at A3's batch of 2,048
# (one GPU's share in `fastrsb train a3` on one GPU), eager 9,437 -> 924 MB, compiled 5,181 -> 791
# MB. (Chunks of 32 images: less memory and time on the CPU, but twice the calls on a GPU.) Since
# the geometric ops resample bicubic where drawn (a524a95; both filters on every chunk under the
# "random" interpolation), at batch 256: eager 2,025 -> 585 MB, compiled 353 -> 167 MB, and 3.3 s a
# batch compiled in chunks, where the bilinear-only form took 2.7 s on the same (slow) day.
CHUNK_PIXELS = 64 * 160 * 160

# The warp takes a fixed number of samples a layer (TorchRandAugment._warp): enough that more
# samples of a chunk draw a geometric op with a probability no higher than this. At 1e-15 a chunk
# and layer, an A3 run (128M images: 2M chunks of 64, two layers each) meets such a chunk with a
# probability below 4e-9. At A3's share (a sixth), a chunk of 64 warps 39 samples, a batch of 256
# at once 96 (eager on a GPU), 2,048 482; 16 or fewer, all of them.
WARP_TAIL = 1e-15


class TorchRandAugment:
    """augment(images, draws) -> the batch as the DALI forms hand it over: images (N, H, W, 3)
    uint8 from the pipeline, draws (N, 1 + layers x draws_per_layer(interpolation)) float32 (flip,
    then each layer's op index, signed magnitude and, for "random", bicubic: from
    randaugment.rand_augment_draws with the same interpolation) -> (N, 3, H, W) normalized,
    channels-last, in `dtype`."""

    def __init__(self, spec: RandAugmentSpec, size: int, dtype: torch.dtype, compiled: bool = False,
                 chunk_pixels: int | None = CHUNK_PIXELS, interpolation: str = "random",
                 warp_tail: float = WARP_TAIL):
        """compiled: run through torch.compile (inductor): the ~900 torch calls of A3's policy a batch
        fuse into a handful of loops (13 calls a batch on the CPU; Triton splits loops further on
        the GPU) that read and write the batch a few times in all instead of once per call. The
        eager form's pixels on the CPU (tested); on the GPU held to the CPU's as the eager form
        is (within one level, on under 0.1% of values: tests/test_gpu.py).
        chunk_pixels: augment the batch in chunks of this many pixels or fewer (whole images, at
        least one) where chunks are cheap (chunk_size); None: the whole batch at once. The same
        pixels either way.
        interpolation: how the geometric ops resample: "random" (bilinear or bicubic as each
        sample's draw says), "bilinear" or "bicubic"; as rand_augment_draws was told.
        warp_tail: the warp takes as many samples a chunk as more of them draw a geometric op
        with at most this probability (warp_capacity); 0: every sample, whatever it drew."""
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {interpolation!r}")
        if not 0 <= warp_tail < 1:
            raise ValueError(f"warp_tail is a probability from 0 (every sample warped) to below 1, not {warp_tail}")
        self.spec, self.size, self.dtype, self.interpolation = spec, size, dtype, interpolation
        self.chunk_images = max(1, chunk_pixels // (size * size)) if chunk_pixels else None
        self.ordered = _policy(spec)[0]
        # The chance that a sample draws a geometric op in a layer (each op: prob / len(ops)).
        self.geometric_share = spec.prob * sum(name in GEOMETRIC for name in self.ordered) / len(self.ordered)
        self.warp_tail = warp_tail
        self.compiled = compiled
        self._compiled_ran = False
        self._constants: dict = {}
        # fullgraph: nothing may fall back to Python between kernels (a host sync would hide there);
        # dynamic=False: a train loader's batches all have one shape. The precision casts as eager
        # makes them (no fused multiply-add in Triton), so that a blend truncates as PIL's does.
        # Compiled is the chunk's work (one graph a chunk shape, at most two a batch size), not the
        # batch's: a graph of the whole batch repeats the chunk's graph once a chunk and took 2.7x
        # as long to compile (A3 at batch 256 on 2 CPU cores: 52 s in 4 chunks, against 19 s).
        self._apply = torch.compile(self._augment_chunk, fullgraph=True, dynamic=False,
                                    options=_eager_numerics()) if compiled else self._augment_chunk

    def __call__(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        for key in _CONSTANTS:  # made once per device, outside the compiled region (no recompile)
            self._constant(key, images.device)
        if self.compiled and not self._compiled_ran:  # the first call compiles
            try:
                out = self._augment(images, draws)
            except Exception as err:  # noqa: BLE001 - whatever the compiler met: said once, then eager
                print(f"RandAugment (torch form): could not be compiled ({first_line(err)}); running on "
                      "without compiling", flush=True)
                self.compiled, self._apply = False, self._augment_chunk
                return self._augment(images, draws)  # an error of the form itself is raised here
            self._compiled_ran = True
            return out
        return self._augment(images, draws)

    def chunk_size(self, images: torch.Tensor) -> int:
        """How many images of this batch go through at a time: chunk_images where a chunk costs
        little beyond its pixels -- compiled (a few dozen kernels a chunk), or on the CPU (no
        launches; smaller chunks stay in cache) -- else the whole batch: eager on a GPU, each op is
        a launch, ~900 a chunk, and the host's launches are what that form's speed is (a70b3c8 on
        the H200: 13,685 img/s in the loader, ~20 us a call), so chunks would multiply its time."""
        n = images.shape[0]
        if self.chunk_images is None or (images.device.type != "cpu" and not self.compiled):
            return n
        return min(n, self.chunk_images)

    def _augment(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """The batch, chunk by chunk (CHUNK_PIXELS: every sample's work is its own)."""
        n, height, width, channels = images.shape
        step = self.chunk_size(images)
        if step >= n:
            return self._apply(images, draws)
        # Each chunk's result copied into the batch's output as it comes: the output and one chunk
        # at a time, where joining the results at the end (torch.cat) held the output twice (A3 at
        # batch 2,048 on the CPU, compiled: 791 MB against 1,258; at batch 256 the cat's 221 MB
        # against 241: one chunk's result more).
        out = torch.empty((n, channels, height, width), dtype=self.dtype, device=images.device,
                          memory_format=torch.channels_last)
        for i in range(0, n, step):
            out[i:i + step] = self._apply(images[i:i + step], draws[i:i + step])
        return out

    def _augment_chunk(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2)  # NCHW view of channels-last memory
        stride = draws_per_layer(self.interpolation)
        for layer in range(self.spec.num_layers):
            first = 1 + stride * layer
            cubic = draws[:, first + 2] > 0.5 if self.interpolation == "random" else self.interpolation == "bicubic"
            x = self.layer(x, draws[:, first].round().long(), draws[:, first + 1], cubic)
        mean = self._constant("mean", x.device)
        std = self._constant("std", x.device)
        return normalize(x, draws[:, 0] > 0.5, mean, std, self.dtype)

    def layer(self, x: torch.Tensor, index: torch.Tensor, signed: torch.Tensor,
              cubic: bool | torch.Tensor = False) -> torch.Tensor:
        """One layer: sample n gets self.ordered[index[n]] (no op where index is past the end); the
        geometric ops resample bicubic where `cubic` (one bool, or (N,) bool), else bilinear."""
        x = self._warp(x, index, signed, cubic)
        x = _lookup(x, self._tables(x, index, signed))
        x = self._blend_grey(x, index, signed)
        return self._sharpen(x, index, signed)

    def _is(self, index: torch.Tensor, *names: str) -> torch.Tensor:
        """(N,) bool: the sample drew one of `names` (False everywhere if none is in the op set)."""
        chosen = torch.zeros_like(index, dtype=torch.bool)
        for name in names:
            if name in self.ordered:
                chosen |= index == self.ordered.index(name)
        return chosen

    def _name(self, plain: str) -> str:
        """The op's name in this set: the "increasing" set has its own enhancers, Posterize, Solarize."""
        return f"{plain}Increasing" if self.spec.increasing else plain

    def _factor(self, signed: torch.Tensor) -> torch.Tensor:
        """The enhancers' factor as timm's level functions compute it (in double, operation for
        operation), then float32, as PIL's blend takes it."""
        level = signed.double().abs()
        if self.spec.increasing:
            return torch.clamp(1.0 + signed.double().sign() * (_divide(level, MAX_LEVEL) * 0.9), min=0.1).float()
        return (_divide(level, MAX_LEVEL) * 1.8 + 0.1).float()

    # --- the warp ------------------------------------------------------------------------------

    def _warp(self, x: torch.Tensor, index: torch.Tensor, signed: torch.Tensor,
              cubic: bool | torch.Tensor) -> torch.Tensor:
        shapes = [name for name in self.ordered if name in GEOMETRIC]
        if not shapes:
            return x
        n, _, height, width = x.shape
        drawn = torch.zeros_like(index, dtype=torch.bool)
        matrix = torch.eye(3, dtype=torch.float64, device=x.device)[:2].expand(n, 2, 3)
        for name in shapes:
            chosen = self._is(index, name)
            drawn |= chosen
            matrix = torch.where(chosen.view(n, 1, 1), _pil_affine(name, signed, width, height), matrix)
        fill = self._constant("fill", x.device)
        # Only the samples that drew a geometric op need the warp (A3: a sixth of them a layer),
        # but how many did is known on the GPU alone, and no shape may depend on it (no host sync;
        # compiled and captured code has one shape). So the warp takes a fixed number of samples,
        # `capacity`, those that drew one first (a stable sort of the flags, on the device) and
        # others after them, whose result is not used. More than capacity samples draw one with a
        # probability of at most WARP_TAIL (warp_capacity); the samples past it would then keep
        # their pixels for that layer's op.
        capacity = warp_capacity(n, self.geometric_share, self.warp_tail)
        if capacity == 0:  # no sample can draw a geometric op
            return x
        taken = (torch.argsort((~drawn).to(torch.uint8), stable=True)[:capacity] if capacity < n
                 else torch.arange(n, device=x.device))
        matrix, cubic = matrix[taken], cubic if isinstance(cubic, bool) else cubic[taken]
        # A piece at a time even where the rest takes the whole batch (eager on a GPU: chunk_size):
        # the warp's float64 temporaries, ~100 bytes a pixel, are most of what the form holds, and
        # its ~30 calls a piece little of its launches. Each reads its samples where they are in x.
        step = min(capacity, self.chunk_images or capacity)
        pieces = [_resample(x, _sample_points(matrix[i:i + step], height, width), fill,
                            cubic if isinstance(cubic, bool) else cubic[i:i + step], taken[i:i + step])
                  for i in range(0, capacity, step)]
        warped = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).permute(0, 3, 1, 2)
        if capacity == n:
            return torch.where(drawn.view(n, 1, 1, 1), warped, x)
        # Into the batch at their places. A sample taken without a geometric draw has the identity
        # matrix, whose warp gives back its pixels exactly (each sample point at a pixel's centre:
        # fractions of 0), so nothing need choose between its two images here (compiled on the CPU,
        # such a choice cost a copy of the chunk into another layout: the warp no faster than on
        # every sample).
        return x.index_copy(0, taken, warped)

    # --- the tables ------------------------------------------------------------------------------

    def _tables(self, x: torch.Tensor, index: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
        """(N, 3, 256) int64: each sample's table, the identity unless it drew a table op."""
        n = x.shape[0]
        values = torch.arange(256, device=x.device)
        table = values.expand(n, 3, 256)
        level = signed.double().abs()  # timm's level functions, in double as Python computes them

        def use(name: str, make) -> None:
            nonlocal table
            if name in self.ordered:
                table = torch.where(self._is(index, name).view(n, 1, 1), make(), table)

        use("Invert", lambda: 255 - values.expand(n, 3, 256))
        bits = (_divide(level, MAX_LEVEL) * 4).floor().long()  # timm: int((level / 10) * 4)
        use(self._name("Posterize"), lambda: values & _posterize_mask(4 - bits if self.spec.increasing else bits))
        threshold = torch.clamp((_divide(level, MAX_LEVEL) * 256).floor(), max=256.0).long()
        if self.spec.increasing:
            threshold = 256 - threshold
        use(self._name("Solarize"), lambda: torch.where(values < threshold.view(n, 1, 1), values, 255 - values))
        add = torch.clamp((_divide(level, MAX_LEVEL) * 110).floor(), max=128.0).long()
        use("SolarizeAdd", lambda: torch.where(values < 128, torch.clamp(values + add.view(n, 1, 1), max=255), values))
        factor = self._factor(signed).view(n, 1, 1)
        use(self._name("Brightness"), lambda: _blend_values(torch.zeros_like(factor), values, factor).long())
        use(self._name("Contrast"), lambda: _blend_values(_mean_grey(x).view(n, 1, 1), values, factor).long())
        use("AutoContrast", lambda: _auto_contrast_tables(x))
        use("Equalize", lambda: _equalize_tables(x))
        return table

    # --- the blends ------------------------------------------------------------------------------

    def _blend_grey(self, x: torch.Tensor, index: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
        """ImageEnhance.Color: blend(grey, image, factor), grey = PIL's integer L."""
        name = self._name("Color")
        if name not in self.ordered:
            return x
        n = x.shape[0]
        blended = _blend_values(_grey(x), x, self._factor(signed).view(n, 1, 1, 1))
        return torch.where(self._is(index, name).view(n, 1, 1, 1), blended.to(torch.uint8), x)

    def _sharpen(self, x: torch.Tensor, index: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
        """ImageEnhance.Sharpness: blend(SMOOTH(image), image, factor); SMOOTH rounds its 3x3
        weighted mean (1 1 1 / 1 5 1 / 1 1 1, over 13) and leaves the 1-pixel border as it is."""
        name = self._name("Sharpness")
        if name not in self.ordered:
            return x
        n = x.shape[0]
        kernel = self._constant("smooth", x.device)
        smooth = x.float()  # a copy: the border stays x's
        smooth[:, :, 1:-1, 1:-1] = (F.conv2d(smooth, kernel, groups=3) + 0.5).floor()
        blended = _blend_values(smooth, x, self._factor(signed).view(n, 1, 1, 1))
        return torch.where(self._is(index, name).view(n, 1, 1, 1), blended.to(torch.uint8), x)

    def _constant(self, key: str, device: torch.device) -> torch.Tensor:
        if (key, device) not in self._constants:
            values = _CONSTANTS[key]()  # float32, but for the fill colour (uint8, as the warp's output)
            dtype = torch.uint8 if values.dtype == np.uint8 else torch.float32
            self._constants[(key, device)] = torch.as_tensor(values, dtype=dtype, device=device)
        return self._constants[(key, device)]


# The constants of the augment, made on the batch's device once: ImageNet's mean and std (0-255
# scale), the warp's fill colour (uint8), and ImageEnhance.Sharpness's SMOOTH kernel.
_CONSTANTS = {
    "mean": lambda: np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1),
    "std": lambda: np.array(IMAGENET_STD).reshape(1, 3, 1, 1),
    "fill": lambda: np.array(FILL, dtype=np.uint8),
    "smooth": lambda: np.broadcast_to(np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0,
                                      (3, 1, 3, 3)).copy(),
}


_CAPACITIES: dict[tuple[int, float, float], int] = {}


@torch.compiler.assume_constant_result  # compiled, a number for the chunk's shape: not traced
def warp_capacity(samples: int, share: float, tail: float = WARP_TAIL) -> int:
    """The fewest of `samples` that hold, with a probability above 1 - tail, every sample that
    draws a geometric op, each with probability `share` on its own: the smallest c with
    P(Binomial(samples, share) > c) <= tail (its terms in log space, summed from the top)."""
    key = (samples, share, tail)
    if key not in _CAPACITIES:
        _CAPACITIES[key] = _smallest_bound(samples, share, tail)
    return _CAPACITIES[key]


def _smallest_bound(samples: int, share: float, tail: float) -> int:
    if share <= 0.0 or samples == 0:
        return 0
    if share >= 1.0 or tail <= 0.0:
        return samples
    log_share, log_rest = math.log(share), math.log1p(-share)
    above = 0.0  # P(K > count), for count from samples down
    for count in range(samples, 0, -1):
        above += math.exp(math.lgamma(samples + 1) - math.lgamma(count + 1) - math.lgamma(samples - count + 1)
                          + count * log_share + (samples - count) * log_rest)  # P(K = count)
        if above > tail:
            return count
    return 0


def _eager_numerics() -> dict:
    """Inductor's option to cast as eager does (and, in Triton, to keep a * b + c two roundings),
    where this torch has it. (Imported here: inductor takes ~0.8 s to import.)"""
    import torch._inductor.config as inductor
    return {"emulate_precision_casts": True} if hasattr(inductor, "emulate_precision_casts") else {}


def _divide(a, b) -> torch.Tensor:
    """a / b rounded as Python rounds it. torch divides by a number (and a number by a tensor)
    through its reciprocal, an ulp away at times: enough to turn AutoContrast's 255.0 into
    254.99999999999994, truncated to 254. The number becomes a tensor filled where the other
    one lives (a fill, not a copy from the host: no sync)."""
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, a)
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return a / b


def _pil_affine(name: str, signed: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(N, 2, 3) double: the inverse map timm's call hands PIL for each sample's signed level,
    computed as timm and PIL compute it (their operations, in their order, in double)."""
    level, sign = signed.double().abs(), signed.double().sign()
    one, zero = torch.ones_like(level), torch.zeros_like(level)
    if name == "Rotate":  # Image.rotate(degrees) about the centre: PIL's own matrix
        angle = -(torch.remainder(sign * (_divide(level, MAX_LEVEL) * 30.0), 360.0) * (math.pi / 180.0))
        cos, sin = torch.round(angle.cos(), decimals=15), torch.round(angle.sin(), decimals=15)
        cx, cy = width / 2.0, height / 2.0
        rows = [cos, sin, (cos * -cx + sin * -cy) + 0.0 + cx, -sin, cos, (-sin * -cx + cos * -cy) + 0.0 + cy]
    elif name in ("ShearX", "ShearY"):
        factor = sign * (_divide(level, MAX_LEVEL) * 0.3)
        rows = [one, factor, zero, zero, one, zero] if name == "ShearX" else [one, zero, zero, factor, one, zero]
    else:  # TranslateXRel / TranslateYRel: a share of the width or height, in pixels
        pixels = sign * (_divide(level, MAX_LEVEL) * 0.45) * (width if name == "TranslateXRel" else height)
        rows = [one, zero, pixels, zero, one, zero] if name == "TranslateXRel" else [one, zero, zero, zero, one, pixels]
    return torch.stack(rows, -1).view(-1, 2, 3)


def _sample_points(matrix: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, H, W, 2) double: where each output pixel samples the input under PIL's affine transform,
    matrix (N, 2, 3) @ (x + 0.5, y + 0.5, 1)."""
    ys = torch.arange(height, dtype=torch.float64, device=matrix.device) + 0.5
    xs = torch.arange(width, dtype=torch.float64, device=matrix.device) + 0.5
    return (matrix[:, None, None, :, 0] * xs.view(1, 1, -1, 1) + matrix[:, None, None, :, 1] * ys.view(1, -1, 1, 1)
            + matrix[:, None, None, :, 2])


def _resample(x: torch.Tensor, source: torch.Tensor, fill: torch.Tensor, cubic: bool | torch.Tensor,
              samples: torch.Tensor) -> torch.Tensor:
    """PIL's transform filters, for the images of x that `samples` (N,) names: each output pixel
    takes its image at `source` (N, H, W, 2), x then y, in pixel units with centres at +0.5, in
    double: `fill` ((3,) uint8) where that point lies outside the image, else PIL's bilinear filter
    (a + (b - a) d across, then down) or, where `cubic` (one bool or (N,) bool), its bicubic one (a
    = -1 cubic convolution over 4 x 4 pixels, clipped to 0..255), edge pixels repeated, truncated.
    The fractions come from the double coordinates as PIL's do (exactly 0 where PIL's are), and the
    arithmetic is PIL's, in double, in its order: the same pixels. (N, H, W, 3) uint8. Per sample
    (a (N,) bool), both filters run on every sample and each takes its own.

    A pixel's sample point, fractions and 16 taps are computed once for its three channels, not
    once a channel: the taps are gathered as one int32 word a pixel (R | G << 8 | B << 16,
    _packed), a third of the gathers, and each channel is filtered from its byte. On 2 CPU cores
    (513a965 against 4e2c093) a chunk's warp (64 at 160 px, 39 samples warped and put back) took
    36 ms compiled against 43-45, 268-289 eager against 308-415; the whole form at A3's batch of
    256 (benchmarks/augment_memory.py --repeats 3), compiled in chunks, 1.67 s against 1.90, eager
    2.94 against 3.36 s and 315 MB against 400. On a GPU, where the warp was the form's costliest
    kernel at c5b2a17 (2.0 ms a step of 256 images), not yet measured. Eager, the taps are held
    once (16 int32 a pixel) and one channel's float64 temporaries at a time."""
    images, c, height, width = x.shape
    n = source.shape[0]
    words = _packed([x[:, k] for k in range(c)]).reshape(images * height * width)
    across_image, down_image = source.unbind(-1)
    inside = (across_image >= 0) & (across_image < width) & (down_image >= 0) & (down_image < height)
    corner = (source - 0.5).floor()
    across, down = (source - 0.5 - corner).unbind(-1)
    # int32 indices where every pixel's fits (half the bytes of int64 wherever inductor keeps them)
    index = torch.int32 if images * height * width < 2**31 else torch.int64
    left, top = corner.to(index).unbind(-1)
    # Each sample's first pixel: read from x where it is (a copy of the samples' images first would
    # be fused into every read by inductor, a division and a lookup each: no faster than all of x)
    first = (samples.to(index) * (height * width)).view(n, 1, 1)
    taps: dict[tuple[int, int], torch.Tensor] = {}

    def word(i: int, j: int) -> torch.Tensor:  # (N, H, W) int32: the pixel at (top + i, left + j)
        if (i, j) not in taps:
            taps[(i, j)] = words[first + (top + i).clamp(0, height - 1) * width + (left + j).clamp(0, width - 1)]
        return taps[(i, j)]

    planes = []
    for k in range(c):
        def at(i: int, j: int, shift: int = 8 * k) -> torch.Tensor:  # (N, H, W) uint8: channel k's tap
            return ((word(i, j) >> shift) & 255).to(torch.uint8)

        # Each filter's result as uint8 (exact: truncated within 0..255), its float64 temporaries
        # freed on return: eager, what the warp holds at once is about one filter's of one channel.
        value = _bilinear_filter(at, across, down) if cubic is not True else None
        if cubic is not False:
            bicubic = _bicubic_filter(at, across, down)
            value = bicubic if cubic is True else torch.where(cubic.view(n, 1, 1), bicubic, value)
        planes.append(torch.where(inside, value, fill[k]))
    return torch.stack(planes, -1)


def _packed(channels: list[torch.Tensor]) -> torch.Tensor:
    """Up to three uint8 channels of one shape as one int32 word each: c0 | c1 << 8 | c2 << 16."""
    packed = channels[0].int()
    for k, channel in enumerate(channels[1:], start=1):
        packed = packed | (channel.int() << (8 * k))
    return packed


def _bilinear_filter(at, across: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """PIL's bilinear filter at fractions (across, down) past the tap at(0, 0), at(i, j) the pixel
    i rows down and j columns across from it; in double, truncated: uint8."""
    def row(i):
        a = at(i, 0).double()
        return a + (at(i, 1).double() - a) * across
    upper, lower = row(0), row(1)
    return (upper + (lower - upper) * down).to(torch.uint8)  # within 0..255: the cast truncates


def _bicubic_filter(at, across: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic filter over the 4 x 4 taps at(-1..2, -1..2) around the point at fractions
    (across, down) past at(0, 0), a row at a time (its four pixels gathered, filtered across and
    let go), then down; clipped, truncated."""
    rows = [_cubic_of_pixels(*(at(i, j) for j in range(-1, 3)), across) for i in range(-1, 3)]
    return _cubic(*rows, down).clamp(0, 255).to(torch.uint8)


def _cubic(v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """PIL's BICUBIC macro: the cubic through four neighbours at fraction d between v2 and v3,
    in double, its operations in its order."""
    return v2 + d * _cubic_in_d(*_cubic_terms(v1, v2, v3, v4), d)


def _cubic_of_pixels(v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor,
                     d: torch.Tensor) -> torch.Tensor:
    """_cubic across four uint8 pixels: its terms are then integers (within +-765), exact in int16
    as in PIL's double, which leaves a quarter of the bytes until d comes in."""
    v1, v2, v3, v4 = (v.to(torch.int16) for v in (v1, v2, v3, v4))
    p2, p3, p4 = (p.double() for p in _cubic_terms(v1, v2, v3, v4))
    return v2.double() + d * _cubic_in_d(p2, p3, p4, d)


def _cubic_terms(v1, v2, v3, v4):
    """The BICUBIC macro's p2, p3, p4, in its order of operations."""
    return -v1 + v3, 2 * (v1 - v2) + v3 - v4, -v1 + v2 - v3 + v4


def _cubic_in_d(p2, p3, p4, d):
    return p2 + d * (p3 + d * p4)


def _blend_values(degenerate: torch.Tensor, values: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImagingBlend on uint8: degenerate + factor * (value - degenerate) in float32,
    truncated and clipped to 0..255 (its two branches, factor in [0, 1] or not, agree)."""
    degenerate = degenerate.float()
    return (degenerate + factor * (values.float() - degenerate)).trunc().clamp(0, 255)


def _posterize_mask(bits: torch.Tensor) -> torch.Tensor:
    """ImageOps.posterize keeps the top `bits` bits; timm leaves the image as it is from 8 bits on."""
    mask = (~((1 << (8 - bits.clamp(0, 8))) - 1)) & 255
    return mask.view(-1, 1, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (R 19595 + G 38470 + B 7471 + 32768) >> 16, (N, 1, H, W) int32."""
    r, g, b = x.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _mean_grey(x: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast's centre: int(mean of L + 0.5), per sample, float32."""
    grey = _grey(x)
    return (_divide(grey.sum(dim=(1, 2, 3), dtype=torch.float64), grey[0].numel()) + 0.5).floor().float()


def _auto_contrast_tables(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast (no cutoff): each channel's [lo, hi] to [0, 255], int(i * scale + offset)
    in double precision, clipped; a channel with hi <= lo keeps its values."""
    low = x.amin(dim=(2, 3)).double().unsqueeze(-1)  # (N, 3, 1)
    high = x.amax(dim=(2, 3)).double().unsqueeze(-1)
    values = torch.arange(256, device=x.device, dtype=torch.float64)
    scale = _divide(255.0, (high - low).clamp(min=1.0))
    stretched = (values * scale - low * scale).trunc().clamp(0, 255).long()
    return torch.where(high > low, stretched, values.long().expand_as(stretched))


def _equalize_tables(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize: per channel, step = (pixels - count of the last used value) // 255 and
    table[i] = (step // 2 + pixels below i) // step, clipped; the identity where step is 0 or the
    channel holds one value."""
    n, c, h, w = x.shape
    # int32 counts (an image of up to 2**31 pixels): compiled for the GPU, inductor then scatters
    # with atomic adds and computes each pixel's bin as it goes. With int64 counts it falls back
    # to aten's scatter, which needs the bins as a tensor of their own: an int64 copy of the batch
    # (157 MB at A3's 256 x 160 x 160) a layer. (On the CPU it falls back either way.)
    counts = torch.zeros(n * c, 256, dtype=torch.int32, device=x.device)
    counts.scatter_add_(1, x.reshape(n * c, h * w).long(), torch.ones(1, 1, dtype=torch.int32, device=x.device)
                        .expand(n * c, h * w))
    used = counts > 0
    last = 255 - used.flip(1).int().argmax(1, keepdim=True)  # the highest value present
    step = (h * w - counts.gather(1, last)) // 255
    below = counts.cumsum(1) - counts
    table = ((step // 2 + below) // step.clamp(min=1)).clamp(0, 255)
    keep = (step == 0) | (used.sum(1, keepdim=True) <= 1)
    table = torch.where(keep, torch.arange(256, device=x.device).expand(n * c, 256), table)
    return table.view(n, c, 256)


def _lookup(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """x (N, 3, H, W) uint8 through each sample's and channel's table (N, 3, 256)."""
    n, c, h, w = x.shape
    flat = tables.to(torch.uint8).reshape(n * c * 256)
    base = (torch.arange(n * c, device=x.device, dtype=torch.int32) * 256).view(n, c, 1, 1)
    return flat[base + x.int()]


def normalize(x: torch.Tensor, flip: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
    """Flip where drawn, (x - mean) / std (on the 0-255 scale), in `dtype`, channels-last."""
    n = x.shape[0]
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return ((x.float() - mean) / std).to(dtype).contiguous(memory_format=torch.channels_last)
