"""fastrsb data check / prepare-val / shrink, through the command line."""
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, folder_held, run_cli
from fastrsb.errors import UserError
from fastrsb.pipelines import DatasetError, list_images


def test_check_passes_a_good_folder(tiny_data):
    proc = run_cli("data", "check", tiny_data, "--workers", "2")
    assert "48 train images in 4 classes, 20 val images in 4 classes; 0 problem(s)" in proc.stdout
    assert "ok: ready to train" in proc.stdout


def test_timms_other_names_for_the_splits_are_taken(tiny_data, tmp_path):
    """A copy of ImageNet with training/ and validation/ (names timm's folder data sets take, in its
    order: val before validation) is checked, trained on and evaluated as train/ and val/ are (the
    benchmark's --data: test_benchmark); it was refused as having no val/ folder."""
    from fastrsb.data_folder import split_folder
    data = tmp_path / "data"
    data.mkdir()
    (data / "training").symlink_to(tiny_data / "train")
    (data / "validation").symlink_to(tiny_data / "val")
    assert "48 train images in 4 classes, 20 val images in 4 classes; 0 problem(s)" in run_cli(
        "data", "check", data).stdout
    proc = run_cli("train", "tiny", "--data", data, "--out", tmp_path / "run", "--device", "cpu",
                   "--stop-after-steps", "1")
    assert "48 train / 20 val images" in proc.stdout
    assert_user_error(run_cli("train", "tiny", "--data", data, "--out", data / "validation" / "run", "--device",
                              "cpu", check=False), "lies inside the data's validation/ folder")
    assert "over 20 images" in run_cli("eval", tmp_path / "run" / "last.pt", "--data", data).stdout
    (data / "val").mkdir()  # timm's order: val/ before validation/
    assert split_folder(data, "val") == data / "val" and split_folder(data, "train") == data / "training"
    proc = run_cli("data", "check", data, check=False)
    assert_user_error(proc, "2 problem(s)")
    assert "val/ holds no class folders" in proc.stdout


def test_check_lists_every_problem_at_once(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    classes = sorted(p.name for p in (data / "train").iterdir())
    victim = sorted((data / "train" / classes[0]).iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated JPEG
    (data / "val" / classes[1] / "garbage.JPEG").write_bytes(b"not an image at all")
    (data / "train" / classes[2] / "notes.txt").write_text("stray")
    (data / "train" / "empty_class").mkdir()
    # A broken JPEG in a symlinked sub-folder of a class: the loaders follow the link, so must check.
    linked = tmp_path / "elsewhere"
    linked.mkdir()
    hidden = linked / "broken.JPEG"
    hidden.write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    (data / "train" / classes[3] / "more").symlink_to(linked, target_is_directory=True)
    shutil.copy(victim.with_name(sorted(p.name for p in victim.parent.iterdir())[1]), data / "val" / "loose.JPEG")
    # A class linked in from a disk that is not mounted: a folder that is not there, which a listing
    # of folders left out without a word (data check said 0 problems, and a run trained without it).
    (data / "val" / "n99_gone").symlink_to(tmp_path / "unmounted" / "n99_gone")
    proc = run_cli("data", "check", data, check=False)
    assert_user_error(proc, "7 problem(s)")
    out = proc.stdout
    gone = f"{data / 'val' / 'n99_gone'} is a symbolic link to {tmp_path / 'unmounted' / 'n99_gone'}, which does not exist"
    assert gone in out
    (data / "train" / "empty_class").rmdir()  # what a run meets first
    assert_user_error(run_cli("train", "tiny", "--data", data, "--out", tmp_path / "run", check=False), gone)
    assert not (tmp_path / "run").exists()
    (data / "train" / "empty_class").mkdir()
    assert f"cannot decode {victim}" in out and "garbage.JPEG" in out
    assert f"cannot decode {data / 'train' / classes[3] / 'more' / 'broken.JPEG'}" in out
    assert "train/empty_class: empty class" in out
    assert "train and val classes differ: 1 only in train ['empty_class']" in out
    assert "val/: 1 image(s) outside any class folder, e.g. loose.JPEG" in out
    # A file training skips is a note, not a problem: check and training agree.
    assert f"note: train/{classes[2]}: 1 file(s) without an image extension, skipped by the loaders" in out
    assert "notes.txt" in out
    assert (f"note: train/: 1 class folder(s) hold images in sub-folders, e.g. {classes[3]}/: fastrsb labels them by "
            "the class folder, as torchvision does; timm's ImageFolder by the innermost folder's name") in out
    assert "note: val/: 1 class folder" not in out  # val's classes hold their images directly
    assert_user_error(run_cli("data", "check", tmp_path / "nothing", check=False), "does not exist")
    (tmp_path / "val.txt").write_text("val/a.JPEG 0\n")  # a file list to data check (below); no data folder to train
    assert_user_error(run_cli("train", "tiny", "--data", tmp_path / "val.txt", check=False), "is a file, not a folder")


def test_a_folder_walked_under_two_classes_is_refused(tiny_data, tmp_path):
    """A symbolic link from one class's folder into another's lists the other's images under both
    classes, each with two labels: data check said 0 problems and a run trained on them. Now data
    check lists it, and train and the loaders refuse it, naming the link. A class whose images
    come from a folder outside every class (a link, as a symlink farm builds them) is kept."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    link = data / "train" / "n00_hstripes" / "more"
    link.symlink_to(data / "train" / "n01_vstripes")
    said = (f"{link} and {data / 'train' / 'n01_vstripes'} are one folder ({data / 'train' / 'n01_vstripes'}), "
            "walked under two classes, n00_hstripes and n01_vstripes")
    proc = run_cli("data", "check", data, check=False)
    assert_user_error(proc, "1 problem(s)")
    assert said in proc.stdout
    assert_user_error(run_cli("train", "tiny", "--data", data, "--out", tmp_path / "run", check=False), said)
    with pytest.raises(DatasetError, match="each of its images would be read with both labels"):
        list_images(data / "train")
    link.unlink()
    shutil.copytree(tiny_data / "train" / "n01_vstripes", tmp_path / "extra")
    link.symlink_to(tmp_path / "extra")
    assert len(list_images(data / "train")) == 48 + 12  # the extra folder's images, in n00_hstripes
    assert "0 problem(s)" in run_cli("data", "check", data, "--no-decode").stdout


def test_a_val_folder_that_is_the_train_folder_is_said(tiny_data, tmp_path):
    """val/ linked to train/ (a validation set at hand) trains, but its top-1 measures the training
    images: data check and the run card say so; a data folder of its own says nothing."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train").symlink_to(tiny_data / "train")
    (data / "val").symlink_to(tiny_data / "train")
    said = (f"val and train share 4 folder(s) of images (e.g. {tiny_data / 'train' / 'n00_hstripes'}): the "
            "validation top-1 measures images the model trains on")
    assert f"note: {said}" in run_cli("data", "check", data, "--no-decode").stdout
    assert f"note: {said}" in run_cli("train", "tiny", "--data", data, "--out", tmp_path / "run", "--device", "cpu",
                                      "--stop-after-steps", "1").stdout
    assert "share" not in run_cli("data", "check", tiny_data, "--no-decode").stdout


def test_check_reads_a_file_list_as_the_loaders_do(tiny_data, tmp_path):
    """A loader's file list (the loaders' API takes one): its lines as the loaders read them, then
    its images, as a data folder's."""
    from fastrsb.pipelines import list_images
    listing = list_images(tiny_data / "val")
    (tmp_path / "notes.JPEG").write_text("not an image")
    lines = [f"{path} {label}" for path, label in zip(listing.files, listing.labels)]
    (tmp_path / "val.txt").write_text("\n".join(lines + [f"notes.JPEG {listing.labels[0]}"]) + "\n")
    checked = run_cli("data", "check", tmp_path / "val.txt", check=False)
    assert_user_error(checked, "1 problem(s) in")
    assert "a file list of 21 images in 4 classes; 1 problem(s)" in checked.stdout
    assert f"  {tmp_path / 'notes.JPEG'}: " in checked.stdout
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    assert run_cli("data", "check", tmp_path / "val.txt").stdout.endswith("ok: the loaders read every image\n")
    (tmp_path / "val.txt").write_text("some/file.JPEG 0\n")
    refused = run_cli("data", "check", tmp_path / "val.txt", check=False)
    assert_user_error(refused, "1 problem(s) in")
    assert "a file list that the loaders refuse" in refused.stdout and "val.txt:1: no file" in refused.stdout


def copy_with_a_linked_folder(tiny_data, tmp_path):
    """A copy of the tiny data set whose class n01_vstripes holds a symlinked folder, `link`, of one
    image (x.JPEG, in tmp_path/extra)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(next((data / "train" / "n00_hstripes").iterdir()), extra / "x.JPEG")
    (data / "train" / "n01_vstripes" / "link").symlink_to(extra, target_is_directory=True)
    return data


def test_check_agrees_with_the_loaders(tiny_data, tmp_path):
    """Every file the loaders read is checked, and no other: the same listing (symlinks followed,
    dot-files skipped), so a clean check means a clean run."""
    from fastrsb.data_folder import _split_listing
    data = copy_with_a_linked_folder(tiny_data, tmp_path)
    (data / "train" / "n02_checks" / ".hidden.JPEG").write_bytes(b"junk")
    checked = sorted(f for images, _ in _split_listing(data / "train")[0].values() for f in images)
    assert checked == sorted(list_images(data / "train").files)
    assert str(data / "train" / "n01_vstripes" / "link" / "x.JPEG") in checked


@pytest.mark.parametrize("loop", ["parent", "across classes"])
def test_a_loop_of_symbolic_links_is_refused_naming_the_link(tiny_data, tmp_path, loop):
    """A link to a folder above it (or two class folders linking into each other) made the listing
    follow it ~40 links deep, until the kernel's ELOOP: every image below counted ~40 times, the
    other classes' images under this class's label (a parent link in a folder of 24 train images: 984)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    train = data / "train"
    if loop == "parent":
        link = train / "n01_vstripes" / "up"
        link.symlink_to("..", target_is_directory=True)
    else:
        (train / "n01_vstripes" / "b").symlink_to("../n02_checks", target_is_directory=True)
        (train / "n02_checks" / "sub").mkdir()
        link = train / "n02_checks" / "sub" / "a"
        link.symlink_to("../../n01_vstripes", target_is_directory=True)
    with pytest.raises(DatasetError, match="a loop of symbolic links"):
        list_images(train)
    proc = run_cli("data", "check", data, check=False)
    assert_user_error(proc, "1 problem(s)")
    assert "a loop of symbolic links" in proc.stdout and f"{link.name} links" in proc.stdout
    assert_user_error(run_cli("train", "tiny", "--data", data, "--out", tmp_path / "run", check=False),
                      "a loop of symbolic links")


def _flat_val(tmp_path, tiny_data):
    """ILSVRC2012's layout: every validation image in one folder, named by its id."""
    flat = tmp_path / "val"
    flat.mkdir()
    truth = {}
    for number, path in enumerate(sorted((tiny_data / "val").glob("*/*")), 1):
        image_id = f"ILSVRC2012_val_{number:08d}"
        shutil.copy(path, flat / f"{image_id}.JPEG")
        truth[image_id] = path.parent.name
    return flat, truth


def _assert_sorted(flat, truth, moved=True):
    listing = list_images(flat)
    assert len(listing) == len(truth) and bool(list(flat.glob("*.JPEG"))) != moved
    for path, label in zip(listing.files, listing.labels):
        image_id = path.rsplit("/", 1)[1].removesuffix(".JPEG")
        assert listing.classes[label] == truth[image_id]


def test_prepare_val_from_loc_val_solution(tiny_data, tmp_path):
    flat, truth = _flat_val(tmp_path, tiny_data)
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(f"{k},{v} 1 2 30 40 {v} 5 6 70 80\n" for k, v in truth.items()))
    # An interrupted run: move half by hand, as if the first run stopped half-way.
    first = sorted(truth)[0]
    (flat / truth[first]).mkdir()
    (flat / f"{first}.JPEG").rename(flat / truth[first] / f"{first}.JPEG")
    proc = run_cli("data", "prepare-val", flat, csv)
    assert f"moved {len(truth) - 1} image(s)" in proc.stdout and f"{len(truth)} of {len(truth)}" in proc.stdout
    _assert_sorted(flat, truth)
    assert "moved 0 image(s)" in run_cli("data", "prepare-val", flat, csv).stdout  # resumable: nothing left
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,\n")  # a row without its boxes' wnid
    assert_user_error(run_cli("data", "prepare-val", flat, csv, check=False),
                      f"{csv}:2: expected 'ImageId,wnid ...', got 'ILSVRC2012_val_00000001,'")


def test_prepare_val_from_devkit_ground_truth(tiny_data, tmp_path):
    flat, truth = _flat_val(tmp_path, tiny_data)
    wnids = sorted(set(truth.values()), reverse=True)  # ILSVRC2012_ID order is not sorted order
    (tmp_path / "synsets.txt").write_text("".join(f"{w} some words\n" for w in wnids))
    (tmp_path / "gt.txt").write_text("".join(f"{wnids.index(truth[k]) + 1}\n" for k in sorted(truth)))
    assert_user_error(run_cli("data", "prepare-val", flat, tmp_path / "gt.txt", check=False), "--synsets")
    sorted_val = tmp_path / "sorted" / "val"
    args = ("data", "prepare-val", flat, tmp_path / "gt.txt", "--synsets", tmp_path / "synsets.txt", "--copy-to", sorted_val)
    assert f"copied {len(truth)} image(s)" in run_cli(*args).stdout
    _assert_sorted(sorted_val, truth)
    assert len(list(flat.glob("*.JPEG"))) == len(truth)  # the originals stay where they were, untouched
    assert "copied 0 image(s)" in run_cli(*args).stdout  # resumable
    assert_user_error(run_cli(*args[:-1], flat, check=False), "the validation folder itself")
    (tmp_path / "bad.csv").write_text("id,label\n")
    assert_user_error(run_cli("data", "prepare-val", flat, tmp_path / "bad.csv", check=False), "ImageId,PredictionString")
    # A class number out of 1..N (0: the devkit counts from 1), an image the file gives no label, a
    # file in the copy's class folders that is not this folder's copy of it (another class): refused.
    # Blank lines at the end of the file are no images.
    gt, synsets = tmp_path / "gt.txt", ("--synsets", tmp_path / "synsets.txt")
    numbers = gt.read_text()
    gt.write_text("0\n" + numbers.split("\n", 1)[1])
    assert_user_error(run_cli("data", "prepare-val", flat, gt, *synsets, check=False),
                      f"{gt}:1: '0' is not a class number 1..4")
    gt.write_text(numbers + "\n\n")
    shutil.copy(next(flat.glob("*.JPEG")), flat / "ILSVRC2012_val_00099999.JPEG")
    assert_user_error(run_cli("data", "prepare-val", flat, gt, *synsets, "--copy-to", tmp_path / "new", check=False),
                      "1 image(s) in", "have no label in", "ILSVRC2012_val_00099999")
    (flat / "ILSVRC2012_val_00099999.JPEG").unlink()
    moved = next(sorted_val.glob("*/*.JPEG"))
    other_class = next(folder for folder in sorted(sorted_val.iterdir()) if folder != moved.parent)
    moved.rename(other_class / moved.name)
    assert_user_error(run_cli(*args, check=False), f"{other_class / moved.name} is not a copy of an image of this "
                      "validation folder (another name, class or size)")


def test_prepare_val_by_the_names_of_the_hubs_archives(tiny_data, tmp_path):
    """A flat folder unpacked by hand from the Hugging Face hub's val_images.tar.gz: each image's
    name ends in its wnid, which sorts it without a label file; a name without one is refused."""
    flat, truth = _flat_val(tmp_path, tiny_data)
    wnid = {name: f"n{k:08d}" for k, name in enumerate(sorted(set(truth.values())))}
    for image_id, name in truth.items():
        (flat / f"{image_id}.JPEG").rename(flat / f"{image_id}_{wnid[name]}.JPEG")
    with pytest.raises(DatasetError, match=rf"has no class folders .*; it holds {len(truth)} image\(s\) directly, "
                                           r"outside any class folder \(`fastrsb data check` says more\)"):
        list_images(flat)  # what a run or eval of such a folder says
    shutil.copytree(tiny_data / "train", tmp_path / "train")
    checked = run_cli("data", "check", tmp_path, "--no-decode", check=False).stdout  # data check says how to sort
    assert (f"val/: {len(truth)} image(s) outside any class folder, e.g. ILSVRC2012_val_00000001_n00000000.JPEG (the "
            f"loaders skip them: their names end in their wnid, as the Hugging Face hub's archives name them: fastrsb "
            f"data prepare-val {flat} sorts them by those)") in checked
    proc = run_cli("data", "prepare-val", flat)
    assert f"moved {len(truth)} image(s) into 4 class folder(s)" in proc.stdout
    listing = list_images(flat)
    assert len(listing) == len(truth) and not list(flat.glob("*.JPEG"))
    for path, label in zip(listing.files, listing.labels):
        image_id, _, folder = path.rsplit("/", 1)[1].removesuffix(".JPEG").rpartition("_")
        assert listing.classes[label] == folder == wnid[truth[image_id]]
    shutil.copy(listing.files[0], flat / "ILSVRC2012_val_00000099.JPEG")
    assert_user_error(run_cli("data", "prepare-val", flat, check=False), "ILSVRC2012_val_00000099.JPEG is not named "
                      "<image>_<wnid>.JPEG", "give the label file")


def _tree(folder):
    """Every file under FOLDER with its bytes, but for the lock a killed holder leaves."""
    return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*")
            if path.is_file() and path.name != ".fastrsb.lock"}


def test_a_data_tool_refuses_a_folder_another_is_writing(tiny_data, tmp_path):
    """Two shrinks, or two prepare-vals, writing one folder at once race for the same files (say,
    the same command started again in another terminal): the second is refused naming the first,
    and changes nothing; once the first has ended, however it ended, the command runs."""
    small = tmp_path / "small"
    shrink = ("data", "shrink", tiny_data, small, "--max-side", "40", "--workers", "1")
    run_cli(*shrink)
    (small / "train" / "n00_hstripes").rename(tmp_path / "taken-out")  # for the rerun to write again
    flat, truth = _flat_val(tmp_path, tiny_data)
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(f"{k},{v} 1 2 30 40\n" for k, v in truth.items()))
    copies = tmp_path / "sorted"
    copies.mkdir()
    for folder, job, argv, said in (
            (small, "fastrsb data shrink", shrink, "12 written"),
            (copies, "fastrsb data prepare-val", ("data", "prepare-val", flat, csv, "--copy-to", copies), "copied 20"),
            (flat, "fastrsb data prepare-val", ("data", "prepare-val", flat, csv), "moved 20")):
        before = _tree(folder)
        with folder_held(folder, job) as holder:
            assert_user_error(run_cli(*argv, check=False), f"{folder} is being written by {job} (pid {holder.pid} on ",
                              "race for the same files", "a rerun then finishes what it left")
            assert _tree(folder) == before
        assert said in run_cli(*argv).stdout
        assert not (folder / ".fastrsb.lock").exists()  # the one the killed holder left went with the run


def test_a_data_folder_being_written_is_not_read(tiny_data, tmp_path):
    """`train`, `data check`, `eval` and `doctor` on a data folder that `data prepare` is writing
    now (or `prepare-val`, in its val/): it holds part of its classes or images, so each says so
    and waits for nothing, rather than train on (or pass, or fail) a data set not there yet."""
    from fastrsb.checkpoint_eval import Weights, _validation_images
    from fastrsb.doctor import data_checks
    from fastrsb.model import make_model
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for folder, job in ((data, "fastrsb data prepare"), (data / "val", "fastrsb data prepare-val")):
        with folder_held(folder, job) as holder:
            said = f"the data folder {data} is being written by {job} (pid {holder.pid} on "
            assert_user_error(run_cli("data", "check", data, check=False), said)
            assert_user_error(run_cli("train", "tiny", "--data", data, "--out", tmp_path / "run", "--device", "cpu",
                                      check=False), said)
            with pytest.raises(UserError, match=re.escape(said)):
                _validation_images(data, Weights(make_model("resnet10t", 4), None, 40, 0.95, False, None, []), [])
            assert said in data_checks(data, "cpu")[0].text
    assert not (tmp_path / "run").exists()
    run_cli("data", "check", data)  # their locks' files stay, their locks do not


def test_shrink_makes_a_compact_rgb_copy_and_resumes(tiny_data, tmp_path):
    out = tmp_path / "small"
    proc = run_cli("data", "shrink", tiny_data, out, "--max-side", "40", "--quality", "80", "--workers", "2")
    assert "68 written, 0 already there, 0 failed" in proc.stdout
    before, after = sorted(tiny_data.rglob("*.JPEG")), sorted(out.rglob("*.JPEG"))
    assert [p.relative_to(tiny_data) for p in before] == [p.relative_to(out) for p in after]
    for original, small in zip(before, after):
        with Image.open(original) as a, Image.open(small) as b:
            assert b.format == "JPEG" and b.mode == "RGB" and max(b.size) <= 40  # CMYK, grey, PNG: all RGB JPEG now
            assert abs(a.width / a.height - b.width / b.height) < 0.1
    assert sum(p.stat().st_size for p in after) < sum(p.stat().st_size for p in before) / 2
    after[0].unlink()
    (after[1].parent / f".{after[1].name}.tmp").write_bytes(b"half")  # a run killed mid-write
    proc = run_cli("data", "shrink", tiny_data, out, "--max-side", "40", "--quality", "80")
    assert "1 written, 67 already there" in proc.stdout
    # Another size into the same target would mix two sizes silently: refused.
    assert_user_error(run_cli("data", "shrink", tiny_data, out, "--max-side", "64", check=False),
                      "--max-side 40 --quality 80")
    assert_user_error(run_cli("data", "shrink", tiny_data, tiny_data / "inside", check=False), "outside the source")
    assert_user_error(run_cli("data", "shrink", tiny_data, tmp_path / "q", "--quality", "0", check=False),
                      "--quality 1..100 (got 500, 0)")
    # Another data set into it, or into a folder that holds files no shrink wrote (the same names:
    # they were taken for shrunk copies, "68 already there"): refused.
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    assert_user_error(run_cli("data", "shrink", other, out, "--max-side", "40", "--quality", "80", check=False),
                      f"{out} is a shrunk copy of {tiny_data.resolve()}")
    assert_user_error(run_cli("data", "shrink", tiny_data, other, "--max-side", "40", check=False),
                      f"{other} holds files that no `fastrsb data shrink` wrote (train, ...)")
    run_cli("train", "tiny", "--data", out, "--out", tmp_path / "run", "--device", "cpu", "--set", "epochs=1",
            "--set", "warmup_epochs=0")  # the copy trains


def test_a_full_disk_stops_shrink_at_once_in_one_line(tiny_data, tmp_path):
    """A target disk that takes no more stops the whole shrink with one line (not a 'cannot read'
    for each of a million images), keeping what is written; the next run finishes. The full disk
    is the kernel's: a half-written copy's temporary name linked to /dev/full (ENOSPC)."""
    out = tmp_path / "small"
    run_cli("data", "shrink", tiny_data, out, "--max-side", "40", "--workers", "2")
    shrunk = sorted(out.rglob("*.JPEG"))
    for victim in shrunk[5:9]:
        victim.unlink()
    full = shrunk[6].parent / f".{shrunk[6].name}.tmp"
    full.symlink_to("/dev/full")
    assert_user_error(run_cli("data", "shrink", tiny_data, out, "--max-side", "40", "--workers", "2", check=False),
                      f"cannot write into {out} (No space left on device;", "GB free on its disk)",
                      "the images written so far (skipped by the next run) are kept", "run the same command again")
    assert not full.is_symlink()  # the temporary file goes
    left = 68 - len(list(out.rglob("*.JPEG")))
    assert 1 <= left <= 4
    assert f"{left} written, {68 - left} already there, 0 failed" in \
        run_cli("data", "shrink", tiny_data, out, "--max-side", "40").stdout


def test_shrink_names_each_image_it_cannot_read_and_writes_the_rest(tiny_data, tmp_path):
    """An image that is none (a file the loaders would fail on) is named with PIL's reason, the
    others are shrunk, and the command ends in an error that says how many could not be read."""
    source = tmp_path / "source"
    shutil.copytree(tiny_data, source)
    broken = sorted(source.rglob("*.JPEG"))[3]
    broken.write_bytes(b"not an image")
    proc = run_cli("data", "shrink", source, tmp_path / "small", "--max-side", "40", "--workers", "2", check=False)
    assert_user_error(proc, "1 image(s) could not be read (listed above); the rest are in")
    assert "67 written, 0 already there, 1 failed" in proc.stdout
    assert f"  cannot read {broken} (UnidentifiedImageError: " in proc.stdout
    assert len(list((tmp_path / "small").rglob("*.JPEG"))) == 67


def test_what_stops_a_data_tool_how_it_copies_and_how_many_workers_it_starts(tmp_path, monkeypatch):
    """A full disk, a quota and a read-only disk stop a data tool at once (every later write would
    fail alike); one file's error does not. A hard link where the file system makes none (another
    disk) is a copy. The default worker count is the cores, at most 16."""
    import errno
    import os
    import fastrsb.file_jobs as file_jobs
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        assert file_jobs.stops_writing(OSError(code, os.strerror(code)))
    assert not file_jobs.stops_writing(OSError(errno.EACCES, "Permission denied")) and not file_jobs.stops_writing(
        ValueError("not an OSError"))
    (tmp_path / "image.JPEG").write_bytes(b"pixels")
    assert file_jobs.link_or_copy(tmp_path / "image.JPEG", tmp_path / "linked.JPEG")
    assert (tmp_path / "image.JPEG").stat().st_nlink == 2

    def across_disks(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(file_jobs.os, "link", across_disks)
    assert not file_jobs.link_or_copy(tmp_path / "image.JPEG", tmp_path / "copied.JPEG")
    assert (tmp_path / "copied.JPEG").read_bytes() == b"pixels" and (tmp_path / "image.JPEG").stat().st_nlink == 2
    monkeypatch.setattr(file_jobs.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert file_jobs.default_workers(None) == 16 and file_jobs.default_workers(3) == 3
    monkeypatch.setattr(file_jobs.os, "sched_getaffinity", lambda pid: {0, 1})
    assert file_jobs.default_workers(None) == 2


def test_shrink_stopped_with_ctrl_c_leaves_no_half_written_copy(tiny_data, tmp_path, monkeypatch):
    """Ctrl-C reaches the workers; each removes the copy it was writing (one worker: this process,
    where the interrupt is raised mid-save)."""
    out = tmp_path / "small"

    def interrupted(image, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", interrupted)
    assert run_cli("data", "shrink", tiny_data, out, "--max-side", "40", "--workers", "1",
                   check=False).returncode == 130
    assert [p.name for p in out.rglob("*") if p.is_file()] == [".fastrsb-shrink.json"]


def test_shrink_copies_the_images_the_loaders_read(tiny_data, tmp_path):
    """The shrunk copy lists as the original: images in a symlinked sub-folder copied (shrink walked
    without following links, and the copy trained on fewer images), dot-folders left out; a loop
    of links refused, and so are a folder reached twice and a link to nothing, which the copy would
    hide from the loaders' checks."""
    data = copy_with_a_linked_folder(tiny_data, tmp_path)
    (data / "train" / "n02_checks" / ".cache").mkdir()
    shutil.copy(tmp_path / "extra" / "x.JPEG", data / "train" / "n02_checks" / ".cache" / "y.JPEG")
    run_cli("data", "shrink", data, tmp_path / "small", "--max-side", "40", "--workers", "2")
    for split in ("train", "val"):
        ours, theirs = list_images(data / split), list_images(tmp_path / "small" / split)
        assert [Path(f).relative_to(data) for f in ours.files] == [Path(f).relative_to(tmp_path / "small")
                                                                 for f in theirs.files]
    assert (tmp_path / "small" / "train" / "n01_vstripes" / "link" / "x.JPEG").is_file()
    # What the loaders refuse, a copy of plain files would hide from them: refused here too.
    (data / "train" / "n00_hstripes" / "other").symlink_to(data / "train" / "n02_checks")
    assert_user_error(run_cli("data", "shrink", data, tmp_path / "again", "--max-side", "40", check=False),
                      f"{data / 'train' / 'n00_hstripes' / 'other'} and {data / 'train' / 'n02_checks'} are one folder",
                      "the copy would hold its images twice")
    (data / "train" / "n00_hstripes" / "other").unlink()
    (data / "val" / "n09_gone").symlink_to(tmp_path / "unmounted")
    assert_user_error(run_cli("data", "shrink", data, tmp_path / "again", "--max-side", "40", check=False),
                      f"{data / 'val' / 'n09_gone'} is a symbolic link to {tmp_path / 'unmounted'}, which does not "
                      "exist: the copy would leave out what it held")
    assert not (tmp_path / "again").exists()  # refused before the target was made
    (data / "val" / "n09_gone").unlink()
    (data / "train" / "n01_vstripes" / "up").symlink_to("..", target_is_directory=True)
    assert_user_error(run_cli("data", "shrink", data, tmp_path / "small", "--max-side", "40", check=False),
                      "up links", "a loop of symbolic links")


def test_an_image_over_pils_limit_is_named_with_its_size_and_shrink_makes_it_small(tiny_data, tmp_path):
    """A 13,400 x 13,400 JPEG (180 M pixels, 2 MB on disk): PIL refuses to open it (a decompression
    bomb, so timm cannot read it), the loaders would decode it. data check said "cannot decode"
    and shrink failed on it; now check names its size and what it costs, read from its header
    alone, and shrink reads it (DCT-scaled), so its copy checks clean."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    Image.new("L", (13_400, 13_400), 90).save(data / "train" / "n00_hstripes" / "huge.JPEG", quality=10)
    proc = run_cli("data", "check", data, check=False)
    assert_user_error(proc, "1 problem(s)")
    assert (f"{data / 'train' / 'n00_hstripes' / 'huge.JPEG'}: 13,400 x 13,400 pixels, over PIL's decompression-bomb "
            "limit of 178,956,970: timm cannot read it, and the loaders would decode it into 0.5 GiB") in proc.stdout
    proc = run_cli("data", "shrink", data, tmp_path / "small", "--max-side", "40", "--workers", "2")
    assert "0 failed" in proc.stdout
    assert Image.open(tmp_path / "small" / "train" / "n00_hstripes" / "huge.JPEG").size == (40, 40)
    assert "ok: ready to train" in run_cli("data", "check", tmp_path / "small").stdout


def test_turned_photos_noted_by_check_and_turned_upright_by_shrink_when_asked(tiny_data, tmp_path):
    """A photo whose EXIF orientation says "rotate 90 degrees" (6): `data check` notes it (the
    loaders, as timm, read its pixels as stored); `data shrink` keeps its pixels as stored, and with
    --upright writes it turned, without EXIF, so that every reader shows the same."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    photo = data / "train" / "n00_hstripes" / "phone.JPEG"
    stored = Image.effect_noise((60, 40), 30).convert("RGB")  # 60 wide, 40 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(photo, quality=95, exif=exif.tobytes())
    proc = run_cli("data", "check", data, "--workers", "2")
    assert f"note: 1 image(s) carry an EXIF orientation (meant to be shown rotated or mirrored), e.g. {photo}" \
        in proc.stdout and "--upright" in proc.stdout
    assert "EXIF orientation" not in run_cli("data", "check", tiny_data, "--workers", "2").stdout

    as_stored, upright = tmp_path / "as-stored", tmp_path / "upright"
    run_cli("data", "shrink", data, as_stored, "--max-side", "500", "--workers", "2")
    run_cli("data", "shrink", data, upright, "--max-side", "500", "--workers", "2", "--upright")
    relative = photo.relative_to(data)
    with Image.open(as_stored / relative) as a, Image.open(upright / relative) as b:
        assert a.size == (60, 40) and b.size == (40, 60)
        assert 0x0112 not in a.getexif() and 0x0112 not in b.getexif()
    other = next((data / "val" / "n01_vstripes").iterdir()).relative_to(data)
    with Image.open(as_stored / other) as a, Image.open(upright / other) as b:
        assert a.size == b.size  # untagged images are the same either way
    assert_user_error(run_cli("data", "shrink", data, upright, "--max-side", "500", check=False),
                      "--max-side 500 --quality 90 --upright")


def test_16_bit_images_noted_by_check_and_shrunk_as_the_loaders_read_them(tiny_data, tmp_path):
    """A 16-bit grey PNG: `data check` notes it (the loaders scale it to 8 bits, where timm's PIL
    clips it: test_pipelines.py), and `data shrink` writes it scaled as the loaders read it, not
    PIL's near-white convert("RGB")."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    deep = data / "train" / "n00_hstripes" / "deep.png"
    ramp = np.linspace(1000, 64000, 48 * 64).reshape(48, 64).astype(np.uint16)  # smooth: JPEG keeps it
    Image.fromarray(ramp).save(deep)
    Image.fromarray(ramp).save(deep.with_name("deep.pgm"))  # Pillow opens it as "I", not "I;16"
    assert np.asarray(Image.open(deep).convert("RGB")).mean() > 250  # what PIL's convert makes of it
    proc = run_cli("data", "check", data, "--workers", "2")
    assert f"note: 2 image(s) are 16-bit grey, e.g. {deep.with_name('deep.pgm')}: the loaders" in proc.stdout
    assert "16-bit" not in run_cli("data", "check", tiny_data, "--workers", "2").stdout
    for upright in ([], ["--upright"]):  # turned, a PGM's copy is no longer a PGM to Pillow
        small = tmp_path / f"small{len(upright)}"
        run_cli("data", "shrink", data, small, "--max-side", "500", "--workers", "2", *upright)
        for name in ("deep.png", "deep.pgm"):
            with Image.open(small / deep.relative_to(data).with_name(name)) as shrunk:
                pixels = np.asarray(shrunk, dtype=np.float64)
            assert shrunk.mode == "RGB" and shrunk.format == "JPEG" and pixels.shape == (48, 64, 3)
            assert np.abs(pixels - np.round(ramp / 257)[..., None]).mean() < 1.5


def test_check_refuses_what_training_refuses_and_passes_what_it_reads(tiny_data, tmp_path):
    """PIL opens GIF, ICO and TGA; DALI does not decode them. Under .JPEG names, `data check` names
    them as the start-up check does (it decoded them with PIL and passed them before), so a clean
    check means a run that starts, as it does a RIFF file that holds no WebP (a WAV); JPEG 2000 and
    WebP under a .JPEG name, which DALI reads (test_pipelines.py), pass both."""
    from fastrsb.data_folder import check_headers
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    folder = data / "train" / "n00_hstripes"
    picture = Image.effect_noise((50, 40), 30).convert("RGB")
    for kind in ("GIF", "ICO", "TGA"):
        picture.save(folder / f"{kind.lower()}.JPEG", format=kind)
    (folder / "wav.JPEG").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(28))
    proc = run_cli("data", "check", data, "--workers", "2", check=False)
    assert_user_error(proc, "4 problem(s)")
    for kind in ("gif", "ico", "tga", "wav"):
        assert f"{folder / kind}.JPEG: not an image: it starts with" in proc.stdout
    with pytest.raises(UserError, match=r"^4 bad file\(s\): [^;]+; [^;]+; [^;]+ and 1 more: remove or replace"):
        check_headers(list_images(data / "train"), list_images(data / "val"))
    for kind in ("gif", "ico", "tga", "wav"):
        (folder / f"{kind}.JPEG").unlink()
    picture.save(folder / "jp2.JPEG", format="JPEG2000")
    picture.save(folder / "j2k.JPEG", format="JPEG2000", no_jp2=True)
    picture.save(folder / "webp.JPEG", format="WEBP", quality=90)
    assert "0 problem(s)" in run_cli("data", "check", data, "--workers", "2").stdout
    check_headers(list_images(data / "train"), list_images(data / "val"))


def test_a_file_or_an_unmakeable_folder_where_a_data_tool_writes_is_one_line(tiny_data, tmp_path):
    """A file given where a data tool reads or writes a folder, or a folder that cannot be made:
    one line each (shrink, prepare-val and prepare raised FileExistsError or FileNotFoundError;
    demo said it wrote a data set into a file, and wrote nothing)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("notes")
    unmakeable = Path("/proc/no/such")
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("ImageId,PredictionString\n")
    raw = tmp_path / "raw"
    (raw / "ILSVRC" / "Data" / "CLS-LOC" / "train" / "n01").mkdir(parents=True)
    for argv, said in [(("data", "shrink", tiny_data, a_file), f"the target {a_file} is a file: a folder goes there"),
                       (("data", "shrink", tiny_data, unmakeable), f"cannot make the target {unmakeable}: "),
                       (("data", "shrink", a_file, tmp_path / "out"), f"source folder {a_file} is a file, not a folder"),
                       (("data", "prepare-val", a_file, labels), f"validation folder {a_file} is a file, not a folder"),
                       (("data", "prepare-val", tiny_data / "val", labels, "--copy-to", a_file),
                        f"the --copy-to folder {a_file} is a file"),
                       (("data", "prepare", raw, a_file), f"OUT {a_file} is a file: a folder goes there"),
                       (("data", "demo", a_file), f"the demo data folder {a_file} is a file"),
                       (("data", "demo", unmakeable), f"cannot make the demo data folder {unmakeable}")]:
        assert_user_error(run_cli(*argv, check=False), said)
    assert a_file.read_text() == "notes"


def test_a_file_name_that_is_not_utf8_is_named_by_check_and_the_loaders(tiny_data, tmp_path):
    """A Latin-1 file name (an old archive's): DALI's reader takes UTF-8 names only, and failed with
    "Unsupported argument type with name files" while `data check` said "ready to train". Now both
    name the file, its byte escaped; a UTF-8 name of any script trains."""
    import os
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = sorted((data / "train" / "n00_hstripes").iterdir())[3]
    os.rename(os.fsencode(victim), os.fsencode(victim.parent) + b"/caf\xe9.JPEG")
    shown = f"{data}/train/n00_hstripes/caf\\xe9.JPEG"
    with pytest.raises(DatasetError, match="1 file name.s. are not UTF-8, which DALI's reader needs: "
                                           + shown.replace("\\", "\\\\")):
        list_images(data / "train")
    checked = run_cli("data", "check", data, check=False)
    assert_user_error(checked, "1 problem(s)")
    assert shown in checked.stdout
    assert_user_error(run_cli("train", "tiny", "--data", data, "--device", "cpu", "--out", tmp_path / "run",
                              check=False), shown, "rename them")
    os.rename(os.fsencode(victim.parent) + b"/caf\xe9.JPEG", victim.parent / "café-ü 日本.JPEG")
    run_cli("train", "tiny", "--data", data, "--device", "cpu", "--out", tmp_path / "run", "--stop-after-steps", "1")
