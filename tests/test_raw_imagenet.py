"""fastrsb data prepare: miniature ImageNet downloads, packed as ImageNet packs them, into the
folder a run reads; resumable, the input left as it was, bad input named."""
import io
import re
import shutil
import tarfile

import pytest

from conftest import assert_user_error, folder_held, run_cli
from fastrsb.errors import UserError
from fastrsb.pipelines import list_images


def _tar(path, files):
    """A tar of (name, bytes) pairs."""
    with tarfile.open(path, "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _val_files(tiny_data):
    """ILSVRC2012's val: flat ILSVRC2012_val_<n>.JPEG names, and their wnids."""
    images = sorted((tiny_data / "val").glob("*/*.JPEG"))
    return [(f"ILSVRC2012_val_{n:08d}.JPEG", p.read_bytes(), p.parent.name) for n, p in enumerate(images, 1)]


def _loc_csv(path, val):
    path.write_text("ImageId,PredictionString\n" + "".join(f"{name[:-5]},{wnid} 1 2 3 4\n" for name, _, wnid in val))


@pytest.fixture
def ilsvrc(tiny_data, tmp_path):
    """ILSVRC2012_img_train.tar (a tar of per-class tars), ILSVRC2012_img_val.tar, LOC_val_solution.csv."""
    raw = tmp_path / "download"
    raw.mkdir()
    inner = []
    for folder in sorted((tiny_data / "train").iterdir()):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for image in sorted(folder.iterdir()):
                info = tarfile.TarInfo(f"{folder.name}_{image.name}")
                info.size = image.stat().st_size
                tar.addfile(info, io.BytesIO(image.read_bytes()))
        inner.append((f"{folder.name}.tar", buffer.getvalue()))
    _tar(raw / "ILSVRC2012_img_train.tar", inner)
    val = _val_files(tiny_data)
    _tar(raw / "ILSVRC2012_img_val.tar", [(name, data) for name, data, _ in val])
    _loc_csv(raw / "LOC_val_solution.csv", val)
    return raw


def _assert_prepared(out, tiny_data):
    train, val = list_images(out / "train"), list_images(out / "val")
    reference = list_images(tiny_data / "train")
    assert train.classes == reference.classes and len(train) == len(reference) == 48
    assert sorted(train.labels) == sorted(reference.labels) and len(val) == 20
    assert val.classes == reference.classes


def test_ilsvrc_tars_prepare_resume_and_train(ilsvrc, tiny_data, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in ilsvrc.iterdir()}
    out = tmp_path / "imagenet"
    # A raw download given to train or check names the command that prepares it.
    assert_user_error(run_cli("train", "tiny", "--data", ilsvrc, "--device", "cpu", check=False),
                      "looks like ImageNet as downloaded (ILSVRC2012 tars)", f"fastrsb data prepare {ilsvrc}")
    proc = run_cli("data", "prepare", ilsvrc, out, "--workers", "2")
    assert "train: 4 class(es) written, 0 already there" in proc.stdout and "ready to train" in proc.stdout
    _assert_prepared(out, tiny_data)
    assert {p: p.stat().st_mtime_ns for p in ilsvrc.iterdir()} == before  # the download is only read
    assert not (out / ".val-flat").exists()  # the validation tar's unpacked copy: gone once sorted
    shutil.rmtree(out / "train" / "n02_checks")  # as if interrupted: the rest is kept, the class redone
    # A run killed (SIGKILL) while it wrote that class left its hidden folder, half full: made afresh.
    (out / "train" / ".n02_checks.partial").mkdir()
    (out / "train" / ".n02_checks.partial" / "half.JPEG").write_bytes(b"\xff\xd8")
    with folder_held(out, "fastrsb data prepare") as holder:  # and started again while it still runs
        assert_user_error(run_cli("data", "prepare", ilsvrc, out, check=False),
                          f"{out} is being written by fastrsb data prepare (pid {holder.pid} on ")
        assert not (out / "train" / "n02_checks").exists()
    proc = run_cli("data", "prepare", ilsvrc, out)
    assert "train: 1 class(es) written, 3 already there" in proc.stdout
    _assert_prepared(out, tiny_data)
    assert not (out / "train" / "n02_checks" / "half.JPEG").exists()
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(p.name for p in (tiny_data / "train").iterdir())
    run_cli("train", "tiny", "--data", out, "--out", tmp_path / "run", "--device", "cpu", "--stop-after-steps", "1")


def _files(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_resume_takes_only_the_downloads_own_classes(ilsvrc, tmp_path):
    """A class folder already in OUT is skipped only if it holds the download's images (names and
    sizes, from the tar headers): OUT holding another set (a shrunk copy, extra files) is refused,
    and left as it was."""
    out = tmp_path / "imagenet"
    run_cli("data", "prepare", ilsvrc, out)
    classes = sorted((out / "train").iterdir())
    next(classes[0].iterdir()).unlink()  # removed by hand (a bad image, say): still the download's class
    assert "train: 0 class(es) written, 4 already there" in run_cli("data", "prepare", ilsvrc, out).stdout
    (classes[0] / "crops").mkdir()  # a folder in a class folder: no image of the download
    assert_user_error(run_cli("data", "prepare", ilsvrc, out, check=False), f"{classes[0]} holds 1 file(s)",
                      "e.g. crops/ (a folder)")
    (classes[0] / "crops").rmdir()
    shrunk = sorted(classes[1].iterdir())[2]
    shrunk.write_bytes(shrunk.read_bytes()[:-100])  # another copy's image under the same name
    (classes[3] / "extra.JPEG").write_bytes(next(classes[2].iterdir()).read_bytes())
    before = _files(out)
    assert_user_error(run_cli("data", "prepare", ilsvrc, out, check=False),
                      "2 class folder(s) of", "already hold other files than the download's",
                      f"{classes[1]} holds 1 file(s) that are not the download's images of {classes[1].name}, "
                      f"e.g. {shrunk.name} ({shrunk.stat().st_size:,} bytes, the download's "
                      f"{shrunk.stat().st_size + 100:,})", "and 1 more", "Prepare into an empty folder")
    assert _files(out) == before
    shutil.rmtree(classes[1])
    shutil.rmtree(classes[3])
    classes[3].write_text("notes")
    assert_user_error(run_cli("data", "prepare", ilsvrc, out, check=False),
                      f"{classes[3]} is a file, where the class folder goes")
    assert classes[3].read_text() == "notes"
    classes[3].unlink()  # (the run refused made classes[1] meanwhile)
    assert "train: 1 class(es) written, 3 already there" in run_cli("data", "prepare", ilsvrc, out).stdout
    # The validation copy too: a file in OUT/val/<wnid>/ that is not this download's is not taken for one.
    other = sorted((out / "val").glob("*/*"))[0]
    other.write_bytes(other.read_bytes() + b"\0")
    before = _files(out / "val")
    assert_user_error(run_cli("data", "prepare", ilsvrc, out, check=False),
                      f"{other} is not a copy of an image of this validation folder", "copy into an empty folder")
    assert _files(out / "val") == before


def test_a_full_disk_stops_prepare_in_one_line(ilsvrc, tmp_path, monkeypatch):
    """OUT's disk full while the classes are written (one worker: this process, where the write is
    made to fail as a full disk fails), then while the validation images are copied (a kernel
    ENOSPC: the copy's temporary name linked to /dev/full): one line saying so, not a tar 'to
    download again' nor a traceback; what is written is kept, and the next run finishes. A Ctrl-C
    leaves no half-written class behind either."""
    import errno
    from pathlib import Path
    out = tmp_path / "imagenet"
    write_bytes = Path.write_bytes

    def full_after_two_classes(path, data):
        if path.parent.name.startswith(".") and len(list((out / "train").iterdir())) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(path, data)
    monkeypatch.setattr(Path, "write_bytes", full_after_two_classes)
    assert_user_error(run_cli("data", "prepare", ilsvrc, out, "--workers", "1", check=False),
                      f"cannot write into {out / 'train'} (No space left on device;", "the classes written so far are "
                      "kept", "then run the same command again to finish")
    assert sorted(p.name for p in (out / "train").iterdir()) == ["n00_hstripes", "n01_vstripes"]  # no partial left

    def interrupted(path, data):  # Ctrl-C in the middle of a class
        if path.parent.name.startswith("."):
            raise KeyboardInterrupt
        return write_bytes(path, data)
    monkeypatch.setattr(Path, "write_bytes", interrupted)
    assert run_cli("data", "prepare", ilsvrc, out, "--workers", "1", check=False).returncode == 130
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "train").iterdir()) == ["n00_hstripes", "n01_vstripes"]  # its partial gone
    (out / "val" / "n00_hstripes").mkdir(parents=True)
    full = out / "val" / "n00_hstripes" / ".ILSVRC2012_val_00000001.JPEG.tmp"
    full.symlink_to("/dev/full")
    assert_user_error(run_cli("data", "prepare", ilsvrc, out, check=False),
                      f"cannot write into {out / 'val'} (No space left on device;", "the images copied so far are kept")
    full.unlink(missing_ok=True)
    proc = run_cli("data", "prepare", ilsvrc, out)
    assert "train: 0 class(es) written, 4 already there" in proc.stdout and "ready to train" in proc.stdout


def test_a_folder_of_class_tars_and_a_flat_val(tiny_data, tmp_path):
    raw = tmp_path / "download"
    (raw / "train").mkdir(parents=True)
    for folder in sorted((tiny_data / "train").iterdir()):
        _tar(raw / "train" / f"{folder.name}.tar", [(p.name, p.read_bytes()) for p in sorted(folder.iterdir())])
    (raw / "val").mkdir()
    val = _val_files(tiny_data)
    for name, data, _ in val:
        (raw / "val" / name).write_bytes(data)
    _loc_csv(raw / "LOC_val_solution.csv", val)
    run_cli("data", "prepare", raw, tmp_path / "out")
    _assert_prepared(tmp_path / "out", tiny_data)
    assert len(list((raw / "val").iterdir())) == 20  # the flat originals stay
    # Run again: each class checked against its own tar's headers, and skipped.
    assert "train: 0 class(es) written, 4 already there" in run_cli("data", "prepare", raw, tmp_path / "out").stdout
    # A class tar cut short (its download broken off): named, the classes written stay, and no
    # half-written class is left behind.
    broken = raw / "train" / "n02_checks.tar"
    whole = broken.read_bytes()
    broken.write_bytes(whole[: len(whole) * 2 // 3])
    shutil.rmtree(tmp_path / "out" / "train" / "n02_checks")
    assert_user_error(run_cli("data", "prepare", raw, tmp_path / "out", check=False),
                      f"1 class(es) could not be read: {broken}", "Download it again; the classes written so far stay")
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == ["n00_hstripes", "n01_vstripes",
                                                                              "n03_dots"]


def test_class_tars_in_the_download_folder_itself_and_no_validation_images(tiny_data, tmp_path):
    """Per-class tars straight in RAW (as some mirrors serve them), beside an empty val/: the train
    classes are prepared, and OUT/val/ is left to the user, saying so; an OUT inside RAW (which is
    only read) is refused."""
    raw = tmp_path / "download"
    (raw / "val").mkdir(parents=True)
    for folder in sorted((tiny_data / "train").iterdir()):
        _tar(raw / f"{folder.name}.tar", [(p.name, p.read_bytes()) for p in sorted(folder.iterdir())])
    assert_user_error(run_cli("data", "prepare", raw, raw / "prepared", check=False),
                      f"OUT {raw / 'prepared'} must lie outside the download {raw}")
    assert not (raw / "prepared").exists()
    proc = run_cli("data", "prepare", raw, tmp_path / "out", check=False)
    assert_user_error(proc, f"1 problem(s) in {tmp_path / 'out'} (listed above)")  # no val/ yet: said
    assert "4 class tars, val from no validation images" in proc.stdout
    assert "train: 4 class(es) written" in proc.stdout
    assert "no validation images in the download: OUT/val/ is left to you" in proc.stdout
    assert list_images(tmp_path / "out" / "train").classes == list_images(tiny_data / "train").classes


def test_what_a_download_holds_beside_its_class_tars_is_passed_over(tiny_data, tmp_path):
    """ILSVRC2012_img_train.tar may hold other files than the class tars (a checksum list), and a
    class tar folders as well as images; each class is read from its own member's bytes alone, even
    where its tar lacks the end-of-archive blocks that would stop a reader at its end."""
    raw = tmp_path / "download"
    raw.mkdir()
    members = [("MD5SUMS", b"0123 n00_hstripes.tar\n")]
    for folder in sorted((tiny_data / "train").iterdir()):
        buffer = io.BytesIO()
        tar = tarfile.open(fileobj=buffer, mode="w")
        folder_entry = tarfile.TarInfo(folder.name)
        folder_entry.type = tarfile.DIRTYPE
        tar.addfile(folder_entry)
        for image in sorted(folder.iterdir()):
            info = tarfile.TarInfo(f"{folder.name}/{image.name}")
            info.size = image.stat().st_size
            tar.addfile(info, io.BytesIO(image.read_bytes()))
        members.append((f"{folder.name}.tar", buffer.getvalue()))  # taken before close() ends the archive
    _tar(raw / "ILSVRC2012_img_train.tar", members)
    val = _val_files(tiny_data)
    _tar(raw / "ILSVRC2012_img_val.tar", [(name, data) for name, data, _ in val])
    _loc_csv(raw / "LOC_val_solution.csv", val)
    proc = run_cli("data", "prepare", raw, tmp_path / "out")
    assert "train: 4 class(es) written" in proc.stdout
    for folder in sorted((tiny_data / "train").iterdir()):
        assert _files(tmp_path / "out" / "train" / folder.name) == {
            tmp_path / "out" / "train" / folder.name / p.name: p.read_bytes() for p in folder.iterdir()}
    assert "train: 0 class(es) written, 4 already there" in run_cli("data", "prepare", raw, tmp_path / "out").stdout


def test_kaggle_layout(tiny_data, tmp_path, monkeypatch):
    """Kaggle's folders: the train images hard-linked into OUT (on one file system: no room
    needed for them, and none asked), the val images copied; a file beside the class folders
    (a Finder's .DS_Store) is no class."""
    raw = tmp_path / "kaggle"
    cls_loc = raw / "ILSVRC" / "Data" / "CLS-LOC"
    shutil.copytree(tiny_data / "train", cls_loc / "train")
    (cls_loc / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (cls_loc / "val").mkdir(parents=True)
    val = _val_files(tiny_data)
    for name, data, _ in val:
        (cls_loc / "val" / name).write_bytes(data)
    _loc_csv(raw / "LOC_val_solution.csv", val)
    checked = run_cli("data", "check", raw, check=False)  # no train/, no val/: both name the command
    assert_user_error(checked, "2 problem(s)")
    assert checked.stdout.count(f"looks like ImageNet as downloaded (Kaggle): make the folder a run reads with "
                                f"fastrsb data prepare {raw}") == 2
    import fastrsb.raw_imagenet
    train_bytes = sum(p.stat().st_size for p in (cls_loc / "train").rglob("*.JPEG"))
    with monkeypatch.context() as patched:  # room for the val copies, not for copies of the train images
        patched.setattr(fastrsb.raw_imagenet.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(2**40, 2**40 - train_bytes // 2, train_bytes // 2))
        proc = run_cli("data", "prepare", raw, tmp_path / "out")
    assert "Kaggle" in proc.stdout
    _assert_prepared(tmp_path / "out", tiny_data)
    assert all(p.stat().st_nlink == 2 for p in (tmp_path / "out" / "train").rglob("*.JPEG"))  # linked, not copied
    assert "train: 0 class(es) written, 4 already there" in run_cli("data", "prepare", raw, tmp_path / "out").stdout
    next((tmp_path / "out" / "train" / "n00_hstripes").iterdir()).rename(tmp_path / "out" / "train" / "n00_hstripes" /
                                                                         "renamed.JPEG")
    assert_user_error(run_cli("data", "prepare", raw, tmp_path / "out", check=False),
                      "renamed.JPEG (not in the download)")


def test_bad_downloads_are_named(ilsvrc, tmp_path, monkeypatch):
    out = tmp_path / "out"
    data = (ilsvrc / "ILSVRC2012_img_train.tar").read_bytes()
    (ilsvrc / "ILSVRC2012_img_train.tar").write_bytes(data[: len(data) // 2])  # truncated mid-download
    assert_user_error(run_cli("data", "prepare", ilsvrc, out, check=False), "ILSVRC2012_img_train.tar",
                      "Download it again")
    (ilsvrc / "ILSVRC2012_img_train.tar").write_bytes(data)
    val = (ilsvrc / "LOC_val_solution.csv").read_text()
    (ilsvrc / "LOC_val_solution.csv").write_text(val + "ILSVRC2012_val_00099999,n00_hstripes 1 2 3 4\n")
    assert_user_error(run_cli("data", "prepare", ilsvrc, out, check=False), "1 image(s) named in",
                      "are not among the validation images")
    import fastrsb.raw_imagenet
    monkeypatch.setattr(fastrsb.raw_imagenet.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 9, 1))
    assert_user_error(run_cli("data", "prepare", ilsvrc, tmp_path / "other", check=False), "GiB free")
    assert_user_error(run_cli("data", "prepare", tmp_path / "nothing-here", out, check=False),
                      "is not an ImageNet download fastrsb knows")


def test_devkit_labels_in_its_own_class_order(ilsvrc, tiny_data, tmp_path):
    """Labelled by the devkit (image-net.org's download): the ground truth holds class numbers in
    meta.mat's ILSVRC2012_ID order, which is not the sorted order of the wnids."""
    import numpy as np
    import scipy.io
    (ilsvrc / "LOC_val_solution.csv").unlink()
    wnids = sorted(p.name for p in (tiny_data / "train").iterdir())[::-1]  # ID 1 is the last wnid in sorted order
    synsets = np.zeros((len(wnids) + 1, 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for i, wnid in enumerate(wnids):
        synsets[i, 0] = (i + 1, wnid, 0)
    synsets[len(wnids), 0] = (len(wnids) + 1, "n99_parent", 2)  # a non-leaf synset: not a class
    scipy.io.savemat(tmp_path / "meta.mat", {"synsets": synsets})
    truth = "".join(f"{wnids.index(wnid) + 1}\n" for _, _, wnid in _val_files(tiny_data))
    with tarfile.open(ilsvrc / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "meta.mat", "ILSVRC2012_devkit_t12/data/meta.mat")
        (tmp_path / "gt.txt").write_text(truth)
        tar.add(tmp_path / "gt.txt", "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")
    out = tmp_path / "out"
    run_cli("data", "prepare", ilsvrc, out)
    _assert_prepared(out, tiny_data)
    for wnid in wnids:  # each val image in its own class, as the original tree had it
        assert sorted(p.read_bytes() for p in (out / "val" / wnid).iterdir()) == \
            sorted(p.read_bytes() for p in (tiny_data / "val" / wnid).iterdir())
    assert not (out / ".devkit").exists()
    # --synsets (a text file of the wnids in ID order) stands for meta.mat, which is not read then
    # (a machine without scipy): here the devkit's is no .mat at all.
    gt = (tmp_path / "gt.txt").read_bytes()
    (tmp_path / "meta.mat").write_bytes(b"not a MATLAB file")
    with tarfile.open(ilsvrc / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "meta.mat", "ILSVRC2012_devkit_t12/data/meta.mat")
        tar.add(tmp_path / "gt.txt", "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")
    (tmp_path / "wnids.txt").write_text("".join(f"{wnid}\n" for wnid in wnids))
    run_cli("data", "prepare", ilsvrc, tmp_path / "out2", "--synsets", tmp_path / "wnids.txt")
    assert _files(tmp_path / "out2" / "val") == {tmp_path / "out2" / p.relative_to(out): data
                                                 for p, data in _files(out / "val").items()}
    # LOC_val_solution.csv, where there is one, labels the images: the devkit beside it is not read.
    _loc_csv(ilsvrc / "LOC_val_solution.csv", _val_files(tiny_data))
    proc = run_cli("data", "prepare", ilsvrc, tmp_path / "out3")
    assert f"labels from {ilsvrc / 'LOC_val_solution.csv'}" in proc.stdout
    _assert_prepared(tmp_path / "out3", tiny_data)
    # A devkit without meta.mat (another year's, or cut short) is named, not taken for ID order.
    (ilsvrc / "LOC_val_solution.csv").unlink()
    with tarfile.open(ilsvrc / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        (tmp_path / "gt.txt").write_bytes(gt)
        tar.add(tmp_path / "gt.txt", "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")
    assert_user_error(run_cli("data", "prepare", ilsvrc, tmp_path / "out4", check=False),
                      "ILSVRC2012_devkit_t12.tar.gz holds no meta.mat: is it ILSVRC2012's devkit (t12)?")


def test_meta_mat_gives_its_leaf_synsets_in_id_order_or_is_refused(tmp_path):
    """meta.mat's classes are its leaf synsets (no children), by ILSVRC2012_ID; the others (the
    devkit's 860 parents) are no class a ground-truth number may name. Leaves whose IDs skip one
    are not the devkit's file: refused."""
    import numpy as np
    import scipy.io
    from fastrsb.prepare import read_meta_synsets

    def meta(rows):
        synsets = np.zeros((len(rows), 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
        for i, row in enumerate(rows):
            synsets[i, 0] = row
        scipy.io.savemat(tmp_path / "meta.mat", {"synsets": synsets})
        return tmp_path / "meta.mat"
    assert read_meta_synsets(meta([(4, "n00_parent", 3), (2, "n02", 0), (1, "n05", 0), (3, "n01", 0)])) == \
        ["n05", "n02", "n01"]
    with pytest.raises(UserError, match=r"the leaf synsets' ILSVRC2012_IDs do not run 1..3"):
        read_meta_synsets(meta([(1, "n05", 0), (2, "n02", 0), (4, "n01", 0)]))


# --- the Hugging Face hub's ILSVRC/imagenet-1k (tar.gz archives) ------------------------------------

def _wnid(k):
    return f"n{k:08d}"


@pytest.fixture
def hub(tiny_data, tmp_path):
    """The hub's download (`huggingface-cli download ILSVRC/imagenet-1k --repo-type dataset`): under
    data/, train_images_0.tar.gz and _1 with every class spread over both (shuffled, as the hub's
    are), val_images.tar.gz and test_images.tar.gz, flat, each member <image>_<wnid>.JPEG. Returns
    (RAW, {(split, wnid, file name): bytes} as a prepared folder should hold them)."""
    raw = tmp_path / "hub"
    (raw / "data").mkdir(parents=True)
    classes = sorted(p.name for p in (tiny_data / "train").iterdir())
    expected, train = {}, []
    for k, name in enumerate(classes):
        for i, image in enumerate(sorted((tiny_data / "train" / name).iterdir())):
            expected["train", _wnid(k), f"{_wnid(k)}_{i}.JPEG"] = image.read_bytes()
            train.append((f"{_wnid(k)}_{i}_{_wnid(k)}.JPEG", image.read_bytes()))
    train = train[1::2] + train[::2]  # a class's images in both archives
    for n, part in enumerate((train[: len(train) // 2], train[len(train) // 2:])):
        with tarfile.open(raw / "data" / f"train_images_{n}.tar.gz", "w:gz") as tar:
            for name, data in part:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    val = [(name, data, _wnid(classes.index(wnid))) for name, data, wnid in _val_files(tiny_data)]
    with tarfile.open(raw / "data" / "val_images.tar.gz", "w:gz") as tar:
        for name, data, wnid in val:
            info = tarfile.TarInfo(f"{name[:-5]}_{wnid}.JPEG")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            expected["val", wnid, name] = data
    _tar(raw / "data" / "test_images.tar.gz", [("ILSVRC2012_test_00000001.JPEG", val[0][1])])  # unlabelled
    return raw, expected


def _prepared(out):
    return {(p.parent.parent.name, p.parent.name, p.name): p.read_bytes() for p in sorted(out.glob("*/*/*"))
            if not p.parent.parent.name.startswith(".")}


def test_the_hubs_archives_prepare_resume_and_train(hub, tmp_path, monkeypatch):
    """Every image in its class folder under ImageNet's own file name, byte for byte, the download
    only read; run again, nothing extracted (no room asked for) and every class checked; an
    archive downloaded again is extracted again; a class folder removed is written again from the
    archives that hold it, even after that rewrite is itself cut short; then a run trains on it."""
    raw, expected = hub
    before = {p: p.stat().st_mtime_ns for p in (raw / "data").iterdir()}
    out = tmp_path / "imagenet"
    assert_user_error(run_cli("train", "tiny", "--data", raw, "--device", "cpu", check=False),
                      "looks like ImageNet as downloaded (Hugging Face (ILSVRC/imagenet-1k))",
                      f"fastrsb data prepare {raw}")
    proc = run_cli("data", "prepare", raw, out, "--workers", "2")
    assert "train: extracting 2 of 2 archive(s)" in proc.stdout and "ready to train" in proc.stdout
    assert "train: 4 class(es) written, 0 already there" in proc.stdout
    assert "val: 4 class(es) written, 0 already there" in proc.stdout
    assert _prepared(out) == expected
    said = re.findall(r"  (train_images_\d\.tar\.gz): ([\d,]+) images", proc.stdout)  # a line an archive
    assert [name for name, _ in said] == ["train_images_0.tar.gz", "train_images_1.tar.gz"]
    assert sum(int(count) for _, count in said) == sum(1 for split, _, _ in expected if split == "train")
    assert {p: p.stat().st_mtime_ns for p in (raw / "data").iterdir()} == before
    import errno
    import gzip
    from pathlib import Path
    import fastrsb.raw_imagenet
    with monkeypatch.context() as patched:  # all extracted: the archives need no more room
        patched.setattr(fastrsb.raw_imagenet.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 9, 1))
        proc = run_cli("data", "prepare", raw, out)
    assert "extracting" not in proc.stdout and "train: 0 class(es) written, 4 already there" in proc.stdout
    # Downloaded again (here the same images, packed otherwise: another size): extracted again.
    again = raw / "data" / "train_images_1.tar.gz"
    again.write_bytes(gzip.compress(gzip.decompress(again.read_bytes()), compresslevel=1))
    proc = run_cli("data", "prepare", raw, out)
    assert "train: extracting 1 of 2 archive(s)" in proc.stdout and "4 already there" in proc.stdout
    shutil.rmtree(out / "train" / _wnid(2))  # to be written again: both archives hold some of it
    # ... and that rewrite cut short by a full disk, one image of the class staged: the next run
    # extracts the archives again rather than take the staged image for the class.
    write_bytes, staged = Path.write_bytes, []

    def full_at_the_classs_second_image(path, data):
        if path.parent.name == _wnid(2):
            staged.append(path)
            if len(staged) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(path, data)
    with monkeypatch.context() as patched:
        patched.setattr(Path, "write_bytes", full_at_the_classs_second_image)
        assert_user_error(run_cli("data", "prepare", raw, out, "--workers", "1", check=False), "No space left")
    assert len(list((out / ".fastrsb-hf" / "train" / _wnid(2)).iterdir())) == 1
    proc = run_cli("data", "prepare", raw, out, "--workers", "1")
    assert "train: extracting 2 of 2 archive(s)" in proc.stdout
    assert "train: 1 class(es) written, 3 already there" in proc.stdout and "val: 0 class(es) written" in proc.stdout
    assert _prepared(out) == expected
    assert not (out / ".fastrsb-hf" / "train").exists()  # no staged copy left
    run_cli("train", "tiny", "--data", out, "--out", tmp_path / "run", "--device", "cpu", "--stop-after-steps", "1")


def test_an_interrupted_extraction_resumes_with_the_archives_left(hub, tmp_path, monkeypatch):
    """OUT's disk full mid-archive (one worker: this process, where the write is made to fail as a
    full disk fails) stops prepare in one line; an archive cut short mid-download stops it naming
    the archive, the other archive's extraction kept; once it is downloaded again, the next run
    extracts that one alone."""
    import errno
    from pathlib import Path
    raw, expected = hub
    out = tmp_path / "imagenet"
    write_bytes, written = Path.write_bytes, []

    def full_after_three_images(path, data):
        written.append(path)
        if len(written) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(path, data)
    monkeypatch.setattr(Path, "write_bytes", full_after_three_images)
    assert_user_error(run_cli("data", "prepare", raw, out, "--workers", "1", check=False),
                      f"cannot write into {out} (No space left on device;", "then run the same command again")
    monkeypatch.undo()
    second = raw / "data" / "train_images_1.tar.gz"
    whole = second.read_bytes()
    second.write_bytes(whole[: len(whole) // 2])
    assert_user_error(run_cli("data", "prepare", raw, out, "--workers", "1", check=False),
                      f"{second} cannot be read to its end", "Download it again",
                      "the archives extracted so far are kept for the next run")
    assert not (out / "train").exists()  # no class folder appears until every archive holding it is extracted
    second.write_bytes(whole)
    proc = run_cli("data", "prepare", raw, out, "--workers", "1")
    assert "train: extracting 1 of 2 archive(s)" in proc.stdout
    assert _prepared(out) == expected


def test_the_hubs_archives_into_a_folder_holding_other_files(hub, tmp_path, monkeypatch):
    """A class folder already in OUT with other images (another data set) is refused and left as it
    was; a member named otherwise than <image>_<wnid> (not the hub's archive) is named; a disk
    without room for the archives is said before any is extracted."""
    raw, _ = hub
    import fastrsb.raw_imagenet
    with monkeypatch.context() as patched:
        patched.setattr(fastrsb.raw_imagenet.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 9, 1))
        assert_user_error(run_cli("data", "prepare", raw, tmp_path / "full", check=False), "GiB free")
    assert not (tmp_path / "full" / ".fastrsb-hf").exists()
    out = tmp_path / "imagenet"
    (out / "train" / _wnid(1)).mkdir(parents=True)
    (out / "train" / _wnid(1) / "other.JPEG").write_bytes(b"another set's image")
    assert_user_error(run_cli("data", "prepare", raw, out, check=False),
                      f"{out / 'train' / _wnid(1)}: other.JPEG (not in the download)",
                      "Prepare into an empty folder, or remove those class folders")
    assert [p.name for p in (out / "train" / _wnid(1)).iterdir()] == ["other.JPEG"]
    shutil.rmtree(out / "train" / _wnid(1))
    (out / "train" / _wnid(1)).write_text("notes")  # a file under a class's name
    assert_user_error(run_cli("data", "prepare", raw, out, check=False),
                      f"{out / 'train' / _wnid(1)}: a file, where it goes")
    assert (out / "train" / _wnid(1)).read_text() == "notes"
    _tar(tmp_path / "odd.tar", [])
    with tarfile.open(raw / "data" / "train_images_1.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "odd.tar", "n00000001_7.JPEG")  # no wnid after the last underscore
    assert_user_error(run_cli("data", "prepare", raw, tmp_path / "other", check=False), "train_images_1.tar.gz",
                      "member 'n00000001_7.JPEG' is not named <image>_<wnid>.JPEG")


def test_the_hubs_member_names_give_class_and_file_name():
    """<image>_<wnid>.JPEG gives the class and ImageNet's file name; a name without a wnid last,
    without an image part, or hidden (a Mac's ._ companion file) is refused."""
    from fastrsb.hub_imagenet import member_target
    assert member_target("train/n01440764_10026_n01440764.JPEG") == ("n01440764", "n01440764_10026.JPEG")
    assert member_target("ILSVRC2012_val_00000001_n01751748.JPEG") == ("n01751748", "ILSVRC2012_val_00000001.JPEG")
    for name in ("n01440764_10026.JPEG", "_n01440764.JPEG", "._n01440764_1_n01440764.JPEG", "n01440764_1_n0144076.JPEG",
                 "n01440764_1_n01440764"):
        with pytest.raises(ValueError, match="is not named <image>_<wnid>.JPEG"):
            member_target(name)


def test_webdataset_samples_are_grouped_by_their_whole_key():
    """A shard's members are grouped by key, the path up to the first dot of the file's name:
    two samples of one name in two folders are two samples; extensions in capitals are read."""
    from fastrsb.class_order import imagenet_classes
    from fastrsb.hub_imagenet import _webdataset_images
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("a/k.cls", b"0"), ("a/k.JPG", b"first"), ("b/k.cls", b"1"), ("b/k.jpg", b"second"),
                           ("c.cls", b"2"), ("c.webp", b"third")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    wnids = imagenet_classes()
    with tarfile.open(fileobj=buffer, mode="r|") as tar:
        assert list(_webdataset_images(tar, wnids)) == [(wnids[0], "k.jpg", b"first"), (wnids[1], "k.jpg", b"second"),
                                                        (wnids[2], "c.webp", b"third")]


@pytest.fixture
def timm_shards(tiny_data, tmp_path):
    """timm/imagenet-1k-wds's download: webdataset shards imagenet1k-train-0000.tar to -0016.tar
    (each class over several: 17, as many as make prepare draw a bar rather than a line a shard)
    and imagenet1k-validation-00.tar, each sample <key>.jpg, <key>.cls (its class index in
    ImageNet-1k's sorted wnids) and <key>.json (the val samples' with the original file name, the
    train samples' without). Returns (RAW, {(split, wnid, file name): bytes})."""
    from fastrsb.class_order import imagenet_classes
    raw, wnids, indices = tmp_path / "wds", imagenet_classes(), [0, 1, 10, 999]
    raw.mkdir()
    classes = sorted(p.name for p in (tiny_data / "train").iterdir())
    expected, train = {}, []
    for k, name in enumerate(classes):
        wnid = wnids[indices[k]]
        for i, image in enumerate(sorted((tiny_data / "train" / name).iterdir())):
            key = f"{wnid}_{i}"
            expected["train", wnid, f"{key}.jpg"] = image.read_bytes()
            train.append([(f"{key}.cls", str(indices[k]).encode()), (f"{key}.jpg", image.read_bytes()),
                          (f"{key}.json", b'{"label": %d}' % indices[k])])
    for shard in range(17):
        _tar(raw / f"imagenet1k-train-{shard:04d}.tar", [m for sample in train[shard::17] for m in sample])
    val = []
    for n, (name, data, folder) in enumerate(_val_files(tiny_data)):
        index = indices[classes.index(folder)]
        expected["val", wnids[index], name] = data
        val += [(f"{n:06d}.jpg", data), (f"{n:06d}.cls", str(index).encode()),
                (f"{n:06d}.json", b'{"filename": "%s", "label": %d}' % (name.encode(), index))]
    _tar(raw / "imagenet1k-validation-00.tar", val)
    return raw, expected


def test_timms_webdataset_shards(timm_shards, tmp_path):
    """timm's copy: each sample in the class folder of its .cls index (ImageNet's wnids sorted),
    named by its JSON's file name where it has one (val: ImageNet's, as ReaL's labels look up),
    else by its key; run again, every class checked and skipped; a sample whose class index is not
    ImageNet-1k's is named."""
    raw, expected = timm_shards
    out = tmp_path / "imagenet"
    proc = run_cli("data", "prepare", raw, out, "--workers", "2")
    assert "Hugging Face (timm/imagenet-1k-wds)" in proc.stdout and "ready to train" in proc.stdout
    assert "archives 17/17" in proc.stderr and "imagenet1k-train-0000.tar:" not in proc.stdout  # a bar over many
    assert "train: 4 class(es) written, 0 already there" in proc.stdout
    assert _prepared(out) == expected
    assert "train: 0 class(es) written, 4 already there" in run_cli("data", "prepare", raw, out).stdout
    _tar(raw / "imagenet1k-train-0016.tar", [("x.cls", b"1000"), ("x.jpg", b"\xff\xd8")])
    assert_user_error(run_cli("data", "prepare", raw, tmp_path / "other", check=False), "imagenet1k-train-0016.tar",
                      "sample 'x' has no class index 0..999 (.cls)", "timm/imagenet-1k-wds")
