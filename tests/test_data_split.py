"""fastrsb data split: one's own folder of class folders -> train/ and val/, each class split alike."""
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import assert_user_error, folder_held, run_cli
from fastrsb.pipelines import list_images


@pytest.fixture
def own_data(tiny_data, tmp_path):
    """A data set as people have their own: class folders, no split. tiny_data's train classes (12
    images each), one more of 31 (a few in a sub-folder, beside a file that is no image), and one of
    3, too small for a 15% share."""
    source = tmp_path / "own"
    shutil.copytree(tiny_data / "train", source)
    big, small = source / "z_big", source / "a_small"
    (big / "more").mkdir(parents=True)
    images = sorted(tiny_data.rglob("*.JPEG"))
    for i, image in enumerate(images[:31]):
        shutil.copy(image, big / ("more" if i < 4 else "") / f"{i:02d}.JPEG")
    (big / "README.txt").write_text("not an image")
    shutil.copy(images[0], source / "loose.JPEG")  # in no class folder: in neither split, said
    small.mkdir()
    for i, image in enumerate(images[:3]):
        shutil.copy(image, small / f"s{i}.jpg")
    return source


def held_out(target: Path) -> dict[str, dict[str, set[str]]]:
    """{split: {class: its files, as paths below the class folder}} of a split folder."""
    out = {}
    for split in ("train", "val", "test")[:3 if (target / "test").is_dir() else 2]:
        listed = list_images(target / split)
        out[split] = {name: set() for name in listed.classes}
        for file, label in zip(listed.files, listed.labels):
            name = listed.classes[label]
            out[split][name].add(os.path.relpath(file, target / split / name))
    return out


def test_a_split_holds_out_each_classes_share_and_trains(own_data, tmp_path):
    """Every image the loaders read in SOURCE is in exactly one split, under its class and its path
    below the class folder (a sub-folder's too; the file that is no image left out), hard-linked; val
    holds round(15%) of each class, at least one image in each split where a class is smaller; the
    record says so; the folder checks and trains as a data folder; the same command again is a no-op."""
    target = tmp_path / "own-split"
    proc = run_cli("data", "split", own_data, target, "--val", "0.15")
    sizes = {"a_small": 3, "z_big": 31, **{p.name: 12 for p in own_data.iterdir() if p.name.startswith("n0")}}
    expected_val = {"a_small": 1, "z_big": 5, **{name: 2 for name in sizes if name.startswith("n0")}}  # .45, 4.65, 1.8
    train_images, val_images = sum(sizes.values()) - sum(expected_val.values()), sum(expected_val.values())
    assert f"{target}: {train_images} train / {val_images} val images in 6 classes (val 15% of each class, seed 0; " \
           "hard links)" in proc.stdout
    assert "note: 1 class(es) too small for the shares asked kept an image in each split: a_small (3 images: 1 val)" \
        in proc.stdout
    assert f"note: 1 image(s) are in no split: directly in {own_data}, outside any class folder" in proc.stdout
    assert f"train on it: fastrsb train RECIPE --data {target}" in proc.stdout

    split = held_out(target)
    source = list_images(own_data)
    for name in source.classes:
        files = {os.path.relpath(f, own_data / name) for f, y in zip(source.files, source.labels)
                 if source.classes[y] == name}
        assert split["train"][name] | split["val"][name] == files and not split["train"][name] & split["val"][name]
        assert len(split["val"][name]) == expected_val[name]
        for file in files:
            where = target / ("val" if file in split["val"][name] else "train") / name / file
            assert os.path.samefile(where, own_data / name / file)  # a hard link: no room taken
    assert {"more/00.JPEG", "more/03.JPEG"} <= split["train"]["z_big"] | split["val"]["z_big"]
    assert not list(target.rglob("README.txt"))
    record = json.loads((target / "split.json").read_text())
    assert record.pop("listing") and record == {
        "source": str(own_data), "val": 0.15, "val_per_class": None, "test": None, "test_per_class": None, "seed": 0,
        "linked": True, "classes": {name: [sizes[name] - expected_val[name], expected_val[name], 0] for name in sizes}}

    assert "ok: ready to train" in run_cli("data", "check", target, "--no-decode").stdout
    proc = run_cli("train", "tiny", "--data", target, "--out", tmp_path / "run", "--device", "cpu",
                   "--stop-after-steps", "1")
    assert f"{train_images} train / {val_images} val images" in proc.stdout
    again = run_cli("data", "split", own_data, target, "--val", "0.15")
    assert ": there already, as asked" in again.stdout and held_out(target) == split


def test_the_same_seed_gives_the_same_split_and_another_class_changes_none(own_data, tmp_path):
    """The val images depend on the seed, the class's name and its files alone: the same command
    gives the same split (pinned for one class, so that a change of the rule, or of Python's seeded
    shuffle, fails here); another seed another; a class added, or a class's images another count,
    leaves every other class's split as it was. --test holds out a third split and leaves val as it
    was; --val-per-class holds out N of each."""
    first = held_out(Path(run_cli("data", "split", own_data, tmp_path / "a").stdout.split(":")[0]))
    assert held_out(Path(run_cli("data", "split", own_data, tmp_path / "b").stdout.split(":")[0])) == first
    assert first["val"]["z_big"] == {"11.JPEG", "24.JPEG", "28.JPEG"}  # 10% of 31
    other = held_out(Path(run_cli("data", "split", own_data, tmp_path / "c", "--seed", "1").stdout.split(":")[0]))
    assert other["val"] != first["val"]
    # A test split too: val as it was, test the next of each class's shuffled images, train the rest.
    proc = run_cli("data", "split", own_data, tmp_path / "t", "--test", "0.1")
    assert "/ 8 test images in 6 classes (val 10% of each class, test 10% of each class, seed 0; hard links)" \
        in proc.stdout and f"test the model chosen: fastrsb eval RUN_DIR/best.pt --data {tmp_path / 't' / 'test'}" \
        in proc.stdout  # 12 -> 1 (1.2), 31 -> 3 (3.1): 4 + 3 + 1 (a_small's 3 keep one for each split)
    assert "note: 1 class(es) too small for the shares asked kept an image in each split: a_small (3 images: 1 " \
        "val, 1 test)" in proc.stdout  # the others' val and test are their shares, rounded
    tested = held_out(tmp_path / "t")
    assert tested["val"] == first["val"] and {k: len(v) for k, v in tested["test"].items()} == \
        {"a_small": 1, "z_big": 3, **{k: 1 for k in first["val"] if k.startswith("n0")}}
    for name, files in tested["train"].items():
        assert files | tested["test"][name] == first["train"][name] and not files & tested["test"][name]
    assert "ok: ready to train" in run_cli("data", "check", tmp_path / "t", "--no-decode").stdout
    shutil.copytree(own_data / "z_big", own_data / "m_new")
    (own_data / "z_big" / "30.JPEG").unlink()
    grown = held_out(Path(run_cli("data", "split", own_data, tmp_path / "d").stdout.split(":")[0]))
    assert {k: v for k, v in grown["val"].items() if k not in ("m_new", "z_big")} == \
        {k: v for k, v in first["val"].items() if k != "z_big"}
    assert grown["val"]["m_new"] != grown["val"]["z_big"]  # another name, another draw
    proc = run_cli("data", "split", own_data, tmp_path / "e", "--val-per-class", "2")
    assert "(2 val image(s) a class, seed 0; hard links)" in proc.stdout
    assert {len(files) for files in held_out(tmp_path / "e")["val"].values()} == {2}
    record = json.loads((tmp_path / "e" / "split.json").read_text())
    assert (record["val"], record["val_per_class"]) == (None, 2)  # no share besides: the record says the rule


def test_what_cannot_be_split_is_refused_and_writes_nothing(own_data, tmp_path):
    """One line each, nothing written (the target stays absent, or as it was) and nothing left
    beside it."""
    target = tmp_path / "t"
    refused = [
        (("--val-per-class", "3"), "1 class(es) have too few images to split: a_small (3); each needs 4 or more (3 "
                                   "val image(s) a class, and one to train on)"),
        (("--val-per-class", "1", "--test-per-class", "2"), "a_small (3); each needs 4 or more (1 val image(s) a "
                                                            "class, 2 test image(s) a class, and one to train on)"),
        (("--val", "0.5", "--test", "0.5"), "--val 0.5 and --test 0.5 leave no training images"),
        (("--test", "1.5"), "--test 1.5: a share of each class's images"),
        (("--val", "1"), "--val 1.0: a share of each class's images, between 0 and 1"),
        (("--val", "0"), "--val 0.0: a share"),
        (("--val-per-class", "0"), "--val-per-class 0: one image or more"),
    ]
    for options, said in refused:
        assert_user_error(run_cli("data", "split", own_data, target, *options, check=False), said)
    assert_user_error(run_cli("data", "split", own_data, own_data / "x", check=False),
                      f"the target {own_data / 'x'} must lie outside the source {own_data}")
    assert_user_error(run_cli("data", "split", tmp_path / "nothing", target, check=False), "does not exist")
    with folder_held(own_data, "fastrsb data shrink"):
        assert_user_error(run_cli("data", "split", own_data, target, check=False),
                          f"{own_data} is being written by fastrsb data shrink")
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == ["own"]

    for name in ("s0.jpg", "s1.jpg"):
        (own_data / "a_small" / name).rename(tmp_path / name)
    assert_user_error(run_cli("data", "split", own_data, target, check=False),
                      "a_small (1); each needs 2 or more (val 10% of each class, and one to train on)")
    for name in ("s0.jpg", "s1.jpg"):
        (tmp_path / name).rename(own_data / "a_small" / name)

    run_cli("data", "split", own_data, target)
    before = held_out(target)
    assert_user_error(run_cli("data", "split", own_data, target, "--seed", "3", check=False),
                      f"{target} holds another split (of {own_data}, val 10% of each class, seed 0): split into a "
                      "new folder")
    (own_data / "z_big" / "10.JPEG").rename(own_data / "z_big" / "10b.JPEG")  # as many images, another
    assert_user_error(run_cli("data", "split", own_data, target, check=False),
                      f"{target} is this split of {own_data} as it was (82 images); it now holds 82, or other files")
    (own_data / "z_big" / "10b.JPEG").unlink()
    assert_user_error(run_cli("data", "split", own_data, target, check=False), "it now holds 81, or other files")
    assert_user_error(run_cli("data", "split", target, tmp_path / "u", check=False),
                      f"{target} is split already (train/ holds class folders): to split one of its folders anew, "
                      f"give that folder ({target / 'train'})")
    assert held_out(target) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    assert_user_error(run_cli("data", "split", own_data, other, check=False),
                      f"{other} holds files (mine.txt): split into a new or empty folder")
    assert [p.name for p in other.iterdir()] == ["mine.txt"]


def test_a_split_refuses_odd_sources_and_targets_and_says_what_it_rounded(own_data, tmp_path, monkeypatch):
    """More refusals, one line each and nothing written: a negative seed, more than five classes
    too small (five named), a source that is a file, of one class, or holding val/ of class
    folders; a target that is a file, or of four files (three named). An empty target folder is
    filled; a hidden file or a note beside the class folders is no image left out; a class of 3
    asked for half to val keeps one for test; more than three classes too small for the shares
    are three named; a split another process landed meanwhile is kept, ours refused naming it."""
    import fastrsb.data_split as data_split
    target = tmp_path / "t"
    for options, said in ((("--seed", "-1"), "--seed -1: 0 or more"),
                          (("--val-per-class", "40"), "6 class(es) have too few images to split: a_small (3), "
                                                      "n00_hstripes (12), n01_vstripes (12), n02_checks (12), "
                                                      "n03_dots (12) and 1 more; each needs 41 or more")):
        assert_user_error(run_cli("data", "split", own_data, target, *options, check=False), said)
    one, valonly = tmp_path / "one", tmp_path / "valonly"
    shutil.copytree(own_data / "z_big", one / "only")
    shutil.copytree(own_data / "n00_hstripes", valonly / "val" / "n00_hstripes")
    shutil.copytree(own_data / "n01_vstripes", valonly / "elsewhere")
    for source, said in ((own_data / "loose.JPEG", "is a file, not a folder"),
                         (one, f"{one} holds one class (only): a classifier needs two or more"),
                         (valonly, f"{valonly} is split already (val/ holds class folders)")):
        assert_user_error(run_cli("data", "split", source, target, check=False), said)
    (tmp_path / "file").write_text("x")
    assert_user_error(run_cli("data", "split", own_data, tmp_path / "file", check=False),
                      f"the target {tmp_path / 'file'} is a file, not a folder")
    full = tmp_path / "full"
    full.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (full / name).write_text(name)
    assert_user_error(run_cli("data", "split", own_data, full, check=False),
                      f"{full} holds files (a.txt, b.txt, c.txt, ...): split into a new or empty folder")
    assert not target.exists() and sorted(p.name for p in full.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt"]

    (own_data / ".hidden.JPEG").write_bytes((own_data / "loose.JPEG").read_bytes())
    (own_data / "notes.txt").write_text("where the images came from")
    target.mkdir()
    proc = run_cli("data", "split", own_data, target, "--val", "0.5", "--test", "0.1")
    assert "note: 1 image(s) are in no split" in proc.stdout  # loose.JPEG alone
    assert {name: len(files) for name, files in held_out(target)["test"].items()}["a_small"] == 1
    proc = run_cli("data", "split", own_data, tmp_path / "u", "--val", "0.01", "--test", "0.01")
    assert "note: 6 class(es) too small for the shares asked kept an image in each split: a_small (3 images: 1 " \
           "val, 1 test), n00_hstripes (12 images: 1 val, 1 test), n01_vstripes (12 images: 1 val, 1 test) and 3 " \
           "more" in proc.stdout

    place = data_split._place

    def another_landing_meanwhile(origins, staging, plan, progress):
        shutil.copytree(tmp_path / "u", tmp_path / "w")  # another process's split (another rule) lands first
        return place(origins, staging, plan, progress)
    monkeypatch.setattr(data_split, "_place", another_landing_meanwhile)
    assert_user_error(run_cli("data", "split", own_data, tmp_path / "w", check=False),
                      f"{tmp_path / 'w'} holds another split (of {own_data}, val 1% of each class, test 1% of each "
                      "class, seed 0): split into a new folder")
    assert json.loads((tmp_path / "w" / "split.json").read_text())["val"] == 0.01  # theirs, kept


def other_disk(tmp_path) -> Path:
    """A folder on another file system than tmp_path (/dev/shm's tmpfs), or a skip."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system here")
    return Path(os.environ.get("TMPDIR_SHM", "/dev/shm"))


def test_across_disks_the_images_are_copied(own_data, tmp_path, monkeypatch):
    """A target on another disk than the source gets copies (a hard link cannot cross): the same
    bytes, other files; the record and the line say copies. Copies that would not fit are refused."""
    shm = other_disk(tmp_path)
    target = Path(shm) / f"fastrsb-split-{os.getpid()}"
    try:
        assert "; copies)" in run_cli("data", "split", own_data, target).stdout
        for split, classes in held_out(target).items():
            for name, files in classes.items():
                for file in files:
                    copy, original = target / split / name / file, own_data / name / file
                    assert copy.read_bytes() == original.read_bytes() and not os.path.samefile(copy, original)
        assert json.loads((target / "split.json").read_text())["linked"] is False
    finally:
        shutil.rmtree(target, ignore_errors=True)
    import fastrsb.data_split as data_split  # copies that would not fit its disk: refused before the first
    monkeypatch.setattr(data_split, "free_gb", lambda path: 0.0)
    assert_user_error(run_cli("data", "split", own_data, target, check=False),
                      f"{target} is on another disk than {own_data}, so its images would be copied (0.0 GB), and its "
                      "disk has 0.0 GB free")
    assert not target.exists()


def test_a_full_disk_or_ctrl_c_leaves_no_partial_split(own_data, tmp_path, monkeypatch):
    """A split stopped halfway leaves neither the target nor its staging folder: a full disk (the
    kernel's: copies across disks written into /dev/full) in one line saying so; Ctrl-C too."""
    shm = other_disk(tmp_path)
    source = shm / f"fastrsb-own-{os.getpid()}"
    shutil.copytree(own_data, source)
    try:
        copy = shutil.copyfile
        monkeypatch.setattr(shutil, "copyfile", lambda src, dst: copy(src, "/dev/full"))
        assert_user_error(run_cli("data", "split", source, tmp_path / "t", check=False),
                          f"cannot write into {tmp_path / 't'} (No space left on device;", "GB free on its disk): "
                          "nothing of it kept; make room, then run the same command again")
    finally:
        shutil.rmtree(source, ignore_errors=True)
    links, link = [], os.link

    def interrupted(src, dst):
        if len(links) == 5:
            raise KeyboardInterrupt
        links.append(link(src, dst))
    monkeypatch.setattr(os, "link", interrupted)
    assert run_cli("data", "split", own_data, tmp_path / "t", check=False).returncode == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own"]


def test_a_data_folder_without_val_points_to_split(own_data, tmp_path):
    """`train` (and data check, doctor: the same check) on a folder of class folders, or on one
    with train/ and no val/, says how to split it."""
    proc = run_cli("train", "tiny", "--data", own_data, "--out", tmp_path / "run", "--device", "cpu", check=False)
    assert_user_error(proc, f"{own_data} has no 'train' folder", "it holds 6 class folders: to hold some of each "
                      f"class's images out for validation, fastrsb data split {own_data} {own_data}-split")
    data = tmp_path / "data"
    shutil.copytree(own_data, data / "train")
    (data / "train" / "loose.JPEG").unlink()  # (another problem data check would name)
    proc = run_cli("data", "check", data, check=False)
    assert_user_error(proc, f"1 problem(s) in {data}")
    assert "no 'val' folder" in proc.stdout and "its train/ holds 6 class folders: to hold some of each class's " \
        f"images out for validation, fastrsb data split {data / 'train'} {data}-split" in proc.stdout
    one = tmp_path / "one"  # one class folder: no split makes a classifier's data of it, and none is offered
    shutil.copytree(next(p for p in sorted(own_data.iterdir()) if p.is_dir()), one / "train" / "only")
    proc = run_cli("data", "check", one, check=False)
    assert "no 'val' folder" in proc.stdout and "data split" not in proc.stdout


@pytest.fixture
def labelled_flat(tiny_data, tmp_path):
    """A flat folder of images and a table of their classes, as competition data come: each of
    tiny_data's train images as <class>-<name>, named in the table without its extension (one with
    it), with a column more; one image no row names."""
    flat, rows = tmp_path / "flat", []
    flat.mkdir()
    for image in sorted((tiny_data / "train").rglob("*.JPEG")):
        name = f"{image.parent.name}-{image.name}"
        shutil.copy(image, flat / name)
        rows.append((name if not rows else Path(name).stem, image.parent.name, len(rows) % 5))
    shutil.copy(image, flat / "unlabelled.JPEG")
    table = tmp_path / "labels.csv"
    table.write_text("image,label,fold\n" + "".join(f"{n},{c},{f}\n" for n, c, f in rows))
    return flat, table, rows


def test_a_table_of_classes_splits_a_flat_folder_as_class_folders_would_be(labelled_flat, tmp_path):
    """--labels: each image goes to its row's class, and the split is the one the same images in
    class folders get (the same names, classes and seed: the same val images); an image no row names
    is left out and said; a TSV saved with a byte-order mark, its columns named, reads the same."""
    flat, table, rows = labelled_flat
    assert_user_error(run_cli("data", "split", flat, tmp_path / "t", "--labels", table, check=False),
                      f"{table} has the columns image, label, fold: say which holds the class with --label-column")
    proc = run_cli("data", "split", flat, tmp_path / "t", "--labels", table, "--label-column", "label")
    assert "44 train / 4 val images in 4 classes (val 10% of each class" in proc.stdout  # 12 a class: 1 (1.2)
    assert f"note: 1 image(s) are in no split: no row of {table} names them" in proc.stdout
    by_table = held_out(tmp_path / "t")
    folders = tmp_path / "folders"
    for name, label, _ in rows:
        (folders / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(flat / (name if name.endswith(".JPEG") else f"{name}.JPEG"), folders / label)
    assert held_out(Path(run_cli("data", "split", folders, tmp_path / "f").stdout.split(":")[0])) == by_table
    for label, files in by_table["train"].items():
        assert {f.split("-")[0] for f in files | by_table["val"][label]} == {label}
    assert json.loads((tmp_path / "t" / "split.json").read_text())["labels"] == str(table)
    tsv = tmp_path / "labels.tsv"
    # (its rows in the reverse order: a split depends on the images, not on the table's order)
    tsv.write_bytes("\ufeffclass\tfile\n".encode() + "".join(f"{c}\t{n}\n" for n, c, _ in reversed(rows)).encode())
    run_cli("data", "split", flat, tmp_path / "v", "--labels", tsv, "--file-column", "file", "--label-column", "class")
    assert held_out(tmp_path / "v") == by_table


def test_a_table_that_cannot_class_the_images_is_refused_naming_its_row(labelled_flat, tmp_path):
    flat, table, rows = labelled_flat
    lines = table.read_text().splitlines()

    def refused(text, *said, options=("--label-column", "label")):
        table.write_text("\n".join(text) + "\n")
        assert_user_error(run_cli("data", "split", flat, tmp_path / "t", "--labels", table, *options, check=False),
                          *said)
    refused(lines + ["ghost,n00_hstripes,0"], f"1 row(s) of {table} name no image below {flat}: 'ghost' (column "
                                              "'image': a path below")
    refused(lines + [f"{rows[3][0]},{rows[40][1]},0"], f"{table}:{len(lines) + 1}: {rows[3][0]}.JPEG is of class "
                                                       f"'{rows[40][1]}' here and of '{rows[3][1]}' on line 5: an "
                                                       "image has one class")
    for label, why in (("a/b", "cannot name a folder"), (".hidden", "its folder would be hidden"),
                       ("", "no class given")):
        refused([lines[0], f"{rows[0][0]},{label},0"] + lines[2:], f"{table}:2: ", why)
    refused(lines[1:], f"{table}'s first line names an image", "the table needs a header row")
    refused([lines[0]] + [f"{n},one,0" for n, _, _ in rows], f"{table} names one class (one)")
    refused(lines, "--file-column 'name': ", "has the columns image, label, fold", options=("--file-column", "name"))
    shutil.copy(flat / "unlabelled.JPEG", flat / f"{rows[5][0]}.png")  # a second image of that name
    refused(lines, f"{table}:7: {rows[5][0]!r} names two images below {flat} (other extensions): name it with its "
                   "extension")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat", "labels.csv"]
