import hashlib

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
