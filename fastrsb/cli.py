"""`fastrsb` command line: recipe, train, eval, predict, export, doctor, compare, runs, plot, data."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

from fastrsb import __version__
from fastrsb.errors import StoppedWithAnother, UserError, say_error
from fastrsb.run_log import RunLog

DEMO_DATA = Path("data/demo")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value (repeatable), e.g. --set epochs=10")


def cmd_recipe(args) -> None:
    from fastrsb.recipe import describe, load_recipe, to_toml
    if args.keys:
        print(describe())
        return
    recipe = load_recipe(args.recipe, args.overrides)
    if args.toml:
        sets = "".join(f" --set {shlex.quote(item)}" for item in args.overrides)
        origin = f"fastrsb recipe {shlex.quote(args.recipe)} --toml{sets} (fastrsb {__version__})"
        print(to_toml(recipe, origin), end="")
    elif args.timm:
        from fastrsb.timm_command import timm_commands
        print(timm_commands(recipe, args.gpus))
    elif args.json:
        print(json.dumps(recipe))
    else:
        width = max(map(len, recipe))
        for key, value in recipe.items():
            print(f"{key:<{width}}  {'none' if value is None else value}")


def cmd_train(args) -> int:
    from fastrsb.recipe import load_recipe
    recipe = load_recipe(args.recipe, args.overrides)
    if args.device == "cuda":  # asked for by name: refused before the demo data is generated or read
        from fastrsb.device import resolve_device
        resolve_device("cuda")
    if args.wandb:
        from fastrsb.wandb_log import check_installed
        check_installed()
    data = Path(args.data) if args.data else None
    if data is None:
        if recipe["name"] != "demo":
            raise UserError("--data DIR is required (an ImageNet-style folder with train/ and val/)")
        data = DEMO_DATA
        if not data.exists():
            from fastrsb.demo_data import write_demo
            print(f"generating the demo data set in {data} ...", flush=True)
            write_demo(data, keep_existing=True)  # a torchrun rank may have written it meanwhile
    if args.resume and not args.out and args.resume == "auto":
        raise UserError("--resume auto needs --out RUN_DIR (the run to continue)")
    out = Path(args.out) if args.out else Path("runs") / f"{recipe['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # Before importing torch (seconds), a wrong path is told at once. Under torchrun, train()
        # checks after the processes have met, so that all stop together: a process that stopped
        # here would leave the other machines' waiting for it.
        from fastrsb.data_folder import check_layout, refuse_a_run_inside_the_splits
        from fastrsb.folder_lock import refuse_if_in_use
        from fastrsb.metrics_log import refuse_a_second_run
        check_layout(data)
        refuse_a_run_inside_the_splits(out, data)
        refuse_if_in_use(out)
        refuse_a_second_run(out, args.resume)
        if args.resume not in (None, "auto"):  # before the run folder is made
            from fastrsb.checkpoint import checkpoint_file
            checkpoint_file(args.resume)
        elif recipe["initial_checkpoint"] and not (args.resume and (out / "last.pt").exists()):  # a new run reads it
            from fastrsb.initial_weights import initial_source
            initial_source(recipe["initial_checkpoint"])
    if (launched := _launch_processes(args, recipe, data, out)) is not None:
        from fastrsb import run_log
        run_log.attach(out / run_log.LOG_NAME, None)  # what the launcher said of its ranks, after rank 0's lines
        return launched
    from fastrsb.provenance import command_line
    from fastrsb.stopping import StopRequest
    from fastrsb.train import train
    stop = StopRequest()
    metrics = train(recipe, data, out, device=args.device, num_threads=args.threads, log_every=args.log_every,
                    resume=args.resume, grad_accum_steps=args.grad_accum_steps, stop=stop,
                    stop_after_steps=args.stop_after_steps, micro_batch=args.micro_batch,
                    deterministic=args.deterministic, command=command_line(args.argv), wandb_project=args.wandb,
                    keep_every=args.keep_every)
    main_rank = os.environ.get("RANK", "0") == "0"
    if metrics.get("stopped"):
        if main_rank:
            print(f"continue with: {resume_command(args, data, out)}")
        # A stop by signal exits with 128 + the signal's number (the shell's convention), so a job
        # script does not mistake it for a finished run; the checkpoint is complete either way.
        return 128 + stop.signum if stop.signum else 0
    if "top1" in metrics and main_rank:
        from fastrsb.metrics_log import read_rows
        from fastrsb.train import time_spent
        rows = out / "metrics.jsonl"  # none where --resume CKPT of a finished run gave a new --out nothing to do
        spent = time_spent(read_rows(rows)) if rows.is_file() else ""
        ema = f" (EMA top1 {metrics['ema_top1']:.2f})" if "ema_top1" in metrics else ""
        print(f"done: top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f}{ema}; {spent + '; ' if spent else ''}"
              f"run folder {out}")
    return 0


def _launch_processes(args, recipe: dict, data: Path, out: Path) -> int | None:
    """--nproc N > 1: the run in N processes, and its exit code. None: this process trains."""
    under_launcher = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.nproc == "1":
        if not under_launcher:
            from fastrsb.launch import unused_gpus_note
            if note := unused_gpus_note(args.device):
                print(note, flush=True)
        return None
    if under_launcher:
        raise UserError("--nproc starts the processes itself: run it without torchrun (or torchrun without --nproc)")
    from fastrsb.launch import launch, resolve_nproc
    nproc = resolve_nproc(args.nproc, args.device)
    if nproc == 1:
        return None
    if not args.resume:  # a batch that does not split: said once here, not by each process
        from fastrsb.accumulation import plan
        from fastrsb.parts import check_micro_batch
        check_micro_batch(recipe, nproc, *plan(recipe, nproc, args.grad_accum_steps, args.micro_batch, fits=None))
    # The processes check the data and the run folder again once they have met; the run folder's
    # name is chosen here, once, so that all of them write the same one.
    extra = (["--stop-after-steps", str(args.stop_after_steps)] if args.stop_after_steps else []) + \
            (["--resume", args.resume] if args.resume else [])
    from fastrsb import run_log
    run_log.hold_anew()
    return launch(nproc, train_words(args, data, out) + extra)


def train_words(args, data: Path, out: Path) -> list[str]:
    """`train RECIPE --data DATA --out OUT` with the run's options and --set values, as given."""
    words = ["train", args.recipe, "--data", str(data), "--out", str(out)]
    if args.deterministic:
        words.append("--deterministic")
    for flag, value, default in (("--device", args.device, "auto"), ("--threads", args.threads, None),
                                 ("--log-every", args.log_every, 50), ("--grad-accum-steps", args.grad_accum_steps, "auto"),
                                 ("--micro-batch", args.micro_batch, None), ("--wandb", args.wandb, None),
                                 ("--keep-every", args.keep_every, None)):
        if value != default:
            words += [flag, str(value)]
    for item in args.overrides:
        words += ["--set", item]
    return words


def resume_command(args, data: Path, out: Path) -> str:
    """The command that continues a stopped run: the same recipe, data, --set values and options."""
    words = ["fastrsb", *train_words(args, data, out)]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return shlex.join(words + ["--resume", "auto"])
    if os.environ.get("FASTRSB_LAUNCHED_NPROC"):  # started by --nproc: continued the same way
        return shlex.join(words + ["--nproc", os.environ["FASTRSB_LAUNCHED_NPROC"], "--resume", "auto"])
    # Under torchrun: the same number of processes (each has its loader position).
    words += ["--resume", "auto"]
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local == world:
        return shlex.join(["torchrun", f"--nproc_per_node={world}", "-m", "fastrsb"] + words[1:])
    launch = ["torchrun", f"--nnodes={world // local}", f"--nproc_per_node={local}", "-m", "fastrsb"] + words[1:]
    return f"{shlex.join(launch)}  (on each of the {world // local} machines, with the launch's rendezvous options)"


MIRRORED = ", each image with its mirror image (--flip)"


def cmd_eval(args) -> None:
    from fastrsb import per_class
    from fastrsb.checkpoint import checkpoint_file
    from fastrsb.checkpoint_eval import evaluate_checkpoint_at
    from fastrsb.metrics_log import check_table_path
    from fastrsb.model_folder import is_model_folder
    for checkpoint in args.checkpoints:  # a path mistyped is said now, not after the others' minutes
        if not is_model_folder(Path(checkpoint)):
            checkpoint_file(checkpoint)
    if args.per_class:  # where it cannot be written, said before the minutes of evaluation
        check_table_path(Path(args.per_class), "--per-class", "per_class.csv")
    several = len(args.checkpoints) > 1
    results = []
    for checkpoint in args.checkpoints:
        named = f"{checkpoint}: " if several else ""
        for done, result in enumerate(evaluate_checkpoint_at(
                checkpoint, args.data, args.img_size or [None], args.crop_pct or [None], args.device, args.batch_size,
                args.threads, ema=args.ema, real_labels=args.real_labels, partial_classes=args.partial_classes,
                per_class=bool(args.per_class), flip=args.flip)):
            results.append(result)  # said as soon as measured: a sweep over 50,000 images takes a while
            if args.json:
                print(json.dumps(result))
                continue
            for note in result.get("notes", []) if not done else []:
                print(f"note: {named}{note}")
            real = (f"; ReaL top1 {result['real_top1']:.2f} top5 {result['real_top5']:.2f} over "
                    f"{result['real_images']} images" if "real_top1" in result else "")
            print(f"{named}top1 {result['top1']:.2f} top5 {result['top5']:.2f} over {result['val_images']} images "
                  f"at {result['img_size']} px, crop {result['crop_pct']}{MIRRORED if args.flip else ''}{real}")
            if args.per_class:
                print(f"  the classes' mean top-1 {result['mean_class_top1']:.2f} (each class alike); lowest top-1: "
                      f"{per_class.lowest(result['per_class'])}")
    if args.per_class:
        per_class.write_csv(Path(args.per_class), results)
    if len(results) > 1 and not args.json:
        best = max(results, key=lambda result: result["top1"])  # the first of equals: the order given
        print(f"best: {best['checkpoint'] + ' ' if several else ''}top1 {best['top1']:.2f} at {best['img_size']} px, "
              f"crop {best['crop_pct']}")
    if args.per_class and not args.json:
        print(f"each class's figures: {args.per_class}")


def cmd_predict(args) -> None:
    from fastrsb import predict
    from fastrsb.checkpoint import checkpoint_file
    from fastrsb.metrics_log import check_table_path
    from fastrsb.model_folder import is_model_folder
    if not is_model_folder(Path(args.checkpoint)):
        checkpoint_file(args.checkpoint)
    if args.csv:  # where it cannot be written, said before any image is read
        check_table_path(Path(args.csv), "--csv", "predictions.csv")
    found = predict.predict(args.checkpoint, args.images, args.top, args.img_size, args.crop_pct, args.device,
                            args.batch_size, args.threads, ema=args.ema, flip=args.flip)
    if args.csv:
        predict.write_csv(Path(args.csv), found)
    for note in found.notes:  # beside --json's lines, not among them
        print(f"note: {note}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        for row in found.rows:
            print(json.dumps(row))
        return
    for row in found.rows:
        print(predict.line(row))
    print(f"{len(found.rows)} image(s) at {found.img_size} px, crop {found.crop_pct}{MIRRORED if args.flip else ''}"
          + (f"; each image's classes: {args.csv}" if args.csv else ""))


def cmd_export(args) -> None:
    from fastrsb.export import export_checkpoint
    if args.onnx:
        from fastrsb.onnx_export import check_available
        check_available()
    result = export_checkpoint(args.checkpoint, args.out, ema=args.ema, force=args.force, onnx=args.onnx)
    if args.json:
        print(json.dumps(result))
        return
    top1 = f", top-1 {result['top1']:.2f}" if result["top1"] is not None else ""
    epoch = (f"the mean of epochs {', '.join(map(str, result['averaged_epochs']))}" if result["averaged_epochs"]
             else f"epoch {result['epoch']}{top1}")
    print(f"{result['checkpoint']} ({epoch}, the {'EMA' if args.ema else 'model'}'s weights) -> "
          f"{result['out']}: model.safetensors ({result['weights_bytes'] / 1e6:.1f} MB), config.json "
          f"({result['architecture']}, {result['num_classes']} classes, tested at {result['img_size']} px, "
          f"crop {result['crop_pct']})")
    if result["ema_top1"] is not None:
        print(f"note: the checkpoint also holds its EMA's weights (top-1 {result['ema_top1']:.2f}), by which the run "
              "judged its epochs (best.pt, summary.csv): --ema exports them")
    if args.onnx:
        checked = (f"ONNX Runtime gives the network's logits to {result['onnx_checked']:.1g} of their scale"
                   if result["onnx_checked"] is not None else "not checked: pip install onnxruntime to check it")
        print(f"model.onnx ({result['onnx_bytes'] / 1e6:.1f} MB): input images (batch, 3, height, width) float32, "
              f"transformed as config.json says; output logits (batch, {result['num_classes']}); {checked}")
    print(f"in timm: timm.create_model(\"local-dir:{result['out']}\", pretrained=True)")


def cmd_average(args) -> None:
    from fastrsb.average import average_checkpoints
    from fastrsb.device import resolve_device
    device = resolve_device(args.device) if args.bn_data else "cpu"
    batch = args.batch_size or (256 if device == "cuda" else 64)
    result = average_checkpoints(args.checkpoints, args.out, args.bn_data, args.bn_images, device, batch)
    epochs = ", ".join(str(c["epoch"]) for c in result["checkpoints"])
    measured = result["bn_recomputed"]
    bn = (f"; BatchNorm's statistics measured anew over {measured['images']:,} train images of {measured['data']} "
          f"at {measured['img_size']} px" if measured else "")
    print(f"{result['out']}: the mean of {len(result['checkpoints'])} checkpoints' weights (epochs {epochs})"
          f"{' and of their EMAs' if result['ema'] else ''}{bn}; evaluate it with fastrsb eval {result['out']} "
          "--data DIR")
    if result["ema_left_out"]:
        print("note: not every checkpoint kept an EMA, so the EMAs' weights are not averaged (the models' are)")


def cmd_doctor(args) -> int | None:
    from fastrsb.doctor import report, run_doctor
    from fastrsb.doctor_cluster import report_cluster, run_cluster_doctor, under_torchrun
    from fastrsb.recipe import load_recipe
    load_recipe(args.recipe)  # a wrong name is told before anything else runs
    if args.nproc != "1" and not under_torchrun():  # the job's checks across this machine's processes
        from fastrsb.launch import launch, resolve_nproc
        nproc = resolve_nproc(args.nproc, "auto")
        if nproc > 1:
            words = ["doctor", "--recipe", args.recipe] + (["--data", args.data] if args.data else []) + \
                    (["--out", args.out] if args.out else []) + (["--json"] if args.json else []) + \
                    (["--keep-every", str(args.keep_every)] if args.keep_every else [])
            return launch(nproc, words)
    if under_torchrun():  # one report for the job: every machine's checks and the all-reduce, on rank 0
        ok, machines, job = run_cluster_doctor(args.data, args.out, args.recipe, args.keep_every)
        if machines is None:  # not rank 0: it says nothing, and ends as rank 0 does
            return None if ok else 2
        text, data = report_cluster(ok, machines, job)
    else:
        text, data = report(run_doctor(args.data, args.out, args.recipe, args.keep_every))
        data["problems"] = sum(not c["ok"] and c["fatal"] for c in data["checks"])
    print(json.dumps(data) if args.json else text)
    if not data["ok"]:
        raise UserError(f"{data['problems']} problem(s) (listed above): fix them before a long run")
    return None


def cmd_compare(args) -> int:
    from fastrsb.determinism import compare
    from fastrsb.provenance import differences, recipe_differences
    agree, line = compare(args.run_a, args.run_b)
    print(line)
    if found := recipe_differences(args.run_a, args.run_b):  # runs of other recipes: no wonder they diverge
        print(f"note: the runs' recipes differ in {'; '.join(found)}")
    if found := differences(args.run_a, args.run_b):  # what to suspect first where they diverge
        print(f"note: the runs' first starts differ in {'; '.join(found)}")
    return 0 if agree else 1


def cmd_runs(args) -> None:
    from fastrsb.run_list import describe, run_folders, table
    folders = [folder for root in args.dirs for folder in run_folders(Path(root))]
    runs = [describe(folder) for folder in dict.fromkeys(folders)]  # a folder under two DIRs: once
    if args.json:
        for run in runs:
            print(json.dumps(run))
    elif runs:
        print(table(runs))
    else:
        print(f"no run folders under {' '.join(args.dirs)} (a run folder holds recipe.json, fastrsb's, or "
              f"args.yaml, timm train.py's)")


def cmd_plot(args) -> None:
    from fastrsb.plot import plot_run, plot_runs
    if len(args.run_dirs) == 1:
        print(f"wrote {plot_run(args.run_dirs[0], args.output, args.backend)}")
    else:
        print(f"wrote {plot_runs(args.run_dirs, args.output, args.backend)}")


def cmd_data_demo(args) -> None:
    from fastrsb.demo_data import CLASSES, write_demo
    if not 2 <= args.classes <= len(CLASSES):
        raise UserError(f"--classes {args.classes}: the demo data set has 2 to {len(CLASSES)} classes")
    if args.train_per_class < 1 or args.val_per_class < 1:
        raise UserError("--train-per-class and --val-per-class must be 1 or more")
    from fastrsb.file_jobs import make_folder
    make_folder(Path(args.dir), "the demo data folder")  # (an empty one is replaced whole by the staged set)
    write_demo(args.dir, args.train_per_class, args.val_per_class, args.seed, args.classes)
    print(f"wrote {args.dir}/train and {args.dir}/val")


def cmd_data_check(args) -> None:
    from fastrsb.data_folder import check
    problems, notes = check(args.dir, args.workers, decode=not args.no_decode)
    for note in notes:
        print(f"  note: {note}")
    for problem in problems:
        print(f"  {problem}")
    if problems:
        raise UserError(f"{len(problems)} problem(s) in {args.dir} (listed above)")
    print("ok: the loaders read every image" if Path(args.dir).is_file() else "ok: ready to train")


def cmd_data_prepare_val(args) -> None:
    from fastrsb.prepare import prepare_val
    result = prepare_val(args.val_dir, args.labels, args.synsets, args.copy_to)
    if result["missing"]:
        raise UserError(f"{result['missing']:,} labelled image(s) are not in {args.val_dir}")


def cmd_data_prepare(args) -> None:
    from fastrsb.raw_imagenet import prepare
    problems = prepare(args.raw, args.out, args.synsets, args.workers)
    for problem in problems:
        print(f"  {problem}")
    if problems:
        raise UserError(f"{len(problems)} problem(s) in {args.out} (listed above)")
    print(f"ok: {args.out} is ready to train (fastrsb data check {args.out} decodes every image)")


def cmd_data_shrink(args) -> None:
    from fastrsb.prepare import shrink
    result = shrink(args.source, args.target, args.max_side, args.quality, args.workers, upright=args.upright)
    if result["failed"]:
        raise UserError(f"{result['failed']} image(s) could not be read (listed above); the rest are in {args.target}")


def cmd_data_split(args) -> None:
    from fastrsb.data_split import Portion, SplitRule, split, summary
    share = args.val if args.val is not None or args.val_per_class is not None else 0.1
    test = None if args.test is None and args.test_per_class is None else Portion("test", args.test,
                                                                                    args.test_per_class)
    rule = SplitRule(Portion("val", share, args.val_per_class), test, args.seed)
    result = split(args.source, args.target, rule, args.labels, (args.file_column, args.label_column))
    for line in summary(Path(args.target), result, rule):
        print(line)


def count_option(text: str) -> int:
    """A whole number of 1 or more (threads, steps, images, processes): 0 is refused, not taken
    for "the default" as a falsy value would be."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _process_count(text: str) -> str:
    return text if text == "all" else str(count_option(text))


def _crop_fraction(text: str) -> float:
    """crop_pct as the recipes take it: in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], as the recipes' crop_pct, not {value}")
    return value


def _accumulation(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number, not {text!r}") from None
    return count_option(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrsb", description="ResNet-strikes-back training with DALI loaders")
    parser.add_argument("--version", action="version", version=f"fastrsb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("recipe", help="print a resolved recipe")
    p.add_argument("recipe", nargs="?", default="a3", help="a1, a2, a3, demo, tiny or a path to a .toml file")
    shown = p.add_mutually_exclusive_group()  # one form of output
    shown.add_argument("--json", action="store_true", help="one JSON object")
    shown.add_argument("--keys", action="store_true", help="list every recipe key with its type and meaning")
    shown.add_argument("--toml", action="store_true",
                       help="the recipe as a whole recipe file (--set values in), to edit and train: fastrsb recipe "
                            "a3 --toml > mine.toml; fastrsb train mine.toml")
    shown.add_argument("--timm", action="store_true",
                       help="the same recipe as commands of timm's train.py and validate.py, and what still differs")
    p.add_argument("--gpus", type=count_option, default=1, help="with --timm: the GPUs timm's run splits the batch over")
    _add_common(p)
    p.set_defaults(func=cmd_recipe)

    _add_train_command(sub)

    p = sub.add_parser("eval", help="top-1/top-5 of a checkpoint, or of a timm model folder (fastrsb export's, "
                                    "or a timm model's from the hub)")
    p.add_argument("checkpoints", nargs="+", metavar="checkpoint",
                   help="a run's checkpoint (last.pt, best.pt), one of timm's train.py (model_best.pth.tar: tested as "
                        "its own validation was), or a folder with config.json and model.safetensors or "
                        "pytorch_model.bin; several: each in turn, a line each, the best last")
    p.add_argument("--data", required=True, help="folder with val/<class>/ (or a class folder tree itself; class "
                                                 "folders named 0 to N-1, as ImageNet-V2's, are class indices)")
    p.add_argument("--img-size", type=count_option, nargs="+", default=None, metavar="N",
                   help="test size(s) in px; several: each is evaluated (default: the recipe's test_img_size)")
    p.add_argument("--crop-pct", type=_crop_fraction, nargs="+", default=None, metavar="F",
                   help="the share(s) of the resized image kept; several: each with each size "
                        "(default: the recipe's crop_pct)")
    p.add_argument("--batch-size", type=count_option, default=128)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=count_option, default=None)
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    p.add_argument("--flip", action="store_true", help="test-time augmentation: each image's outputs averaged with "
                                                       "its mirror image's (two forward passes)")
    p.add_argument("--real-labels", nargs="?", const=True, default=False, metavar="REAL_JSON",
                   help="ImageNet-ReaL's top-1/top-5 beside, on ImageNet's val images (as timm's validate.py "
                        "--real-labels); REAL_JSON: a real.json, default the copy timm ships")
    p.add_argument("--partial-classes", choices=["only", "all"], default=None,
                   help="where the data holds some of the weights' classes (ImageNet-A's or -R's 200): rank each "
                        "image among those alone (only: their protocol, timm's validate.py --valid-labels) or among "
                        "all the weights' classes (all)")
    p.add_argument("--per-class", metavar="CSV", default=None,
                   help="write each class's images, top-1, top-5 and the class it is most often taken for to CSV "
                        "(a row per class, size and crop), and name the classes of the lowest top-1")
    p.add_argument("--json", action="store_true", help="one JSON object a line, a line per size and crop")
    p.set_defaults(func=cmd_eval)

    _add_predict_command(sub)
    _add_export_command(sub)
    _add_average_command(sub)

    p = sub.add_parser("doctor", help="every check a run depends on, at once: GPUs, driver and CUDA builds, DALI, "
                                      "cores, disk, and the data folder")
    p.add_argument("--data", help="also check this data folder (layout, counts, file headers, a decode probe)")
    p.add_argument("--out", help="the run folder the checkpoints would go to (default: runs)")
    p.add_argument("--recipe", default="a3", help="the recipe whose checkpoints the disk check sizes (default a3)")
    p.add_argument("--keep-every", type=count_option, default=None, metavar="N",
                   help="the run will keep every N-th epoch's checkpoint too (train --keep-every): the disk check "
                        "counts them")
    p.add_argument("--nproc", type=_process_count, default="1", metavar="N|all",
                   help="also as a run of N processes on this machine would: the gradient all-reduce between them "
                        "(NCCL on GPUs) timed and checked; all: one per GPU")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("compare", help="the first logged step where two runs' batches or losses differ "
                                       "(exit 1), or that they agree (exit 0)")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("runs", help="every run folder under the DIRs (default runs), fastrsb's and timm train.py's "
                                    "(output/train): recipe, progress, running or not, time to go, top-1, when, on what")
    p.add_argument("dirs", nargs="*", default=["runs"], metavar="DIR")
    p.add_argument("--json", action="store_true", help="one JSON object a run")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("plot", help="loss, accuracy, LR, throughput and data-wait curves of a run (or of several, "
                                    "compared), as a PNG")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a fastrsb run folder, or timm's train.py output "
                                                                  "folder (its summary.csv)")
    p.add_argument("-o", "--output", default=None, help="a .png file, or a folder for the default name (default: "
                                                        "RUN_DIR/curves.png; for several runs, curves-A-B.png in the "
                                                        "current folder)")
    p.add_argument("--backend", choices=["auto", "matplotlib", "pillow"], default="auto",
                   help="auto: matplotlib where installed (pip install \"fastrsb[plot]\"), else Pillow")
    p.set_defaults(func=cmd_plot)

    _add_data_commands(sub)
    return parser


def _add_average_command(sub) -> None:
    p = sub.add_parser("average", help="the mean of several checkpoints' weights (a run's kept epochs), as timm's "
                                       "avg_checkpoints.py: a checkpoint eval, export and predict take")
    p.add_argument("checkpoints", nargs="+", help="fastrsb checkpoints of one model and classes (e.g. "
                                                  "RUN_DIR/epoch-*.pt)")
    p.add_argument("--out", required=True, help="the checkpoint file to write")
    p.add_argument("--bn-data", metavar="DIR", help="measure the mean's BatchNorm statistics anew over DIR/train "
                                                    "(the recipe's train crops), as SWA does, instead of averaging them")
    p.add_argument("--bn-images", type=count_option, metavar="N", help="with --bn-data: at most N images (default: "
                                                                       "one pass over DIR/train)")
    p.add_argument("--batch-size", type=count_option, help="with --bn-data: images a batch (default 256 on a GPU, "
                                                           "64 on the CPU)")
    p.add_argument("--device", help="with --bn-data: cuda or cpu (default: cuda where there is one)")
    p.set_defaults(func=cmd_average)


def _add_export_command(sub) -> None:
    """`fastrsb export CHECKPOINT OUT ...`."""
    p = sub.add_parser("export", help="a checkpoint's weights as a timm model folder (model.safetensors, config.json)")
    p.add_argument("checkpoint")
    p.add_argument("out", help="the folder to write (refused if it holds files, unless --force)")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument("--force", action="store_true", help="replace what OUT holds")
    p.add_argument("--onnx", action="store_true",
                   help="also model.onnx (batch and size dynamic), checked against the network with ONNX Runtime "
                        "(pip install 'fastrsb[onnx]')")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_export)


def _add_predict_command(sub) -> None:
    """`fastrsb predict CHECKPOINT IMAGE... ...`."""
    p = sub.add_parser("predict", help="each image's top classes and their probabilities by a checkpoint or a timm "
                                       "model folder: image files, or every image under folders")
    p.add_argument("checkpoint", help="what fastrsb eval takes: a run's last.pt or best.pt, timm train.py's "
                                      "checkpoint, or a timm model folder")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders (every image below them)")
    p.add_argument("--top", type=count_option, default=5, metavar="K", help="classes per image (default 5)")
    p.add_argument("--img-size", type=count_option, default=None, metavar="N",
                   help="test size in px (default: the recipe's test_img_size)")
    p.add_argument("--crop-pct", type=_crop_fraction, default=None, metavar="F",
                   help="the share of the resized image kept (default: the recipe's crop_pct)")
    p.add_argument("--batch-size", type=count_option, default=64)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=count_option, default=None)
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights")
    p.add_argument("--flip", action="store_true", help="each image's outputs averaged with its mirror image's")
    p.add_argument("--csv", metavar="CSV", default=None,
                   help="also write the classes to CSV: a row per image and rank (file, rank, index, class, words, "
                        "probability)")
    p.add_argument("--json", action="store_true", help="one JSON object a line, a line per image")
    p.set_defaults(func=cmd_predict)


def _add_train_command(sub) -> None:
    """`fastrsb train RECIPE ...`."""
    p = sub.add_parser("train", help="train a recipe")
    p.add_argument("recipe", help="a1, a2, a3, demo, tiny or a path to a .toml file")
    p.add_argument("--data", help="ImageNet-style folder with train/<class>/ and val/<class>/ (demo: generated)")
    p.add_argument("--out", help="run folder (default runs/<recipe>-<time>)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if present")
    p.add_argument("--threads", type=count_option, default=None, help="DALI CPU threads per process (default: its share of the cores, at most 8)")
    p.add_argument("--log-every", type=count_option, default=50, help="steps between progress updates (host syncs)")
    p.add_argument("--resume", metavar="auto|CKPT", default=None,
                   help="continue: 'auto' takes --out's last.pt (starts fresh if there is none); exactly on the "
                        "number of processes that wrote it, else with a fresh data order (said at start-up)")
    p.add_argument("--grad-accum-steps", type=_accumulation, default="auto", metavar="auto|K",
                   help="micro-batches per optimizer step and process; auto (default): from --micro-batch, or the "
                        "largest micro-batch that fits the GPU (the CPU: its memory), so the recipe's global batch "
                        "holds on any GPU count")
    p.add_argument("--micro-batch", type=count_option, default=None, metavar="N",
                   help="images per process and micro-batch (with --grad-accum-steps auto)")
    p.add_argument("--deterministic", action="store_true",
                   help="torch's deterministic algorithms, and a hash of each logged batch (fastrsb compare)")
    p.add_argument("--nproc", type=_process_count, default="1", metavar="N|all",
                   help="processes on this machine, one per GPU (all: every visible GPU), started and stopped "
                        "together; with --device cpu, N CPU processes (gloo). Several machines: torchrun")
    p.add_argument("--stop-after-steps", type=count_option, default=None, metavar="N",
                   help="save a resumable checkpoint and stop once N optimizer steps are done in total")
    p.add_argument("--keep-every", type=count_option, default=None, metavar="N",
                   help="also keep every N-th epoch's checkpoint, and the last's, as RUN_DIR/epoch-NNN.pt (hard "
                        "links to last.pt as it was; each takes a checkpoint's room once last.pt moves on)")
    p.add_argument("--wandb", metavar="PROJECT", default=None,
                   help="also log the metrics to a Weights & Biases run in PROJECT (pip install wandb; "
                        "WANDB_MODE=offline without a network); a resumed run continues its W&B run without it")
    _add_common(p)
    p.set_defaults(func=cmd_train)


def _add_data_commands(sub) -> None:
    """`fastrsb data demo | check | prepare | prepare-val | shrink | split`."""
    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    d = data_sub.add_parser("demo", help="write the generated demo data set")
    d.add_argument("dir")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--train-per-class", type=int, default=120)
    d.add_argument("--val-per-class", type=int, default=30)
    d.add_argument("--classes", type=int, default=8)
    d.set_defaults(func=cmd_data_demo)
    d = data_sub.add_parser("check", help="list every problem of DIR/train and DIR/val: empty or differing "
                                          "classes, files that do not decode, files the loaders skip")
    d.add_argument("dir", help="the data folder, or a loader's file list (lines 'relative/path label')")
    d.add_argument("--workers", type=count_option, default=None, help="decoding processes (default: cores)")
    d.add_argument("--no-decode", action="store_true", help="only the folder structure (fast)")
    d.set_defaults(func=cmd_data_check)
    d = data_sub.add_parser("prepare", help="ImageNet as downloaded (ILSVRC2012 tars, per-class tars, Kaggle's "
                                            "layout, the Hugging Face hub's ILSVRC/imagenet-1k or timm/imagenet-1k-wds) -> "
                                            "OUT/train/<wnid>/ and OUT/val/<wnid>/; resumable; RAW is only read")
    d.add_argument("raw", help="the folder the download is in")
    d.add_argument("out")
    d.add_argument("--synsets", help="with the devkit's ground truth: its meta.mat, or the wnids in ILSVRC2012_ID "
                                     "order, one per line (default: the meta.mat of the devkit tar in RAW)")
    d.add_argument("--workers", type=count_option, default=None, help="processes (default: cores, at most 16)")
    d.set_defaults(func=cmd_data_prepare)
    d = data_sub.add_parser("prepare-val", help="sort ILSVRC2012's flat validation folder into class folders")
    d.add_argument("val_dir")
    d.add_argument("labels", nargs="?", help="LOC_val_solution.csv, or the devkit's "
                                             "ILSVRC2012_validation_ground_truth.txt (none: the images' names end in "
                                             "their wnid, <image>_<wnid>.JPEG, as the Hugging Face hub's archives "
                                             "name them)")
    d.add_argument("--synsets", help="with the devkit's ground truth: its meta.mat, or the wnids in ILSVRC2012_ID "
                                     "order, one per line")
    d.add_argument("--copy-to", metavar="DIR", help="copy into DIR/<wnid>/ and leave VAL_DIR as it is (default: move "
                                                    "the images into class folders inside VAL_DIR)")
    d.set_defaults(func=cmd_data_prepare_val)
    d = data_sub.add_parser("shrink", help="a compact copy: every image re-encoded as RGB JPEG, longer side <= N")
    d.add_argument("source")
    d.add_argument("target")
    d.add_argument("--max-side", type=int, default=500, help="longer side in pixels (default 500)")
    d.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    d.add_argument("--workers", type=count_option, default=None, help="processes (default: cores)")
    d.add_argument("--upright", action="store_true", help="turn images as their EXIF orientation says (default: "
                                                          "the pixels as stored, as the loaders and timm read them)")
    d.set_defaults(func=cmd_data_shrink)
    d = data_sub.add_parser("split", help="a folder of class folders (one's own data set) -> TARGET/train/<class>/ "
                                          "and TARGET/val/<class>/ (and test/), each class split alike; hard links "
                                          "where the disk allows")
    d.add_argument("source", help="SOURCE/<class>/<image>: every image of each class, to split (or, with "
                                  "--labels, the folder the table's images are below)")
    d.add_argument("target", help="a new (or empty) folder for train/ and val/")
    how_many = d.add_mutually_exclusive_group()
    how_many.add_argument("--val", type=float, metavar="SHARE", help="the share of each class's images that goes "
                                                                     "to val (default 0.1)")
    how_many.add_argument("--val-per-class", type=int, metavar="N", help="instead: N images of each class to val")
    how_many = d.add_mutually_exclusive_group()
    how_many.add_argument("--test", type=float, metavar="SHARE", help="also a test/ split: this share of each class's "
                                                                      "images (default: none)")
    how_many.add_argument("--test-per-class", type=int, metavar="N", help="or N images of each class to test/")
    d.add_argument("--seed", type=int, default=0, help="which images go to val (default 0): the same seed, the "
                                                       "same split")
    d.add_argument("--labels", metavar="TABLE", help="the classes from a CSV/TSV with a header: a column naming each "
                                                     "image below SOURCE (with or without its extension), one its "
                                                     "class")
    d.add_argument("--file-column", metavar="NAME", help="with --labels: the column naming the images (default: the "
                                                         "first that does)")
    d.add_argument("--label-column", metavar="NAME", help="with --labels: the column of the classes (default: the "
                                                          "other one, where there are two)")
    d.set_defaults(func=cmd_data_split)


def main(argv: list[str] | None = None) -> int:
    from fastrsb import quiet_imports
    quiet_imports.install()  # timm without wandb (~3 s a command where wandb is installed)
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # as given: RUN_DIR/starts.jsonl records it
    # A run's log (RUN_DIR/train.log) takes what the command prints, its error included, once
    # train() has made the run folder.
    with RunLog() if args.func is cmd_train else contextlib.nullcontext():
        return _run(args)


def _run(args) -> int:
    """The command, and its error said in one line where it is the user's to mend."""
    from fastrsb.pipelines import DatasetError
    try:
        return args.func(args) or 0
    except (UserError, DatasetError) as err:
        if not (isinstance(err, StoppedWithAnother) and os.environ.get("FASTRSB_LAUNCHED_NPROC")):
            say_error(str(err))
        else:  # the failing rank says it on the same terminal; the run's log (rank 0's) keeps why
            from fastrsb import run_log
            run_log.log_only(f"fastrsb: error: {err}\n")
        return 2
    except BrokenPipeError:
        # What reads the output has gone (`fastrsb predict ... | head`): nothing is left to say, and
        # Python's flush at exit would fail again, so stdout goes to /dev/null; exit as a command
        # ended by SIGPIPE does (128 + 13), not with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # a disk that takes no more, wherever a command met it: one line, not a traceback
        from fastrsb.file_jobs import free_gb, stops_writing
        if not stops_writing(err):
            raise
        where = Path(os.fsdecode(err.filename)) if err.filename else Path.cwd()
        say_error(f"cannot write {where} ({err.strerror}; {free_gb(where.parent):,.1f} GB free on its disk): make "
                  "room (or make it writable), then run the command again")
        return 2
    except KeyboardInterrupt:
        print("fastrsb: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
