"""Bad input: each gives one clear line naming the problem, exit code 2, no traceback, no hang."""
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import assert_user_error, run_cli


def train(data, *extra):
    # A run folder of its own unless the test names one: not runs/ in the directory pytest runs in.
    out = [] if "--out" in map(str, extra) else ["--out", Path(tempfile.mkdtemp(prefix="fastrsb-errors-")) / "run"]
    return run_cli("train", "tiny", "--data", data, "--device", "cpu", *out, *extra, check=False)


@pytest.fixture
def copy_of(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    return root


def test_missing_data_folder(tmp_path):
    proc = train(tmp_path / "nowhere")
    assert_user_error(proc, "does not exist", "nowhere/train/<class>")
    assert "data demo" not in proc.stderr  # a wrong path is not a request for demo data


def test_run_folder_that_cannot_be_made(tiny_data, tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    assert_user_error(train(tiny_data, "--out", tmp_path / "taken"),
                      f"the run folder {tmp_path / 'taken'} is a file: a folder goes there")
    assert_user_error(train(tiny_data, "--out", tmp_path / "taken" / "run"), "cannot make the run folder")
    assert (tmp_path / "taken").read_text() == "a file, not a folder"


def test_folder_without_splits(tmp_path):
    assert_user_error(train(tmp_path), "has no 'train' folder")
    (tmp_path / "train").mkdir()
    assert_user_error(train(tmp_path), "has no 'val' folder")
    (tmp_path / "val").mkdir()
    assert_user_error(train(tmp_path), "no class folders")


def test_a_refused_run_leaves_the_folder_it_was_given_and_removes_one_it_made(copy_of, tmp_path):
    """A run refused at start-up (a class that holds no images) removes the run folder it made, and
    leaves one that was there before, empty as it is (made by its user, a job script)."""
    for image in (copy_of / "train" / "n01_vstripes").iterdir():
        image.unlink()
    runs = tmp_path / "runs"
    (runs / "given").mkdir(parents=True)
    for out in ("given", "made"):
        assert_user_error(train(copy_of, "--out", runs / out), "n01_vstripes holds no images")
    assert [path.name for path in runs.iterdir()] == ["given"] and not any((runs / "given").iterdir())


def test_missing_val(copy_of):
    shutil.rmtree(copy_of / "val")
    assert_user_error(train(copy_of), "has no 'val' folder")


def test_empty_class(copy_of):
    for image in (copy_of / "train" / "n01_vstripes").iterdir():
        image.unlink()
    assert_user_error(train(copy_of), "n01_vstripes holds no images")


def test_classes_differ(copy_of):
    shutil.rmtree(copy_of / "val" / "n03_dots")
    assert_user_error(train(copy_of), "train and val classes differ", "n03_dots")


def test_one_class_is_refused(copy_of):
    for split in ("train", "val"):
        for folder in list((copy_of / split).iterdir())[1:]:
            shutil.rmtree(folder)
    assert_user_error(train(copy_of), "holds one class", "two or more")
    checked = run_cli("data", "check", copy_of, "--workers", "1", check=False)  # and `data check` says so too
    assert_user_error(checked, "1 problem(s)")
    assert "  train/ holds one class: a classifier needs two or more" in checked.stdout


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("damage", ["empty", "garbage"])
def test_broken_file_stops_the_run_before_its_first_step(copy_of, tmp_path, split, damage):
    """Caught by the header scan at start-up, for train and val alike: nothing trains first."""
    victim = sorted((copy_of / split / "n02_checks").glob("*.JPEG"))[3]
    victim.write_bytes(b"" if damage == "empty" else b"this is not an image" * 20)
    proc = train(copy_of, "--out", tmp_path / "run")
    assert_user_error(proc, victim.name, "0 bytes" if damage == "empty" else "not an image")
    assert not (tmp_path / "run" / "last.pt").exists() and "epoch 1" not in proc.stdout


def test_truncated_train_jpeg_is_named(copy_of):
    """A truncated JPEG passes the header scan: DALI fails on it, and the CPU re-check names it."""
    victim = sorted((copy_of / "train" / "n02_checks").glob("*.JPEG"))[6]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    assert_user_error(train(copy_of), "cannot decode", victim.name)


def test_many_broken_files_are_counted_as_at_least_what_the_recheck_found(tmp_path):
    """Where DALI's message names no file, the CPU re-check stops at data_folder.RECHECK_LIMIT
    broken files: with more than that, the message does not state a count it did not make."""
    from PIL import Image
    from fastrsb.data_folder import RECHECK_LIMIT, explain_loader_error
    from fastrsb.pipelines import ImageList
    files = [str(tmp_path / f"{i:02d}.JPEG") for i in range(RECHECK_LIMIT + 2)]
    for file in files:
        Image.new("RGB", (64, 64), (9, 9, 9)).save(file)
    err = RuntimeError("Error in thread 0: Failed to decode sample #1\nCurrent pipeline object is no longer valid.")
    for broken, more in ((files[:5], "and 2 more: remove"), (files, f"and at least {RECHECK_LIMIT - 3} more: remove")):
        for file in broken:
            Path(file).write_bytes(Path(file).read_bytes()[:200])
        said = str(explain_loader_error(err, ImageList(files, [0] * len(files), ["c"])))
        assert said.startswith(f"cannot decode {files[0]} (") and more in said, said


def test_bad_val_image_keeps_the_trained_epoch(copy_of, tmp_path):
    """Validation fails on a truncated image after a whole epoch of training: the epoch was saved
    before validation began, so fixing the file and resuming validates it and goes on."""
    # In the last val batch: DALI decodes the first batches when the loader is built (start-up).
    victim = sorted((copy_of / "val" / "n03_dots").glob("*.JPEG"))[2]
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 3])
    out = tmp_path / "run"
    assert_user_error(train(copy_of, "--out", out, "--set", "epochs=2"), "cannot decode", victim.name)
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 6 and not state["validated"]
    # The epoch's training peak is saved with it and counts in the epoch's figure after the resume
    # (made 1000 GiB here, which the validating process never reaches: the figure must be it).
    assert state["metrics"]["peak_memory_gib"] > 0.1
    state["metrics"]["peak_memory_gib"] = 1000.0
    torch.save(state, out / "last.pt")
    listed = run_cli("runs", out).stdout.splitlines()  # why it stopped, from its train.log
    assert listed[1].split()[3:5] == ["0/2", "stopped"]
    assert listed[2].startswith("  why: error: cannot decode ") and victim.name in listed[2]
    victim.write_bytes(good)
    proc = train(copy_of, "--out", out, "--set", "epochs=2", "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    assert len(run_cli("runs", out).stdout.splitlines()) == 2  # done: no why
    log = (out / "train.log").read_text()
    assert log.count("===== ") == 2 and log.index("fastrsb: error: cannot decode") < log.index("resumed from")
    assert "epoch 1: train_loss" in proc.stdout and "epoch 2: train_loss" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]
    assert [r["peak_memory_gib"] for r in rows if r["kind"] == "epoch"][0] == 1000.0
    assert "peak memory 1000.00 GiB a process" in proc.stdout


def test_unreadable_file_named_by_the_loader(tiny_data):
    """A file that vanishes (or turns unreadable) after the start-up scan: DALI's reader names it,
    and so does the message (it said "Current pipeline object is no longer valid")."""
    from fastrsb.data_folder import loader_batches
    from fastrsb.errors import UserError
    from fastrsb.pipelines import list_images, train_loader
    images = list_images(tiny_data / "train")
    missing = images.files[5] + ".gone"
    broken = type(images)([*images.files[:5], missing, *images.files[6:]], images.labels, images.classes)
    with pytest.raises(UserError, match=f"{missing} is gone since the data was listed .DALI: File mapping failed.: "
                                        "put it back, or start again"):
        for _ in loader_batches(train_loader(broken, 8, 32, device="cpu"), broken):
            pass
    # There, but not a file DALI can read (a folder under an image's name): named as unreadable.
    unreadable = Path(missing)
    unreadable.mkdir()
    try:
        with pytest.raises(UserError, match=f"cannot read {missing} .DALI: .*remove or replace it"):
            for _ in loader_batches(train_loader(broken, 8, 32, device="cpu"), broken):
                pass
    finally:
        unreadable.rmdir()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(tiny_data):
    proc = run_cli("train", "tiny", "--data", tiny_data, "--device", "cuda", check=False)
    assert_user_error(proc, "--device cuda", "no CUDA GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_said_before_the_demo_data_is_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(run_cli("train", "demo", "--device", "cuda", check=False), "--device cuda", "no CUDA GPU")
    assert not (tmp_path / "data").exists()


def test_recipe_that_does_not_parse(tmp_path, tiny_data):
    (tmp_path / "r.toml").write_text("model = \n")
    assert_user_error(run_cli("train", tmp_path / "r.toml", "--data", tiny_data, check=False), "does not parse")


def test_randaugment_string_timm_would_not_take(tiny_data):
    proc = run_cli("train", "tiny", "--data", tiny_data, "--set", "aa=rand-m6-x3", check=False)
    assert_user_error(proc, "'aa'", "unsupported section 'x3'")
    proc = run_cli("train", "tiny", "--data", tiny_data, "--set", "aa=augmix-m5", check=False)
    assert_user_error(proc, "not a RandAugment string")


def test_unknown_model(tiny_data, tmp_path):
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / "o", "--set", "model=resnet5000", check=False)
    assert_user_error(proc, "unknown timm model 'resnet5000'")


def test_odd_batch_without_mixing_trains(tiny_data, tmp_path):
    """No mixing needs no even batch (the mixer was built, and refused 7, even with mixing off)."""
    proc = train(tiny_data, "--out", tmp_path / "run", "--set", "mixup=0", "--set", "cutmix=0", "--set", "batch_size=7",
                 "--set", "epochs=1", "--set", "warmup_epochs=0")
    assert proc.returncode == 0, proc.stderr
    assert_user_error(train(tiny_data, "--out", tmp_path / "mixed", "--set", "batch_size=7"),
                      "batch_size 7", "must be even")


@pytest.mark.parametrize("argv, fragment", [
    (["train", "tiny", "--threads", "0"], "argument --threads: must be 1 or more, not 0"),  # was: the default
    (["train", "tiny", "--threads", "-1"], "argument --threads: must be 1 or more, not -1"),  # was: DALI's traceback
    (["train", "tiny", "--log-every", "0"], "argument --log-every: must be 1 or more"),  # was: ZeroDivisionError
    (["train", "tiny", "--stop-after-steps", "0"], "argument --stop-after-steps: must be 1 or more"),  # stopped at 1
    (["train", "tiny", "--grad-accum-steps", "0"], "argument --grad-accum-steps: must be 1 or more"),
    (["train", "tiny", "--micro-batch", "x"], "argument --micro-batch: expected a whole number, not 'x'"),
    (["eval", "last.pt", "--data", "d", "--batch-size", "0"], "argument --batch-size: must be 1 or more"),
    (["eval", "last.pt", "--data", "d", "--img-size", "0"], "argument --img-size: must be 1 or more"),
    (["eval", "last.pt", "--data", "d", "--crop-pct", "2"], "argument --crop-pct: must lie in (0, 1]"),
    (["eval", "last.pt", "--data", "d", "--crop-pct", "0"], "argument --crop-pct: must lie in (0, 1]"),
    (["data", "check", "d", "--workers", "0"], "argument --workers: must be 1 or more"),
])
def test_numbers_out_of_range_are_refused_by_name(argv, fragment):
    """Refused before anything runs, naming the option: a 0 was taken for the default (threads,
    workers, eval's size and crop), or failed deep inside (a division, DALI, a pipeline assert)."""
    proc = run_cli(*argv, check=False)
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_version_and_demo_data_arguments(tmp_path):
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("fastrsb 0.")
    assert_user_error(run_cli("data", "demo", tmp_path / "d", "--classes", "1", check=False), "--classes 1")


def test_cuda_graphs_where_they_cannot_apply(tiny_data, tmp_path):
    assert_user_error(train(tiny_data, "--out", tmp_path / "a", "--set", "cuda_graphs=true"), "cuda_graphs", "needs a GPU")
    # The graphs are captured by fastrsb, not inductor: compile=false does not change the answer.
    assert_user_error(train(tiny_data, "--out", tmp_path / "b", "--set", "cuda_graphs=true", "--set", "compile=false"),
                      "cuda_graphs", "needs a GPU")
    assert_user_error(train(tiny_data, "--out", tmp_path / "c", "--set", "high_priority_stream=true"),
                      "high_priority_stream = true needs a GPU")
    # auto: on where the step can be a graph, and on the CPU it cannot: the run trains, and its
    # start-up line says nothing of graphs (they are GPU work).
    proc = train(tiny_data, "--out", tmp_path / "d", "--set", "cuda_graphs=auto", "--set", "epochs=1",
                 "--set", "warmup_epochs=0")
    assert proc.returncode == 0, proc.stderr
    assert "| 1 x cpu float32 | batch" in proc.stdout and "CUDA graphs" not in proc.stdout, proc.stdout


def test_counts_are_stated_against_imagenet(tiny_data, tmp_path):
    proc = train(tiny_data, "--out", tmp_path / "run", "--stop-after-steps", "1")
    assert ("data: 48 train / 20 val images in 4 classes: not ImageNet-1k's (1,281,167 / 50,000 / 1,000), "
            "a subset or another data set; smallest train classes: n00_hstripes 12") in proc.stdout


def test_imagenet_shaped_counts_name_the_short_classes():
    from fastrsb.data_folder import describe_counts
    from fastrsb.pipelines import ImageList
    classes = [f"n{i:08d}" for i in range(1000)]

    def listing(per_class, short=None):
        labels = [c for c in range(1000) for _ in range(per_class - (c == short))]
        return ImageList([f"{i}.JPEG" for i in range(len(labels))], labels, classes)
    line = describe_counts(listing(1), listing(50, short=7))
    assert "1,000 train / 49,999 val images in 1,000 classes: not ImageNet-1k's" in line
    assert "1,001 class folder(s) short of ImageNet's: train/n00000000 1" in line  # 1,000 train + 1 val
    assert describe_counts(listing(50), listing(50)).endswith("1,000 class folder(s) short of ImageNet's: "
                                                              "train/n00000000 50, train/n00000001 50, "
                                                              "train/n00000002 50, train/n00000003 50, "
                                                              "train/n00000004 50")


def test_a_loader_failing_on_the_driver_points_to_doctor():
    """DALI built for a CUDA the driver cannot run fails at the loader's first batch: the message
    says so in one line and names the check that tells which build; other pipeline failures get
    no such hint."""
    from fastrsb.data_folder import explain_loader_error
    from fastrsb.pipelines import ImageList
    images = ImageList(["/data/train/a/1.JPEG"], [0], ["a"])
    driver = RuntimeError("Critical error in pipeline:\nCUDA driver version is insufficient for CUDA runtime "
                          "version\nCurrent pipeline object is no longer valid.")
    said = str(explain_loader_error(driver, images))
    assert said == ("data pipeline failed: CUDA driver version is insufficient for CUDA runtime version; "
                    "`fastrsb doctor` checks the driver against the CUDA that torch and DALI were built for")
    other = str(explain_loader_error(RuntimeError("Assert on \"x > 0\" failed: bad crop window"), images))
    assert other == 'data pipeline failed: Assert on "x > 0" failed: bad crop window'


# DALI's words where its memory runs out: in a decoder (DALI 1.x's form, then 2.x's, which quotes
# the pipeline's source), on the host, and from CUDA itself.
DALI_OUT_OF_MEMORY = {
    "GPU": ["Critical error in pipeline:\nError when executing Mixed operator ImageDecoder encountered:\nCUDA "
            "allocation failed\nCurrent pipeline object is no longer valid.",
            "Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image`,\nwhich was used "
            "in the pipeline definition with the following traceback:\n\n  File \"/opt/fastrsb/pipelines/graphs.py\""
            ", line 44, in train_pipeline\n    images = fn.decoders.image_random_crop(jpegs, device=\"mixed\")\n\n"
            "encountered:\n\nCan't allocate 402653184 bytes on device 0.\nCurrent pipeline object is no longer valid.",
            "Critical error in pipeline:\nError in GPU operator `nvidia.dali.fn.resize`,\nencountered:\n\nCUDA "
            "runtime API error cudaErrorMemoryAllocation (2):\nout of memory\nCurrent pipeline object is no longer "
            "valid."],
    "host": ["Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\nencountered:\n\n"
             "Error in thread 3: std::bad_alloc\nCurrent pipeline object is no longer valid."]}


def test_memory_run_out_in_the_loader_is_said_and_no_image_blamed(tiny_data, monkeypatch):
    """DALI's buffers outgrowing the GPU in its decoder (the likeliest place: they grow to the
    largest image decoded) is said as memory run out, with the batch option that helps. It was
    taken for a broken image: the message named the decoder, so every file was decoded again on
    the CPU (an hour for ImageNet) to say that none is broken, and the loader added the hint to
    run `fastrsb data check`."""
    import fastrsb.data_folder
    from fastrsb.data_folder import explain_loader_error
    from fastrsb.pipelines import list_images
    from fastrsb.pipelines.loader import _undecodable_named
    images = list_images(tiny_data / "train")
    monkeypatch.setattr(fastrsb.data_folder, "find_undecodable",
                        lambda files, **options: pytest.fail("decoded the files again"))
    for where, texts in DALI_OUT_OF_MEMORY.items():
        for text in texts:
            said = str(explain_loader_error(RuntimeError(text), images))
            assert said.startswith(f"the data pipeline ran out of {where} memory ("), said
            assert "--micro-batch N" in said and "--batch-size N" in said and "data check" not in said
            with pytest.raises(RuntimeError) as raised, _undecodable_named():
                raise RuntimeError(text)
            assert str(raised.value) == text  # as DALI said it, no hint to look for a broken image
    assert "GPU memory (Can't allocate 402653184 bytes on device 0.)" in str(explain_loader_error(
        RuntimeError(DALI_OUT_OF_MEMORY["GPU"][1]), images))
    # torch's own, from the torch RandAugment form at the hand-over, is the loader's too.
    torch_said = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.81 GiB"
    assert str(explain_loader_error(RuntimeError(torch_said), images)).startswith(
        f"the data pipeline ran out of GPU memory ({torch_said}): ")


def test_a_loader_error_names_a_file_whose_name_has_spaces_and_quotes(tmp_path):
    """DALI's message names the file; a name with spaces or quotes is found in it as listed, not
    by decoding every file again on the CPU (which would find none broken here)."""
    from fastrsb.data_folder import explain_loader_error
    from fastrsb.pipelines import ImageList
    odd = "/data/my set/train/class é/a file, with 'quotes'.JPEG"
    images = ImageList(["/data/my set/train/class é/other.JPEG", odd], [0, 0], ["class é"])
    err = RuntimeError(f"Error in thread 0: Failed to decode sample #1 : {odd}\nCurrent pipeline object is no "
                       "longer valid.")
    said = str(explain_loader_error(err, images))
    assert said.startswith(f"cannot decode {odd} (DALI: Error in thread 0: Failed to decode sample #1): remove")


def test_a_loader_error_naming_no_file_blames_no_image_dali_reads(tmp_path):
    """Where DALI's message names no file, the files are decoded again on the CPU to find it; an
    image over PIL's decompression-bomb limit, which DALI decodes, is not the one named (the
    message said "cannot decode" of it)."""
    from PIL import Image
    from fastrsb.data_folder import explain_loader_error
    from fastrsb.pipelines import ImageList
    huge, broken = tmp_path / "huge.JPEG", tmp_path / "broken.JPEG"
    Image.new("L", (13_400, 13_400), 90).save(huge, quality=10)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(broken)
    broken.write_bytes(broken.read_bytes()[:200])
    err = RuntimeError("Error in thread 0: Failed to decode sample #1\nCurrent pipeline object is no longer valid.")
    said = str(explain_loader_error(err, ImageList([str(huge), str(broken)], [0, 0], ["c"])))
    assert said.startswith(f"cannot decode {broken} (") and str(huge) not in said
    said = str(explain_loader_error(err, ImageList([str(huge)], [0], ["c"])))
    assert said.startswith("the data pipeline could not decode an image, and a CPU re-check of every file found none")


def test_an_error_line_is_written_at_once(monkeypatch):
    """Text and newline in one write: a C++ warning that torch writes to stderr from another thread
    (a lost store's "sendBytes failed") can then not land on the error's line."""
    import io
    import sys

    from fastrsb.cli import main

    class Writes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.calls = []

        def write(self, text):
            self.calls.append(text)
            return super().write(text)

    stderr = Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert main(["train", "no-such-recipe"]) == 2
    assert len(stderr.calls) == 1 and stderr.calls[0].startswith("fastrsb: error: ") and stderr.calls[0].endswith("\n")
    assert stderr.calls[0].count("\n") == 1


def test_a_full_disk_anywhere_is_one_line_and_other_os_errors_stay_tracebacks(tmp_path, monkeypatch):
    """A disk that takes no more (full, over quota, read-only), met by any command where it has no
    message of its own: one line naming the file and the free space. Another OSError is a bug to
    see whole."""
    import errno
    import fastrsb.demo_data

    def full(root, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(root) / "train" / "a.JPEG"))
    monkeypatch.setattr(fastrsb.demo_data, "write_demo", full)
    assert_user_error(run_cli("data", "demo", tmp_path / "demo", check=False),
                      f"cannot write {tmp_path / 'demo' / 'train' / 'a.JPEG'} (No space left on device;",
                      "GB free on its disk): make room (or make it writable), then run the command again")

    def broken(root, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(fastrsb.demo_data, "write_demo", broken)
    with pytest.raises(OSError, match="Input/output error"):
        run_cli("data", "demo", tmp_path / "demo", check=False)


def test_a_model_built_for_one_input_size_is_refused_other_sizes(tiny_data, tmp_path):
    """A timm model that takes one input size (a vision transformer's fixed grid of patches) at
    another train or test size: one line before the first image, not an AssertionError from the
    forward; at its size it trains, and eval refuses the other sizes alike."""
    out = tmp_path / "vit"
    vit = ("--set", "model=vit_tiny_patch16_224")
    assert_user_error(train(tiny_data, *vit, "--out", out), "vit_tiny_patch16_224 takes 224 x 224 images only, and "
                      "img_size is 32 and test_img_size is 40: use 224, or a model that takes any size")
    assert not out.exists()  # the run folder made at start-up goes again, empty
    run_cli("train", "tiny", "--data", tiny_data, "--out", out, "--device", "cpu", *vit, "--set", "img_size=224",
            "--set", "test_img_size=224", "--stop-after-steps", "1", check=False)
    assert (out / "last.pt").is_file()
    assert_user_error(run_cli("eval", out / "last.pt", "--data", tiny_data, "--img-size", "160", "224", "288",
                              check=False), "and --img-size is 160, 288: use 224")


def test_a_run_folder_inside_the_data_splits_is_refused(copy_of):
    """A run folder in DATA/train would be the next run's class of no images (and its files read as
    data): refused, by the command line and by train() itself (what runs under torchrun)."""
    from fastrsb.errors import UserError
    from fastrsb.recipe import load_recipe
    from fastrsb.train import train as train_run
    assert_user_error(train(copy_of, "--out", copy_of / "train" / "run"), "the run folder",
                      "lies inside the data's train/ folder", f"choose an --out outside {copy_of / 'train'}")
    with pytest.raises(UserError, match="lies inside the data's val/ folder"):
        train_run(load_recipe("tiny"), copy_of, copy_of / "val" / "n00_hstripes" / "run", device="cpu")
    assert sorted(p.name for p in (copy_of / "train").iterdir()) == sorted(p.name for p in (copy_of / "val").iterdir())


def test_resume_from_no_checkpoint_makes_no_run_folder(tiny_data, tmp_path):
    """--resume CKPT that is nothing, or a folder: one line, before the run folder is made (an empty
    one was left behind)."""
    for given, said in [(tmp_path / "nowhere.pt", f"no checkpoint at {tmp_path / 'nowhere.pt'}"),
                        (tiny_data, f"{tiny_data} is a folder: give a checkpoint file")]:
        assert_user_error(train(tiny_data, "--out", tmp_path / "run", "--resume", given), said)
        assert not (tmp_path / "run").exists()
