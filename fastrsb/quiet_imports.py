"""timm imported without wandb. Where wandb is installed, `import timm` imports it too (timm.data ->
timm.utils.summary: `try: import wandb`), for its update_summary(log_wandb=True), which fastrsb never
calls: 2.9 s of a 9 s `fastrsb predict` of one image on 2 cores, and wandb's hooks on stdout from
then on. The command line installs this finder; `train --wandb` (fastrsb.wandb_log) imports wandb
itself, which it lets through, as it lets through any other importer."""
from __future__ import annotations

import importlib.abc
import sys

_BLOCKED = ("wandb", "timm.utils.summary")  # (module, importer)


class _TimmWithoutWandb(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == _BLOCKED[0] and _importer() == _BLOCKED[1]:
            raise ImportError("wandb is not imported for timm's summary (fastrsb.quiet_imports)")
        return None  # every other import: as if this finder were not there


def _importer() -> str | None:
    """The module whose import statement is running: the first frame past importlib's own."""
    frame = sys._getframe(2)  # past _importer and find_spec
    while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        frame = frame.f_back
    return frame.f_globals.get("__name__") if frame is not None else None


def install() -> None:
    if not any(isinstance(finder, _TimmWithoutWandb) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TimmWithoutWandb())
