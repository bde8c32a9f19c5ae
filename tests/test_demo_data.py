import hashlib
import os
from pathlib import Path

import pytest
from PIL import Image

from fastrsb.demo_data import CLASSES, write_demo


def digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.JPEG")):
        h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_layout_and_odd_files(tiny_data):
    for split, count in (("train", 12), ("val", 5)):
        classes = sorted(p.name for p in (tiny_data / split).iterdir())
        assert classes == list(CLASSES[:4])
        for name in classes:
            assert len(list((tiny_data / split / name).glob("*.JPEG"))) == count
    folder = tiny_data / "train" / CLASSES[0]
    kinds = [(Image.open(p).format, Image.open(p).mode, Image.open(p).info.get("progressive", 0))
             for p in sorted(folder.glob("*.JPEG"))]
    assert ("JPEG", "L", 0) in kinds and ("JPEG", "CMYK", 0) in kinds and ("PNG", "RGB", 0) in kinds
    assert any(fmt == "JPEG" and progressive for fmt, _, progressive in kinds)
    sizes = {Image.open(p).size for p in (tiny_data / "train").rglob("*.JPEG")}
    aspects = [w / h for w, h in sizes]
    assert len(sizes) > 30 and min(aspects) < 0.8 and max(aspects) > 1.25  # varied, like ImageNet


def test_deterministic_from_seed(tmp_path):
    a = write_demo(tmp_path / "a", 3, 1, seed=5, num_classes=2)
    b = write_demo(tmp_path / "b", 3, 1, seed=5, num_classes=2)
    c = write_demo(tmp_path / "c", 3, 1, seed=6, num_classes=2)
    assert digest(a) == digest(b) != digest(c)


def test_an_interrupted_generation_leaves_no_partial_data_set(tmp_path, monkeypatch):
    """Ctrl-C while `fastrsb train demo` generates data/demo: no data/demo a later run would take
    for the whole set (it is written beside and renamed into place), nothing left beside it; the
    next generation writes it whole."""
    import pytest
    import fastrsb.demo_data as demo_data
    save, saved = demo_data._save, []

    def interrupted(image, path, index):
        if len(saved) == 5:
            raise KeyboardInterrupt
        saved.append(path)
        save(image, path, index)
    monkeypatch.setattr(demo_data, "_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_demo(tmp_path / "demo", 3, 1, num_classes=2)
    assert saved and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "demo").mkdir()  # an empty folder (made by hand, say) is filled the same way
    write_demo(tmp_path / "demo", 3, 1, num_classes=2)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"] and len(list((tmp_path / "demo").rglob("*.JPEG"))) == 8
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "demo").stat().st_mode & 0o777 == 0o777 & ~umask  # a plain mkdir's, not mkdtemp's 0700


def test_a_racing_writer_keeps_one_complete_copy(tmp_path, monkeypatch):
    """Two processes generating the demo set at once (each rank of a torchrun): the first renamed
    into place stays, the other's copy is dropped, and neither fails."""
    import fastrsb.demo_data as demo_data
    first = write_demo(tmp_path / "first", 3, 1, num_classes=2)
    expected = digest(first)
    (first / "written_by_the_racer").touch()
    write_into = demo_data._write_into

    def racer_done_first(root, *args):
        write_into(root, *args)
        first.rename(tmp_path / "demo")  # the other process's rename comes first
    monkeypatch.setattr(demo_data, "_write_into", racer_done_first)
    assert write_demo(tmp_path / "demo", 3, 1, num_classes=2) == tmp_path / "demo"
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # our copy dropped, nothing left beside
    assert (tmp_path / "demo/written_by_the_racer").exists() and digest(tmp_path / "demo") == expected


def test_keep_existing_leaves_a_finished_copy_alone(tmp_path):
    """`fastrsb train demo` under torchrun: a rank that finds data/demo written meanwhile by another
    leaves it as it is (rewriting a file in place could be read half-written by the other's loader)."""
    root = write_demo(tmp_path / "demo", 3, 1, num_classes=2)
    marked = sorted(root.rglob("*.JPEG"))[0]
    marked.write_bytes(marked.read_bytes() + b"the other rank's copy")  # a rewrite would lose this
    write_demo(root, 3, 1, num_classes=2, keep_existing=True)
    assert marked.read_bytes().endswith(b"the other rank's copy")


def test_the_umask_is_read_without_being_changed():
    """staging.current_umask reads /proc: setting the umask to read it would leave it 0 for a
    moment for the process's other threads."""
    from fastrsb.staging import current_umask
    saved = os.umask(0o027)
    try:
        assert current_umask() == 0o027
    finally:
        os.umask(saved)


def test_a_folder_replaced_whole_or_put_back_as_it_was(tmp_path, monkeypatch):
    """staged_folder(existing="replace") (export --force): the new folder takes the old one's place
    and the old one is removed; where the new one cannot take its place (a full disk, say), the old
    one is put back as it was and the error goes on. Nothing is left beside them either way."""
    from fastrsb.staging import staged_folder
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staged_folder(target, existing="replace") as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]

    rename = Path.rename

    def no_room_the_second_time(self, destination):
        if self.name.endswith(".tmp") and not Path(destination).exists():  # the new folder, after the old one left
            raise OSError(28, "No space left on device")
        return rename(self, destination)
    monkeypatch.setattr(Path, "rename", no_room_the_second_time)
    with pytest.raises(OSError, match="No space left"):
        with staged_folder(target, existing="replace") as staging:
            (staging / "newer.txt").write_text("newer")
    assert [p.name for p in target.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
