"""A bicubic warp in numpy with the cubic convolution's `a` as a parameter: what each device's
DALI warp computes for RandAugment's geometric ops (pipelines/randaugment.py: _warp), written out
so that a test can say which kernel a device uses. DALI's warp_perspective is OpenCV's
warpPerspective on the CPU (a = -0.75) and CV-CUDA's on the GPU, whose interpolation wrapper's
cubic is Catmull-Rom (a = -0.5); PIL's transform, which timm calls, uses a = -1."""
import numpy as np


def cubic_weight(t: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distance t."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def bicubic_warp(image: np.ndarray, matrix: np.ndarray, a: float, fill) -> np.ndarray:
    """Output pixel (x, y) takes the input at matrix @ (x, y, 1) with pixel centres at +0.5
    (DALI's pixel_origin="corner"), from the 4 x 4 pixels around it, taps outside the image
    reading `fill`; rounded to uint8. image: (H, W, C) uint8; matrix: (3, 3), affine."""
    h, w, _ = image.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = matrix[0, 0] * (xs + .5) + matrix[0, 1] * (ys + .5) + matrix[0, 2] - .5
    sy = matrix[1, 0] * (xs + .5) + matrix[1, 1] * (ys + .5) + matrix[1, 2] - .5
    left, top = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fill = np.asarray(fill, dtype=np.float64)
    total = np.zeros(image.shape, dtype=np.float64)
    for dy in range(-1, 3):
        for dx in range(-1, 3):
            col, row = left + dx, top + dy
            inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
            tap = np.where(inside[..., None], image[row.clip(0, h - 1), col.clip(0, w - 1)], fill)
            total += (cubic_weight(sx - col, a) * cubic_weight(sy - row, a))[..., None] * tap
    return np.rint(total).clip(0, 255).astype(np.uint8)


def op_matrix(name: str, signed: float, size: int) -> np.ndarray:
    """The inverse map of geometric op `name` at signed level `signed`, as the DALI graph builds it
    (randaugment._geometric_matrix, in float64)."""
    import math
    from fastrsb.pipelines.randaugment import ROTATE_DEGREES_PER_LEVEL, _geometric_terms
    a, b, c, d = _geometric_terms(name, size).astype(np.float64)
    theta = signed * (-ROTATE_DEGREES_PER_LEVEL * math.pi / 180.0)
    return a + signed * b + math.cos(theta) * c + math.sin(theta) * d
