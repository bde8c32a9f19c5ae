"""The same recipe as timm's own train.py and validate.py would run it (`fastrsb recipe a3 --timm`):
for a run in timm beside a run in fastrsb, or to read the recipe in the flags people know.

Where fastrsb's keys and timm's flags differ in meaning, the command says what timm needs: the
recipe's epochs count its warmup, timm's `--epochs` with `--warmup-prefix` does not (so timm gets
epochs - warmup_epochs: the same schedule to the step, as tests/test_optim.py checks against timm's
scheduler); the LR steps per update (`--sched-on-updates`); `batch_size` is global, timm's `-b` per
GPU; timm's defaults that the recipes do not share are set (label smoothing 0.1, colour jitter 0.4
where there is no RandAugment, float16 AMP)."""
from __future__ import annotations

import shlex
from pathlib import Path

from fastrsb import progressive
from fastrsb.errors import UserError


def timm_train_args(recipe: dict, gpus: int) -> list[str]:
    """train.py's arguments for `recipe` on `gpus` GPUs (its batch split evenly over them)."""
    if gpus < 1 or recipe["batch_size"] % gpus:
        raise UserError(f"the recipe's global batch of {recipe['batch_size']} does not split evenly over {gpus} GPU(s)")
    if recipe["aug_repeats"] > 1 and gpus < 2:  # timm.data.create_loader asserts it
        raise UserError(f"timm runs repeated augmentation (aug_repeats {recipe['aug_repeats']}) only across several "
                        "processes (its RepeatAugSampler is a distributed sampler): --gpus 2 or more, or "
                        "--set aug_repeats=0")
    r = recipe
    args = ["--model", r["model"], "--img-size", str(r["img_size"]), "--crop-pct", _num(r["crop_pct"]),
            "-b", str(r["batch_size"] // gpus),
            "--epochs", str(r["epochs"] - r["warmup_epochs"]), "--warmup-epochs", str(r["warmup_epochs"]),
            "--warmup-prefix", "--cooldown-epochs", "0", "--sched", r["sched"], "--sched-on-updates",
            "--lr", _num(r["lr"]), "--warmup-lr", _num(r["warmup_lr"]), "--min-lr", _num(r["min_lr"]),
            "--opt", r["opt"], "--opt-eps", _num(r["opt_eps"]), "--opt-betas", *map(_num, r["opt_betas"]),
            "--weight-decay", _num(r["weight_decay"]),
            "--smoothing", _num(r["smoothing"]), "--drop-path", _num(r["drop_path"]),
            "--train-interpolation", r["train_interpolation"], "--color-jitter", "0", "--reprob", "0",
            "--aug-repeats", str(r["aug_repeats"])]
    if r["aa"]:
        args += ["--aa", r["aa"]]
    args += ["--mixup", _num(r["mixup"]), "--cutmix", _num(r["cutmix"]), "--mixup-prob", _num(r["mixup_prob"]),
             "--mixup-switch-prob", _num(r["mixup_switch_prob"]), "--mixup-mode", r["mixup_mode"]]
    if r["bce_loss"]:
        args.append("--bce-loss")
        if r["bce_target_thresh"] is not None:
            args += ["--bce-target-thresh", _num(r["bce_target_thresh"])]
    if r["model_ema"]:
        args += ["--model-ema", "--model-ema-decay", _num(r["model_ema_decay"])]
    if r["amp"]:
        args += ["--amp", "--amp-dtype", "bfloat16"]  # fastrsb's on GPUs with bf16; timm's default is float16
    args.append("--channels-last")
    if r["initial_checkpoint"]:
        args += ["--initial-checkpoint", _timm_weights_file(r["initial_checkpoint"])]
    if r["compile"]:
        args.append("--torchcompile")
    return args + ["--seed", str(r["seed"])]


WEIGHTS_ALONE = (".safetensors", ".pth", ".pth.tar", ".bin")  # what a file of weights alone is named


def _timm_weights_file(source: str) -> str:
    """What timm's --initial-checkpoint reads for fastrsb's initial_checkpoint: a file of weights
    alone as it is, a model folder's weights, or for a fastrsb checkpoint (.pt) `fastrsb export`'s."""
    if source.endswith(WEIGHTS_ALONE):
        return source
    if source.endswith(".pt"):
        return "EXPORTED_FOLDER/model.safetensors"
    from fastrsb.model_folder import WEIGHT_FILES
    folder = Path(source)  # the file the folder holds, read in the order fastrsb's eval reads them
    held = next((name for name in WEIGHT_FILES if (folder / name).is_file()), WEIGHT_FILES[0])
    return f"{source.rstrip('/')}/{held}"


def timm_commands(recipe: dict, gpus: int, data: str = "/data/imagenet") -> str:
    """The train.py command (under torchrun for several GPUs), validate.py's at the test size (and
    fastrsb's eval, plot and list of the run timm trains), and what still differs from a fastrsb run."""
    launch = ["python", "train.py"] if gpus == 1 else ["torchrun", f"--nproc_per_node={gpus}", "train.py"]
    train = shlex.join(launch + [data] + timm_train_args(recipe, gpus))
    validate = shlex.join(["python", "validate.py", f"{data}/val", "--model", recipe["model"],
                           "--checkpoint", "output/train/RUN/model_best.pth.tar", "--img-size",
                           str(recipe["test_img_size"]), "--crop-pct", _num(recipe["crop_pct"]),
                           "--interpolation", "bicubic", "--amp"])
    notes = [f"timm validates at --img-size ({recipe['img_size']} px) while it trains; fastrsb at the test size "
             f"({recipe['test_img_size']} px, crop {_num(recipe['crop_pct'])}), which validate.py measures afterwards",
             "the random streams differ (loader, RandAugment, mixing, initial weights): expect the same accuracy "
             "within the spread of seeds, not the same numbers"]
    if recipe["aug_repeats"] > 1 and recipe["aug_repeats_across_ranks"]:
        notes.append(f"both place an image's {recipe['aug_repeats']} views on different ranks; timm's "
                     "RepeatAugSampler decodes the image on each, fastrsb once and exchanges the views (its images "
                     "come in another order)")
    elif recipe["aug_repeats"] > 1:
        notes.append(f"timm's RepeatAugSampler sends an image's {recipe['aug_repeats']} views to different ranks; "
                     "fastrsb keeps them in one process's batch (aug_repeats_across_ranks = false)")
    if recipe["initial_checkpoint"]:
        notes.append("timm's --initial-checkpoint loads every weight, the classifier too (with other classes, "
                     "its shape refuses it); fastrsb starts the classifier anew where the classes differ"
                     + ("; a fastrsb checkpoint is read by timm once `fastrsb export`ed (EXPORTED_FOLDER)"
                        if recipe["initial_checkpoint"].endswith(".pt") else ""))
    if recipe["ramp_img_size"] is not None:
        notes.append(f"timm's train.py has no progressive resizing: it trains every epoch at {recipe['img_size']} px "
                     f"(--img-size); fastrsb trains {progressive.describe(recipe)}")
    if recipe["aa"]:
        notes.append("timm's RandAugment runs in PIL; fastrsb's draws the same law (its torch form computes as "
                     "PIL does; its DALI forms' bicubic warp is OpenCV's)")
    by_fastrsb = shlex.join(["fastrsb", "eval", "output/train/RUN/model_best.pth.tar", "--data", data, "--img-size",
                             str(recipe["test_img_size"]), "--crop-pct", _num(recipe["crop_pct"])])
    beside = [shlex.join(["fastrsb", "plot", "runs/RUN", "output/train/RUN"]), "fastrsb runs runs output/train"]
    return "\n".join([f"# {recipe['name']} in timm's train.py ({gpus} GPU(s)), from a timm source checkout:", train,
                      "# then the test size's top-1:", validate,
                      "# or through fastrsb's validation; its curves beside a fastrsb run's; both runs listed:",
                      by_fastrsb, *beside,
                      "# what still differs from `fastrsb train`:"]
                     + [f"#  - {note}" for note in notes])


def _num(value: float) -> str:
    """A number as the recipe states it (8e-3 -> 0.008, 1.0 -> 1.0)."""
    return repr(float(value)) if isinstance(value, float) else str(value)
