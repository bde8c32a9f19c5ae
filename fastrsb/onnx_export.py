"""`fastrsb export --onnx`: the exported network also as FOLDER/model.onnx, for ONNX Runtime,
TensorRT and the other ONNX runtimes. Input `images`: (batch, 3, height, width) float32, the image
as config.json's pretrained config transforms it (the run's test size and crop, bicubic,
ImageNet's mean and std); batch, height and width dynamic. Output `logits`: (batch, classes), the
classes in config.json's label_names order (the classifier's rows, timm's order).

Written by torch's own exporter (torch.export, then ONNX; the `onnx` and `onnxscript` packages),
and checked before the folder is put in place: the ONNX model, run by ONNX Runtime, must give the
network's logits for a batch at the test size and at another size; an export that does not is
refused, the folder left as it was. Without onnxruntime installed the check cannot run, and the
export says so."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import torch

from fastrsb.errors import UserError

ONNX = "model.onnx"
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # torch's exporter colours words of its errors for a terminal
_TOLERANCE = 1e-3  # of the logits' scale: float32 kernels of two runtimes round apart, ~1e-6 of it here


def check_available() -> None:
    """Refuse --onnx, before anything is written, where torch's exporter lacks its packages."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--onnx needs the {' and '.join(missing)} package(s), which torch's ONNX exporter uses: "
                        "pip install 'fastrsb[onnx]'")


def write_onnx(model: torch.nn.Module, path: Path, size: int) -> dict:
    """MODEL (float32, eval mode) as an ONNX file at PATH, traced at SIZE px; checked with ONNX
    Runtime where installed. Returns {"onnx_bytes", "onnx_checked": the largest difference from
    the network's logits relative to their scale, None where not checked}."""
    model = model.eval().float()
    batch, height, width = (torch.export.Dim(name) for name in ("batch", "height", "width"))
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the exporter's own progress lines
        try:
            # external_data=False: one file, the weights inside (a ResNet's are far below ONNX's 2 GB)
            torch.onnx.export(model, (torch.randn(2, 3, size, size),), str(path), dynamo=True, verbose=False,
                              external_data=False, input_names=["images"], output_names=["logits"],
                              dynamic_shapes=({0: batch, 2: height, 3: width},))
        except Exception as err:  # an architecture the exporter cannot take: its words, without their colours
            words = _ANSI_COLOUR.sub("", str(err)).splitlines()
            raise UserError(f"torch's ONNX exporter could not export the model: {type(err).__name__}: "
                            f"{words[0] if words else ''}") from None
    return {"onnx_bytes": path.stat().st_size, "onnx_checked": _check(model, path, size)}


def _check(model: torch.nn.Module, path: Path, size: int) -> float | None:
    """The ONNX model's largest difference from MODEL's logits, relative to their scale, over a
    batch at SIZE and one of another batch and size (the dynamic axes); refused above the
    tolerance. None without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator, worst = torch.Generator().manual_seed(0), 0.0
    for shape in ((3, 3, size, size), (1, 3, size + 32, size + 16)):
        images = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            theirs = model(images)
        ours = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
        worst = max(worst, float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-6)))
    if worst > _TOLERANCE:
        raise UserError(f"the ONNX model's logits differ from the network's by {worst:.2g} of their scale (ONNX "
                        f"Runtime {onnxruntime.__version__}): not exported")
    return worst
