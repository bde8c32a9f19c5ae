"""`fastrsb eval --real-labels`: ImageNet-ReaL's top-1/top-5 as timm's validate.py computes them
(timm.data.RealLabelsImagenet, over the same logits), with the labels timm ships, and the plain
top-1/top-5 beside them as it computes those (timm.utils.accuracy)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_user_error, run_cli
from fastrsb.model import make_model
from fastrsb.pipelines import ImageList, val_loader
from fastrsb.recipe import load_recipe


def _imagenet_val_sample(root, real):
    """ImageNet's val layout at 1,000 classes, an image each (32 x 32, a colour ramp): files named as
    ImageNet's, chosen so that their ReaL labels cover what counts (sets naming classes 0-9, which
    the model below favours, sets of several labels, and empty sets, which are left out)."""
    from timm.data import ImageNetInfo
    wnids = ImageNetInfo().label_names()
    favoured = [i for i, labels in enumerate(real) if set(labels) & set(range(10))][:400]
    empty = [i for i, labels in enumerate(real) if not labels][:100]
    several = [i for i, labels in enumerate(real) if len(labels) > 2][:100]
    # and sets of the first class or the last alone: output 0 whichever way the checkpoint orders its classes
    ends = [i for i, labels in enumerate(real) if labels in ([0], [999])][:20]
    chosen = list(dict.fromkeys(ends + favoured + empty + several))
    chosen += [i for i in range(len(real)) if i not in set(chosen)][:1000 - len(chosen)]
    rng = np.random.default_rng(0)
    for wnid, number in zip(wnids, chosen):  # an image a class, each under its own folder
        (root / wnid).mkdir(parents=True)
        ramp = np.linspace(0, 1, 32)[:, None, None] * rng.uniform(-255, 255, 3)  # a colour ramp an image
        Image.fromarray(np.clip(rng.uniform(0, 255, 3) + ramp + np.zeros((32, 32, 3)), 0, 255).astype(np.uint8)).save(
            root / wnid / f"ILSVRC2012_val_{number + 1:08d}.JPEG")
    return wnids


def test_real_labels_are_counted_as_timms_validate_counts_them(tmp_path):
    from timm.data import RealLabelsImagenet
    from fastrsb.real_labels import read_real_labels
    real, source = read_real_labels(None)
    wnids = _imagenet_val_sample(tmp_path / "val", real)
    torch.manual_seed(0)
    model = make_model("resnet10t", 1000, 0.0).eval()
    with torch.no_grad():  # classes 0-9 favoured, in an order the image moves: hits at every rank
        model.fc.weight.mul_(20)
        model.fc.bias.zero_()[:10] += 3
    # The checkpoint's classes in another order than ImageNet's (output k: classes[k]).
    classes = list(reversed(wnids))
    weights = {k: v[list(reversed(range(1000)))] if k.startswith("fc.") else v for k, v in model.state_dict().items()}
    recipe = load_recipe("tiny", ["test_img_size=32", "crop_pct=1.0"])
    torch.save({"model": weights, "recipe": recipe, "classes": classes, "epoch": 1}, tmp_path / "ckpt.pt")
    result = json.loads(run_cli("eval", tmp_path / "ckpt.pt", "--data", tmp_path / "val", "--real-labels",
                                "--json", "--batch-size", "64").stdout)

    # timm's count over the same logits, by ImageNet's class index, in its file order.
    files = sorted(str(p) for p in (tmp_path / "val").glob("*/*.JPEG"))
    loader = val_loader(ImageList(files, list(range(len(files))), wnids), batch_size=64, img_size=32, crop_pct=1.0,
                        device="cpu")
    logits = torch.zeros(len(files), 1000)
    with torch.no_grad():
        for images, positions in loader:
            logits[positions] = model(images).float()
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 50_001)]
    position = {name: i for i, name in enumerate(names)}
    order = sorted(range(len(files)), key=lambda i: position[files[i].rsplit("/", 1)[1]])
    timm_real = RealLabelsImagenet([files[i] for i in order] + ["x"] * (50_000 - len(files)))
    timm_real.add_result(logits[order])
    expected = timm_real.get_accuracy()
    assert result["real_images"] == sum(1 for i in range(len(files)) if real[position[files[i].rsplit("/", 1)[1]]])
    assert result["real_images"] < len(files) == result["val_images"]  # the empty sets left out
    assert (result["real_top1"], result["real_top5"]) == pytest.approx((expected[1], expected[5]), abs=1e-9)
    # The plain figures beside them, as timm's validate.py counts them (timm.utils.accuracy)
    from timm.utils import accuracy
    labels = torch.tensor([wnids.index(f.rsplit("/", 2)[1]) for f in files])
    plain = [figure.item() for figure in accuracy(logits, labels, topk=(1, 5))]
    assert (result["top1"], result["top5"]) == pytest.approx(plain, abs=1e-4)
    assert 0 < plain[0] < plain[1]  # measured: 0.1 and 0.6%, a hit at each of ranks 1, 3, 4 and 5
    assert 2 < expected[1] < expected[5] < 100  # hits at rank 1 and beyond, and misses
    assert len(set(logits.argmax(1).tolist())) > 1  # the images' own predictions, not one for all
    assert result["real_labels"] == source
    def rated_image(wnid):
        return bool(real[position[next((tmp_path / "val" / wnid).iterdir()).name]])
    some_wnids = [w for w in wnids if rated_image(w)][:2] + [w for w in wnids if not rated_image(w)][:1]
    for wnid in some_wnids:  # some classes, ranked among them alone: ReaL's labels may name any class
        shutil.copytree(tmp_path / "val" / wnid, tmp_path / "some" / wnid)
    assert_user_error(run_cli("eval", tmp_path / "ckpt.pt", "--data", tmp_path / "some", "--real-labels",
                              "--partial-classes", "only", check=False), "not with --partial-classes only")
    some = json.loads(run_cli("eval", tmp_path / "ckpt.pt", "--data", tmp_path / "some", "--real-labels",
                              "--partial-classes", "all", "--json", "--batch-size", "64").stdout)
    assert (some["val_images"], some["real_images"]) == (3, 2)  # rated over the files present with labels
    labels = torch.tensor([wnids.index(p.split("/")[-2]) for p in files])  # the folder's class: plain top-1
    assert result["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).double().mean().item())


def test_real_labels_are_refused_where_they_do_not_apply(tmp_path, tiny_data):
    from fastrsb.real_labels import read_real_labels, real_targets
    from fastrsb.errors import UserError
    real, source = read_real_labels(None)
    model = make_model("resnet10t", 4, 0.0)
    recipe = load_recipe("tiny")
    classes = sorted(p.name for p in (tiny_data / "val").iterdir())
    torch.save({"model": model.state_dict(), "recipe": recipe, "classes": classes, "epoch": 1}, tmp_path / "four.pt")
    assert_user_error(run_cli("eval", tmp_path / "four.pt", "--data", tiny_data, "--real-labels", check=False),
                      "ReaL labels are ImageNet-1k's: these weights classify 4 classes")
    (tmp_path / "short.json").write_text("[[1], [2]]")
    assert_user_error(run_cli("eval", tmp_path / "four.pt", "--data", tiny_data, "--real-labels",
                              tmp_path / "short.json", check=False), "is not ImageNet-ReaL's labels")
    (tmp_path / "garbled.json").write_text("[[1], [2")
    with pytest.raises(UserError, match=r"cannot read the ReaL labels .*garbled.json: "):
        read_real_labels(str(tmp_path / "garbled.json"))
    with pytest.raises(UserError, match=r"cannot read the ReaL labels .*nowhere.json: "):
        read_real_labels(str(tmp_path / "nowhere.json"))
    for wrong in (1000, -1):  # a class index outside ImageNet's 1,000
        (tmp_path / "wrong.json").write_text(json.dumps([[0]] * 49_999 + [[wrong]]))
        with pytest.raises(UserError, match="is not ImageNet-ReaL's labels"):
            read_real_labels(str(tmp_path / "wrong.json"))
    from timm.data import ImageNetInfo
    wnids = ImageNetInfo().label_names()
    for name in ("other.JPEG", "ILSVRC2012_val_00000000.JPEG", "ILSVRC2012_val_00050001.JPEG"):  # none of the 50,000
        with pytest.raises(UserError, match=f"{name} is not one"):
            real_targets(ImageList([f"/v/n01440764/{name}"], [0], wnids), real, source)
    # Images that have no ReaL label (ReaL's empty lists): a row of -1s each, left out of the count.
    unlabelled = [k + 1 for k, row in enumerate(real) if not row][:2]
    _, targets = real_targets(ImageList([f"/v/n01440764/ILSVRC2012_val_{n:08d}.JPEG" for n in unlabelled], [0, 0],
                                        wnids), real, source)
    assert targets.sets.tolist() == [[-1], [-1]]
    # A copy whose files were converted keeps their numbers: those are what the labels go by.
    _, targets = real_targets(ImageList(["/v/n01440764/ILSVRC2012_val_00000002.png"], [0], wnids), real, source)
    assert [k for k in targets.sets[0].tolist() if k >= 0] == real[1]  # wnids in ImageNet's order: the same indices
    # So does one unpacked from the Hugging Face hub's archive under its names there (<image>_<wnid>.JPEG).
    _, targets = real_targets(ImageList(["/v/n01440764/ILSVRC2012_val_00000002_n01440764.JPEG"], [0], wnids), real,
                              source)
    assert [k for k in targets.sets[0].tolist() if k >= 0] == real[1]
    with pytest.raises(UserError, match="ILSVRC2012_val_00000002_x.JPEG is not one"):
        real_targets(ImageList(["/v/n01440764/ILSVRC2012_val_00000002_x.JPEG"], [0], wnids), real, source)
