"""`fastrsb doctor`: every check a long run depends on, at once, before it starts.

The GPUs (name, memory, compute capability, the AMP type they get), the NVIDIA driver against the
CUDA versions torch and DALI were built for, a DALI decode and the recipe's augmentation on the
device a run would use, CPU cores against the loader threads, free disk in the run folder for a
recipe's checkpoints, and for --data: the layout, the counts against ImageNet-1k's, and a decode
probe. Exit 0 only when a run can start. Without a GPU it says so and checks the CPU path; nothing
here can wait on a GPU that is not there (torch.cuda.is_available() and NVML answer at once).
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fastrsb.checkpoint import is_kept
from fastrsb.errors import UserError
from fastrsb.file_jobs import nearest_existing


@dataclass
class Check:
    name: str
    ok: bool
    text: str
    fatal: bool = True  # a failed fatal check means a run cannot start; others are warnings


def _dali_cuda() -> str | None:
    """The CUDA major.minor of the installed DALI build, from its package name (nvidia-dali-cuda130)."""
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali-cuda"):
            return dali_package_cuda(name)
    return None


def dali_package_cuda(name: str) -> str:
    """The CUDA a DALI package is built for, from its name: nvidia-dali-cuda130 -> 13.0,
    nvidia-dali-cuda120 -> 12.0 (DALI's packages name the major and one digit of minor)."""
    digits = name.lower().removeprefix("nvidia-dali-cuda")
    return f"{digits[:-1]}.{digits[-1]}" if digits.isdigit() and len(digits) >= 2 else digits


def cuda_version(number: int) -> str:
    """CUDA's version number as NVML and cudaDriverGetVersion give it (1000 x major + 10 x minor:
    13000, 12040) as major.minor."""
    return f"{number // 1000}.{number % 1000 // 10}"


def _driver_cuda() -> tuple[str | None, str | None]:
    """(driver version, the newest CUDA it runs) from NVML, or (None, None) without a driver."""
    try:
        import pynvml
        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()  # e.g. 13000
        return (driver.decode() if isinstance(driver, bytes) else driver), cuda_version(cuda)
    except Exception:  # noqa: BLE001 - no driver, no NVML library: the GPU checks say so
        return None, None


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def jpeg_engines(index: int) -> int | None:
    """The GPU's hardware JPEG decoders, as NVML reports them for its whole-GPU instance profile
    (MIG-capable GPUs: A100, H100, H200 report 5-7 there); None where NVML does not say."""
    try:
        import pynvml
        from fastrsb.device import nvml_handle  # torch's index, NVML's numbering
        handle = nvml_handle(index)
        for profile in (pynvml.NVML_GPU_INSTANCE_PROFILE_8_SLICE, pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE):
            try:
                return int(pynvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, profile).jpegCount)
            except pynvml.NVMLError:
                continue
    except Exception:  # noqa: BLE001 - no NVML, or a GPU without MIG profiles: unknown, not an error
        return None
    return None


def _hardware_share(index: int) -> float:
    from fastrsb.pipelines.loader import default_hw_decoder_load  # imports DALI: only once a GPU is there
    return default_hw_decoder_load(index)


def builds_too_new(driver_cuda: str | None, built: dict[str, str | None]) -> list[str]:
    """The builds whose CUDA major version the driver cannot run (a driver runs its own CUDA major
    and older ones, and newer minors of its major through minor-version compatibility)."""
    return [f"{name} (CUDA {version})" for name, version in built.items()
            if driver_cuda and version and _version_key(version)[:1] > _version_key(driver_cuda)[:1]]


def gpu_checks() -> list[Check]:
    import torch
    from fastrsb.device import amp_dtype
    checks = []
    if not torch.cuda.is_available():
        return [Check("gpu", True, "no CUDA GPU visible: runs train on the CPU (--device cpu); the checks below "
                                   "are the CPU path's", fatal=False)]
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        with torch.cuda.device(index):
            amp = str(amp_dtype("cuda", True)).removeprefix("torch.")
        engines = jpeg_engines(index)
        jpeg = (f"{engines} hardware JPEG decoder(s), sent {_hardware_share(index):.0%} of the JPEGs by default"
                if engines else "no hardware JPEG decoder reported by NVML (nvJPEG's CUDA decoding)")
        checks.append(Check(f"gpu{index}", True, f"GPU {index}: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                                                 f"compute capability {props.major}.{props.minor}, AMP {amp}, {jpeg}"))
    driver, driver_cuda = _driver_cuda()
    built = {"torch": torch.version.cuda, "DALI": _dali_cuda()}
    text = f"driver {driver or 'unknown'} (CUDA {driver_cuda or '?'}); torch built for CUDA {built['torch']}, " \
           f"DALI for CUDA {built['DALI'] or '?'}"
    newer = builds_too_new(driver_cuda, built)
    if newer:
        checks.append(Check("cuda", False, f"{text}: {', '.join(newer)} needs a newer driver than CUDA {driver_cuda}: "
                                           "upgrade the driver, or install the builds for your CUDA (README)"))
    else:
        checks.append(Check("cuda", True, text))
    return checks


def software_check(device: str) -> Check:
    """What runs here, in one line (what an issue report needs first)."""
    from fastrsb.provenance import software
    v = software(device)
    commit = f" (commit {v['commit']})" if v["commit"] else ""
    return Check("software", True, f"fastrsb {v['fastrsb']}{commit}, Python {v['python']}, torch {v['torch']}, "
                                   f"torchvision {v['torchvision']}, DALI {v['nvidia-dali']}, timm {v['timm']}, "
                                   f"numpy {v['numpy']}")


def dali_check(device: str, recipe_name: str = "a3") -> Check:
    """A real decode through fastrsb's loader on `device` (generated JPEGs), timed, with the
    recipe's augmentation (its RandAugment in the form the run would take, its repeated views):
    every DALI operator the run's train graph holds runs once, so that one the machine's DALI
    cannot run (a library it lacks) fails here rather than at the run's start."""
    import tempfile
    from fastrsb.demo_data import write_demo
    from fastrsb.pipelines import train_loader
    from fastrsb.parts import train_augmentation
    from fastrsb.recipe import load_recipe
    recipe = load_recipe(recipe_name)
    augment = train_augmentation(recipe)
    with tempfile.TemporaryDirectory() as folder:
        root = write_demo(Path(folder) / "probe", train_per_class=16, val_per_class=1, num_classes=2)
        try:
            start = time.perf_counter()
            loader = train_loader(root / "train", 16, 64, device=device, pipelines=1, **augment)
            images, _ = next(iter(loader))
            seconds = time.perf_counter() - start
        except Exception as err:  # noqa: BLE001 - any failure here is the finding
            return Check("dali", False, f"DALI could not decode and augment as recipe {recipe['name']} does on the "
                                        f"{device}: {type(err).__name__}: {err}")
    import nvidia.dali
    where = "the GPU (nvJPEG and the hardware JPEG decoders where the GPU has them)" if device == "cuda" else "the CPU"
    aa = f"RandAugment {recipe['aa']}, {loader.settings['aa_impl']} form" if augment["aa"] else "no RandAugment"
    if augment["repeats"] > 1:
        aa += f", {augment['repeats']} views an image"
    return Check("dali", True, f"DALI {nvidia.dali.__version__} decodes on {where}, and augments as recipe "
                               f"{recipe['name']} does ({aa}): a first batch {tuple(images.shape)} "
                               f"{str(images.dtype).removeprefix('torch.')} in {seconds:.1f}s")


def cpu_check(gpus: int) -> Check:
    """Cores against the loader's threads, for a run of one process per GPU, or of as many
    processes as torchrun starts here (LOCAL_WORLD_SIZE), by the loader's own rule."""
    from fastrsb.pipelines.loader import default_threads
    cores = len(os.sched_getaffinity(0))
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or max(1, gpus)
    per_process = cores // processes
    threads = default_threads(processes)
    text = f"{cores} CPU cores; the loader takes {threads} thread(s) per process ({processes} process(es))"
    if gpus and per_process < 4:
        return Check("cpu", False, f"{text}: under 4 cores per GPU the loader's CPU stages may starve the GPUs",
                     fatal=False)
    return Check("cpu", True, text)


def model_parameters(model: str) -> int:
    """The number of values in a timm model's parameters (built on the meta device: no memory)."""
    import timm
    import torch
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(model).parameters())


def disk_check(out: Path, recipe_name: str, keep_every: int | None = None) -> Check:
    """Free space in the run folder against what the recipe's checkpoints take: last.pt and best.pt,
    each the weights, LAMB's two moments and the EMA if any (4 bytes a value), and with keep_every
    the kept epochs' (train --keep-every: every N-th and the last, which is last.pt's file)."""
    from fastrsb.recipe import load_recipe
    recipe = load_recipe(recipe_name)
    params = model_parameters(recipe["model"])
    copies = 3 + (1 if recipe["model_ema"] else 0)
    kept = kept_epochs(recipe["epochs"], keep_every) - 1 if keep_every else 0
    need = (2 + kept) * copies * params * 4 / 2**30
    folder = nearest_existing(out)
    free = shutil.disk_usage(folder).free / 2**30
    where = folder if folder == out else f"{folder} (where {out} will be made)"
    files = f"last.pt + best.pt + {kept} kept epoch(s) (--keep-every {keep_every})" if keep_every else "last.pt + best.pt"
    text = f"{free:,.1f} GiB free in {where}; recipe {recipe_name}'s {files} need {need:.2f} GiB"
    return Check("disk", free > 2 * need, text + ("" if free > 2 * need else ": free some space or choose another --out"))


def run_folder_check(out: Path, data: Path | None) -> Check | None:
    """What `fastrsb train` would refuse of the run folder's place: a file there, the data's
    train/ or val/ around it, or a train running in it now. None where there is nothing to say."""
    from fastrsb.data_folder import refuse_a_run_inside_the_splits
    from fastrsb.folder_lock import refuse_if_in_use
    if out.exists() and not out.is_dir():
        return Check("out", False, f"the run folder {out} is a file: a folder goes there")
    try:
        refuse_if_in_use(out)
        if data is not None:
            refuse_a_run_inside_the_splits(out, data)
    except UserError as err:
        return Check("out", False, str(err))
    return None


def batch_check(train_images: int, recipe_name: str, processes: int) -> Check:
    """The train set against one optimizer step of the recipe's batch over the run's processes:
    where it does not fill one, `fastrsb train` refuses to start (fastrsb.parts.check_fills_a_step)."""
    from fastrsb.parts import check_fills_a_step
    from fastrsb.recipe import load_recipe
    batch = load_recipe(recipe_name)["batch_size"]
    try:
        check_fills_a_step(batch, train_images, processes)
    except UserError as err:
        return Check("batch", False, f"recipe {recipe_name}: {err}")
    return Check("batch", True, f"the train set fills recipe {recipe_name}'s batch_size {batch:,} "
                                f"({batch // processes:,} images a process over {processes} process(es))")


def data_checks(root: Path, device: str, recipe_name: str = "a3", processes: int = 1) -> list[Check]:
    from fastrsb.data_folder import describe_counts, open_dataset, scan_headers
    try:
        train, val = open_dataset(root)
    except UserError as err:
        return [Check("data", False, str(err))]
    checks = [Check("data", True, f"{root}: {describe_counts(train, val)}"),
              batch_check(len(train), recipe_name, processes)]
    bad = scan_headers(train.files + val.files)
    if bad:
        listed = "; ".join(f"{path} ({reason})" for path, reason in bad[:3])
        checks.append(Check("files", False, f"{len(bad):,} broken file(s): {listed} (fastrsb data check lists all)"))
    else:
        checks.append(Check("files", True, f"every file of train/ and val/ starts as an image should "
                                           f"({len(train) + len(val):,} headers read)"))
    checks.append(_decode_probe(train, device))
    return checks


def _decode_probe(train, device: str, count: int = 320, batch: int = 64) -> Check:
    """The train loader over `count` files spread over the classes, timed after its first batch."""
    from fastrsb.pipelines import ImageList, train_loader
    step = max(1, len(train) // count)
    sample = ImageList(train.files[::step][:count], train.labels[::step][:count], train.classes)
    if len(sample) < 2 * batch:
        return Check("probe", True, f"decode probe skipped: {len(sample)} files (fewer than {2 * batch})", fatal=False)
    try:
        batches = iter(train_loader(sample, batch, 160, device=device, pipelines=1))
        next(batches)
        start, seen = time.perf_counter(), 0
        for images, _ in batches:
            seen += images.shape[0]
        rate = seen / (time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - a file DALI cannot read, a decoder failure: the finding
        return Check("probe", False, f"decode probe failed: {type(err).__name__}: {str(err).splitlines()[-1]}")
    return Check("probe", True, f"decode probe: {rate:,.0f} img/s (the train loader at 160 px on the {device}, "
                                f"{len(sample)} files, one pipeline)", fatal=False)


def kept_epochs(epochs: int, keep_every: int) -> int:
    """How many epochs' checkpoints `train --keep-every` keeps."""
    return sum(is_kept(epoch, epochs, keep_every) for epoch in range(1, epochs + 1))


def run_doctor(data: str | None, out: str | None, recipe: str = "a3", keep_every: int | None = None) -> list[Check]:
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checks = [software_check(device), *gpu_checks(), dali_check(device, recipe)]
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    checks.append(cpu_check(gpus))
    checks.append(disk_check(Path(out or "runs"), recipe, keep_every))
    if (place := run_folder_check(Path(out or "runs"), Path(data) if data else None)) is not None:
        checks.append(place)
    if data:  # the run's processes: torchrun's, else one per GPU (as cpu_check counts them)
        checks += data_checks(Path(data), device, recipe, int(os.environ.get("WORLD_SIZE", "0")) or max(1, gpus))
    return checks


def verdict(ok: bool, fatal: bool) -> str:
    """A check's first word in a report: a failed check that does not stop a run is a warning."""
    return "ok  " if ok else "FAIL" if fatal else "warn"


def report(checks: list[Check]) -> tuple[str, dict]:
    lines = [f"{verdict(c.ok, c.fatal)}  {c.text}" for c in checks]
    failed = [c for c in checks if not c.ok and c.fatal]
    lines.append(f"{len(failed)} problem(s): " + ("a run can start" if not failed else "a run cannot start"))
    return "\n".join(lines), {"ok": not failed, "checks": [asdict(c) for c in checks]}
