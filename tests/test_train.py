"""A real, short training run through the command line, then its checkpoints."""
import datetime
import json
import math
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_user_error, folder_held, run_cli
import fastrsb
from fastrsb.checkpoint import load_checkpoint
from fastrsb.errors import UserError
from fastrsb.provenance import source_commit
from fastrsb.train import time_spent


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", out, "--device", "cpu", "--log-every", "2")
    return out, proc


def test_writes_metrics_and_checkpoints(run, tiny_data):
    out, proc = run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in rows if m["kind"] == "epoch"]
    assert [m["epoch"] for m in epochs] == [1, 2]
    for m in epochs:
        assert {"epoch", "step", "train_loss", "lr", "top1", "top5", "images_per_sec", "data_wait"} <= set(m)
        assert 0 <= m["top1"] <= m["top5"] <= 100 and m["images_per_sec"] > 0 and m["train_loss"] > 0
        assert 0 < m["data_wait"] < 1  # each step's wait for its batch, summed over the epoch
        assert m["val_images"] == 20  # every validation image, exactly once
        # The process's peak resident memory over the epoch (fastrsb.peak_memory), said on its line.
        assert 0.1 < m["peak_memory_gib"] < os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        assert f"validation, peak memory {m['peak_memory_gib']:.2f} GiB a process" in proc.stdout
    logs = [m for m in rows if m["kind"] == "log"]  # every --log-every 2 steps: 6 steps per epoch
    assert [m["step"] for m in logs] == [2, 4, 6, 8, 10, 12]
    assert all(m["loss"] > 0 and m["images_per_sec"] > 0 and 0 <= m["data_wait"] < 1 for m in logs)
    assert json.loads((out / "recipe.json").read_text())["name"] == "tiny"
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    assert not list(out.glob(".*.tmp"))  # atomic writes leave nothing behind
    assert not (out / ".fastrsb.lock").exists()  # the lock it held while it ran (fastrsb.folder_lock) went with it
    assert "img/s" in proc.stderr and "eta" in proc.stderr and "data " in proc.stderr  # progress was shown
    assert re.search(r"done: top1 [\d.]+ top5 [\d.]+; 2 epoch\(s\) in 0:00:\d\d \(training 0:00:\d\d at [\d,]+ img/s, "
                     r"validation 0:00:\d\d\); run folder ", proc.stdout), proc.stdout
    # train.log: what it printed, both streams (the progress lines, a run card line, the last line), under its command
    log = (out / "train.log").read_text().splitlines()
    assert log[0].startswith(f"===== fastrsb train tiny --data {tiny_data} --out {out} --device cpu --log-every 2 | ")
    said = proc.stdout.splitlines()
    assert [line for line in log if line in said] == said and log[-1] == said[-1] and said[-1].startswith("done: ")
    assert any(line.startswith("run card: ") for line in said)
    assert any(line.startswith("epoch 2/2 6/6 ") for line in log)  # a progress line (stderr)


def test_the_time_left_is_at_the_pace_after_the_first_steps_compiling(tiny_data, tmp_path, monkeypatch):
    """On a GPU an epoch's first steps compile (torch.compile: a minute or two for ResNet-50, where
    8 GPUs train an A3 epoch in less), which the next epochs do not: the time left after an epoch
    is estimated at the pace after its first progress line. Here the first step is made 5 s slower,
    as compiling makes it (a CPU run compiles nothing); the estimate had counted those 5 s again
    for every epoch left (~0:00:12 for 2 epochs of about a second each)."""
    import time
    from fastrsb.progress import clock
    from fastrsb.step import TrainStep
    single, calls = TrainStep.single, []

    def compiling_first(self, *args):
        if not calls:
            time.sleep(5)
        calls.append(1)
        return single(self, *args)

    monkeypatch.setattr(TrainStep, "single", compiling_first)
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / "run", "--device", "cpu",
                   "--log-every", "1", "--set", "epochs=3")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, *later = [r for r in rows if r["kind"] == "epoch"]
    # The steady pace is the time after the first progress line (step 1 of n here), scaled to the
    # n steps: what it leaves out, the time up to that line, holds the 5 s (whatever the machine's
    # speed: a test comparing the two times alone failed on a loaded machine).
    steps = sum(r["kind"] == "log" and r["epoch"] <= 1 for r in rows)
    assert first["train_seconds"] - first["train_seconds_steady"] * (steps - 1) / steps >= 5
    assert [r["train_seconds_steady"] for r in later] == [None, None]  # their own times are their pace
    # The line says 2 x (the steady training time + validation), where it had said 2 x (training + validation).
    (left,) = re.findall(r"^epoch 1: .*; 2 epoch\(s\) left, ~(\d+:\d\d:\d\d)\)$", proc.stdout, re.M)
    assert left == clock(2 * (first["train_seconds_steady"] + first["val_seconds"]))


def test_the_time_a_run_took_counts_every_epoch_row():
    rows = [{"kind": "log", "step": 2},
            {"kind": "epoch", "train_seconds": 100.0, "images_per_sec": 50.0, "val_seconds": 10.0},
            {"kind": "epoch", "train_seconds": 200.0, "images_per_sec": 100.0, "val_seconds": 20.0}]
    assert time_spent(rows) == "2 epoch(s) in 0:05:30 (training 0:05:00 at 83 img/s, validation 0:00:30)"
    assert time_spent(rows[:1]) == ""


def test_summary_csv_and_tensorboard(run):
    """timm's summary.csv (an epoch a row) and TensorBoard events (the test extra installs it)."""
    out, proc = run
    lines = (out / "summary.csv").read_text().splitlines()
    assert lines[0] == "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr" and len(lines) == 3
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in epochs if m["kind"] == "epoch"][-1]
    assert lines[2].split(",")[:4] == [str(last["epoch"]), str(last["train_loss"]), str(last["val_loss"]), str(last["top1"])]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("epoch/top1")] == [6, 12]
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    assert "validation 3/3" in proc.stderr  # validation shows its progress


def test_checkpoint_contents(run):
    out, _ = run
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2 and state["recipe"]["model"] == "resnet10t" and len(state["classes"]) == 4
    assert {"model", "optimizer", "scaler", "step", "metrics", "ranks", "best_top1"} <= set(state)
    assert state["step"] == 12 and state["partial"] is None and "ema" not in state
    (rank,) = state["ranks"]  # per process: loader position and random streams
    assert {"loader", "mixer", "torch_rng"} <= set(rank) and all(isinstance(part, bytes) for part in rank["loader"]["dali"])


def test_eval_reproduces_the_runs_accuracy(run, tiny_data, tmp_path):
    out, _ = run
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["kind"] == "epoch"
    result = json.loads(run_cli("eval", out / "last.pt", "--data", tiny_data, "--json", "--batch-size", "8").stdout)
    assert result["val_images"] == 20 and result["img_size"] == 40
    assert result["top1"] == pytest.approx(last["top1"]) and result["top5"] == pytest.approx(last["top5"])
    other = json.loads(run_cli("eval", out / "last.pt", "--data", tiny_data / "val", "--json", "--img-size", "32",
                               "--crop-pct", "0.875").stdout)
    assert other["img_size"] == 32 and other["crop_pct"] == 0.875 and other["val_images"] == 20
    (tmp_path / "val_subset").symlink_to(tiny_data / "val")  # a folder of classes named as the user likes
    named = json.loads(run_cli("eval", out / "last.pt", "--data", tmp_path / "val_subset", "--json", "--img-size",
                               "32", "--crop-pct", "0.875").stdout)
    assert (named["val_images"], named["top1"], named["val_loss"]) == (20, other["top1"], other["val_loss"])
    assert_user_error(run_cli("eval", out / "last.pt", "--data", tiny_data / "val" / "n00_hstripes", check=False),
                      "has no class folders")  # a folder of images: one class, not a data set
    assert "top1" in run_cli("eval", out / "best.pt", "--data", tiny_data).stdout
    # A sweep: every size with every crop, the model loaded once; each line as a single eval gives it.
    sweep = [json.loads(line) for line in run_cli("eval", out / "last.pt", "--data", tiny_data, "--json",
                                                  "--img-size", "32", "40", "32", "--crop-pct", "0.875", "0.95",
                                                  "--batch-size", "8").stdout.splitlines()]
    assert [(r["img_size"], r["crop_pct"]) for r in sweep] == [(32, 0.875), (32, 0.95), (40, 0.875), (40, 0.95)]
    assert (sweep[0]["top1"], sweep[0]["val_loss"]) == pytest.approx((other["top1"], other["val_loss"]))
    assert (sweep[3]["top1"], sweep[3]["val_loss"]) == pytest.approx((result["top1"], result["val_loss"]))
    assert len({r["val_loss"] for r in sweep}) == 4  # four different views of the images, not one four times
    text = run_cli("eval", out / "last.pt", "--data", tiny_data, "--img-size", "32", "40").stdout.splitlines()
    best = max(sweep[1], sweep[3], key=lambda r: r["top1"])
    assert len(text) == 3 and text[2] == f"best: top1 {best['top1']:.2f} at {best['img_size']} px, crop 0.95"
    # Several checkpoints: each in turn, as alone, named on its lines; a path mistyped among them
    # is said before any is evaluated.
    both = [json.loads(line) for line in run_cli("eval", out / "best.pt", out / "last.pt", "--data", tiny_data,
                                                 "--json", "--batch-size", "8").stdout.splitlines()]
    best_alone = json.loads(run_cli("eval", out / "best.pt", "--data", tiny_data, "--json", "--batch-size", "8").stdout)
    assert [r["checkpoint"] for r in both] == [str(out / "best.pt"), str(out / "last.pt")]
    assert (both[0]["top1"], both[0]["val_loss"]) == pytest.approx((best_alone["top1"], best_alone["val_loss"]))
    assert (both[1]["top1"], both[1]["val_loss"]) == pytest.approx((result["top1"], result["val_loss"]))
    text = run_cli("eval", out / "best.pt", out / "last.pt", "--data", tiny_data).stdout.splitlines()
    assert text[1].startswith(f"{out / 'last.pt'}: top1 {result['top1']:.2f}") and text[2].startswith("best: ")
    mistyped = run_cli("eval", out / "last.pt", out / "lats.pt", "--data", tiny_data, check=False)
    assert_user_error(mistyped, f"no checkpoint at {out / 'lats.pt'}")
    assert mistyped.stdout == ""  # (last.pt not evaluated first)
    # --ema of a run that kept none (tiny: model_ema = false): said, for eval as for export.
    assert_user_error(run_cli("eval", out / "last.pt", "--data", tiny_data, "--ema", check=False),
                      f"{out / 'last.pt'} holds no EMA weights (the run had model_ema = false)")


class Payload:
    def __reduce__(self):
        return (print, ("code ran from a checkpoint",))


def test_checkpoint_cannot_run_code(run, tiny_data, tmp_path):
    out, _ = run
    state = torch.load(out / "last.pt", weights_only=True)
    state["evil"] = Payload()
    torch.save(state, tmp_path / "evil.pt")
    proc = run_cli("eval", tmp_path / "evil.pt", "--data", tiny_data, check=False)
    assert_user_error(proc, "not a loadable checkpoint")
    assert "code ran" not in proc.stdout + proc.stderr


def test_checkpoint_that_does_not_fit(run, tiny_data, tmp_path):
    out, _ = run
    state = torch.load(out / "last.pt", weights_only=True)
    state["model"]["fc.weight"] = torch.zeros(9, state["model"]["fc.weight"].shape[1])
    torch.save(state, tmp_path / "wrong.pt")
    assert_user_error(run_cli("eval", tmp_path / "wrong.pt", "--data", tiny_data, check=False),
                      "does not fit the model", "fc.weight")
    # a key the model lacks, and one it needs gone: each named in the same one line
    state = torch.load(out / "last.pt", weights_only=True)
    state["model"]["head.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "more.pt")
    assert_user_error(run_cli("eval", tmp_path / "more.pt", "--data", tiny_data, check=False),
                      "more.pt does not fit the model: 1 unexpected key(s), e.g. head.extra")
    del state["model"]["head.extra"], state["model"]["fc.bias"]
    torch.save(state, tmp_path / "fewer.pt")
    assert_user_error(run_cli("eval", tmp_path / "fewer.pt", "--data", tiny_data, check=False),
                      "fewer.pt does not fit the model: 1 missing key(s), e.g. fc.bias")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04not a checkpoint")
    assert_user_error(run_cli("eval", tmp_path / "junk.pt", "--data", tiny_data, check=False), "junk.pt")
    torch.save({"weights": 1}, tmp_path / "plain.pt")
    assert_user_error(run_cli("eval", tmp_path / "plain.pt", "--data", tiny_data, check=False),
                      "not a fastrsb checkpoint (no 'model' and 'recipe' entries; its entries: weights)")
    torch.save({"model": state["model"], "epoch": 3}, tmp_path / "other.pth")  # torchvision's references' layout
    assert_user_error(run_cli("eval", tmp_path / "other.pth", "--data", tiny_data, check=False),
                      "not a fastrsb checkpoint (no 'recipe' entry; its entries: model, epoch)")  # said 'model' lacked
    assert "weights alone" not in run_cli("eval", tmp_path / "plain.pt", "--data", tiny_data, check=False).stderr
    torch.save(state["model"], tmp_path / "alone.pth")  # a state dict: what eval cannot read, and what can
    assert_user_error(run_cli("eval", tmp_path / "alone.pth", "--data", tiny_data, check=False),
                      "weights alone name no model or classes", "--set initial_checkpoint")
    assert_user_error(run_cli("eval", out, "--data", tiny_data, check=False), "is a folder", "last.pt")
    (tmp_path / "no_val").mkdir()  # a data folder without val/ is not a tree of one class named "train"
    (tmp_path / "no_val" / "train").symlink_to(tiny_data / "train")
    assert_user_error(run_cli("eval", out / "last.pt", "--data", tmp_path / "no_val", check=False),
                      "holds train/ but no val/", str(tmp_path / "no_val" / "train"))


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_is_a_timm_model_folder(run, tiny_data, tmp_path):
    """`fastrsb export`: timm alone rebuilds the trained network from the folder (the weights, the
    classes by name, the run's eval transform), and timm's own eval transform over the val images
    reaches the top-1 `fastrsb eval` reports."""
    import timm
    from PIL import Image
    from fastrsb.model import make_model
    out, _ = run
    state = load_checkpoint(out / "last.pt")
    folder = tmp_path / "exported"
    proc = run_cli("export", out / "last.pt", folder)
    assert "resnet10t, 4 classes, tested at 40 px, crop 0.95" in proc.stdout and "local-dir:" in proc.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    umask = os.umask(0)
    os.umask(umask)  # readable as any file the user writes (safetensors alone makes its file 0600)
    assert [(folder / name).stat().st_mode & 0o777 for name in ("config.json", "model.safetensors")] == [0o666 & ~umask] * 2

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert _weights_equal(model.state_dict(), state["model"])
    assert model.pretrained_cfg["label_names"] == state["classes"]
    config = timm.data.resolve_data_config(model=model)
    assert tuple(config["input_size"]) == (3, 40, 40) and config["crop_pct"] == 0.95 and config["interpolation"] == "bicubic"
    saved = json.loads((folder / "config.json").read_text())["fastrsb"]
    assert saved["weights"] == "model" and saved["epoch"] == 2 and saved["recipe"] == state["recipe"]
    assert saved["top1"] == state["metrics"]["top1"]
    # The fastrsb that trained the weights: this one, from this checkout (None from a wheel).
    assert (saved["version"], saved["commit"]) == (fastrsb.__version__, source_commit()) == \
        (state["version"], state["commit"])
    # Any timm loads the weights file into a model it builds itself.
    plain = timm.create_model("resnet10t", num_classes=4, checkpoint_path=str(folder / "model.safetensors"))
    assert _weights_equal(plain.state_dict(), state["model"])

    transform = timm.data.create_transform(**config)
    images = sorted((tiny_data / "val").glob("*/*"))
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in images])
    labels = torch.tensor([state["classes"].index(path.parent.name) for path in images])
    ours = make_model("resnet10t", 4).eval()
    ours.load_state_dict(state["model"])
    with torch.no_grad():
        logits = model(batch)
        assert torch.allclose(logits, ours(batch), atol=1e-5)  # the same network, in timm's memory format
    correct = int((logits.argmax(1) == labels).sum())
    reported = json.loads(run_cli("eval", out / "last.pt", "--data", tiny_data, "--json").stdout)["top1"]
    # DALI's eval resize and PIL's agree to 0.0007 on average (test_pipelines): one image may tip.
    assert abs(correct - reported * len(images) / 100) <= 1


def test_export_onnx_gives_the_classes_predict_gives(run, tiny_data, tmp_path, monkeypatch):
    """export --onnx: model.onnx beside the timm folder, one file, batch and size dynamic; run by
    ONNX Runtime on the validation pipeline's batches, it gives each image the probabilities
    `fastrsb predict` gives, its classes in config.json's order; with --ema, the EMA's network, as
    predict --ema. An export whose check fails, or without the exporter's packages, is refused and
    writes nothing."""
    import onnxruntime
    import fastrsb.onnx_export
    from fastrsb.pipelines import val_loader
    out, _ = run
    folder = tmp_path / "exported"
    result = json.loads(run_cli("export", out / "last.pt", folder, "--onnx", "--json").stdout)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.onnx", "model.safetensors"]
    assert result["onnx_bytes"] == (folder / "model.onnx").stat().st_size and result["onnx_checked"] < 1e-5
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("images", ["batch", 3, "height", "width"])]
    classes = json.loads((folder / "config.json").read_text())["label_names"]
    loader = val_loader(tiny_data / "val", batch_size=8, img_size=40, crop_pct=0.95, device="cpu")
    logits = torch.cat([torch.from_numpy(session.run(["logits"], {"images": images.contiguous().numpy()})[0])
                        for images, _ in loader])
    predicted = [json.loads(line) for line in run_cli("predict", out / "last.pt", tiny_data / "val", "--json",
                                                      "--top", "4").stdout.splitlines()]
    assert [r["file"] for r in predicted] == loader.images.files
    for row, probabilities in zip(predicted, logits.softmax(dim=1)):
        by_class = {classes[k]: p for k, p in enumerate(probabilities.tolist())}
        assert [by_class[t["class"]] for t in row["top"]] == pytest.approx([t["probability"] for t in row["top"]],
                                                                           abs=1e-5)
    # --ema --onnx: the EMA's network (its weights made to differ from the model's), as predict --ema sees it.
    state = torch.load(out / "last.pt", weights_only=True)
    state["ema"] = {k: v * 0.9 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "with_ema.pt")
    run_cli("export", tmp_path / "with_ema.pt", tmp_path / "ema", "--ema", "--onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "ema" / "model.onnx"), providers=["CPUExecutionProvider"])
    ema_logits = torch.cat([torch.from_numpy(session.run(["logits"], {"images": images.contiguous().numpy()})[0])
                            for images, _ in loader])
    assert (ema_logits - logits).abs().max() > 1e-2  # another network: the test tells them apart
    predicted = [json.loads(line) for line in run_cli("predict", tmp_path / "with_ema.pt", tiny_data / "val", "--ema",
                                                      "--json", "--top", "4").stdout.splitlines()]
    for row, probabilities in zip(predicted, ema_logits.softmax(dim=1)):
        by_class = {classes[k]: p for k, p in enumerate(probabilities.tolist())}
        assert [by_class[t["class"]] for t in row["top"]] == pytest.approx([t["probability"] for t in row["top"]],
                                                                           abs=1e-5)
    monkeypatch.setattr(fastrsb.onnx_export, "_TOLERANCE", 0.0)  # no runtime meets it: the check must refuse
    assert_user_error(run_cli("export", out / "last.pt", tmp_path / "strict", "--onnx", check=False),
                      "the ONNX model's logits differ from the network's by", "not exported")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as where the package is not installed
    assert_user_error(run_cli("export", out / "last.pt", tmp_path / "bare", "--onnx", check=False),
                      "--onnx needs the onnxscript package(s)", "pip install 'fastrsb[onnx]'")
    assert not (tmp_path / "strict").exists() and not (tmp_path / "bare").exists()


def test_export_replaces_nothing_unasked_and_takes_the_ema(run, tmp_path, monkeypatch):
    out, _ = run
    folder = tmp_path / "kept"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert_user_error(run_cli("export", out / "last.pt", folder, check=False), "already holds files", "--force")
    assert_user_error(run_cli("export", out / "last.pt", out / "last.pt", check=False), "is a file")
    # --force replaces a model folder's files, never a run (its checkpoints) or a folder of folders.
    run_files = sorted(p.name for p in out.iterdir())
    assert_user_error(run_cli("export", out / "last.pt", out, "--force", check=False),
                      f"{out} holds a run's checkpoint (best.pt), which --force would remove with it")
    assert_user_error(run_cli("export", out / "last.pt", out.parent, "--force", check=False), "holds a folder")
    assert sorted(p.name for p in out.iterdir()) == run_files
    assert_user_error(run_cli("export", out / "last.pt", tmp_path / "e", "--ema", check=False), "no EMA weights")
    assert_user_error(run_cli("export", tmp_path / "none.pt", tmp_path / "e", check=False), "no checkpoint")

    import timm.models._hub
    def broken(model, config_path, **kwargs):  # an export that fails halfway: the weights written
        Path(config_path).write_text("{")
        raise OSError("disk full")
    monkeypatch.setattr(timm.models._hub, "save_config_for_hf", broken)
    assert_user_error(run_cli("export", out / "last.pt", folder, "--force", check=False), "could not write", "disk full")
    monkeypatch.undo()
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]  # as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # and nothing half-written beside it

    state = torch.load(out / "last.pt", weights_only=True)
    state["ema"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "with_ema.pt")
    result = json.loads(run_cli("export", tmp_path / "with_ema.pt", folder, "--ema", "--force", "--json").stdout)
    assert result["weights"] == "ema" and sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    from safetensors.torch import load_file
    assert _weights_equal(load_file(folder / "model.safetensors"), state["ema"])
    assert "label_descriptions" not in json.loads((folder / "config.json").read_text())  # not ImageNet's classes


def test_export_says_the_scores_of_the_weights_it_takes(run, tmp_path):
    """What an export says of its weights: the validated top-1 of the weights taken (the EMA's
    with --ema, the other beside it), none for an epoch saved before its validation; ImageNet's
    words for classes that are its wnids in config.json; a folder holding a run's records alone
    (metrics.jsonl, no checkpoint) is not replaced by --force."""
    from fastrsb.class_order import imagenet_classes
    out, _ = run
    state = torch.load(out / "last.pt", weights_only=True)
    state["ema"], state["metrics"] = dict(state["model"]), {**state["metrics"], "top1": 40.0, "ema_top1": 45.0}
    state["classes"] = imagenet_classes()[:4]
    torch.save(state, tmp_path / "scored.pt")

    def exported(*args):
        result = json.loads(run_cli("export", tmp_path / "scored.pt", tmp_path / "out", "--force", "--json",
                                    *args).stdout)
        return result, json.loads((tmp_path / "out" / "config.json").read_text())
    (result, config), (ema_result, ema_config) = exported(), exported("--ema")
    assert (result["top1"], result["ema_top1"], config["fastrsb"]["top1"]) == (40.0, 45.0, 40.0)
    assert (ema_result["top1"], ema_result["ema_top1"], ema_config["fastrsb"]["top1"]) == (45.0, None, 45.0)
    assert config["label_descriptions"]["n01440764"] == "tench, Tinca tinca"
    state["validated"] = False  # saved at the epoch's end, before its validation ran
    torch.save(state, tmp_path / "scored.pt")
    assert exported()[0]["top1"] is None
    records = tmp_path / "records"
    records.mkdir()
    (records / "metrics.jsonl").write_text("")
    assert_user_error(run_cli("export", tmp_path / "scored.pt", records, "--force", check=False),
                      "holds a run's record (metrics.jsonl), which --force would remove with it")


def test_predict_that_runs_out_of_gpu_memory_says_what_fits(run, tiny_data, monkeypatch):
    """As eval: a GPU's out-of-memory error in predict's forward becomes the batch size to try."""
    out, _ = run
    import fastrsb.predict

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(fastrsb.predict, "_top_outputs", out_of_memory)
    assert_user_error(run_cli("predict", out / "last.pt", tiny_data / "val", "--batch-size", "16", check=False),
                      "a batch of 16 images at 40 px takes more memory than the GPU has: --batch-size 8 or fewer")


def test_eval_that_runs_out_of_gpu_memory_says_what_fits(run, tiny_data, monkeypatch):
    """A GPU's out-of-memory error (raised by the forward, as torch raises it; no GPU here) becomes
    the batch size to try."""
    out, _ = run
    import fastrsb.checkpoint_eval

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(fastrsb.checkpoint_eval, "evaluate", out_of_memory)
    # (Not at 2000 px: the loader opened there before the patched forward took 22 GB of this machine's 24.)
    assert_user_error(run_cli("eval", out / "last.pt", "--data", tiny_data, "--img-size", "320", check=False),
                      "a batch of 128 images at 320 px takes more memory than the GPU has: --batch-size 64 or fewer")


def test_eval_refuses_a_batch_below_its_memory_floor_before_it_allocates(run, tiny_data):
    """`fastrsb eval --img-size 2000` on the CPU: the kernel's OOM killer ended it without a word
    (and a pytest run with it). The floor, the loader's two batches and the model's largest layer
    for one image (from a forward pass on the meta device), is checked against the memory free."""
    from fastrsb.memory_floor import GiB, largest_activation, refuse_a_batch_that_cannot_fit
    from fastrsb.model import make_model
    out, _ = run
    model = make_model("resnet10t", 4)
    # The stem's normalization at 2000 px: 64 channels in and 64 out at 1000 x 1000, float32.
    assert largest_activation(model, [2000, 224], 4) == {2000: (64 + 64) * 1000 * 1000 * 4, 224: 128 * 112 * 112 * 4}
    assert largest_activation(model, [2000], 2) == {2000: (64 + 64) * 1000 * 1000 * 2}
    floor = (64 + 64) * 10 ** 6 * 4 + 2 * 3 * 2000 * 2000 * 4  # an image: 608 MB, 96 MB of them pixels
    with pytest.raises(UserError, match=re.escape(
            f"a batch of 128 images at 2000 px needs at least {128 * floor / GiB:,.1f} GiB (the loader's batches and "
            f"the model's largest layer) and this machine has 20.0 GiB free: --batch-size {20 * GiB // floor // 2} "
            f"or fewer (the floor allows {20 * GiB // floor} with nothing else held)")):
        refuse_a_batch_that_cannot_fit(model, [224, 2000], 128, "cpu", 4, 4, free=20 * GiB)
    refuse_a_batch_that_cannot_fit(model, [224, 2000], 32, "cpu", 4, 4, free=20 * GiB)  # 18.1 GiB: passed
    with pytest.raises(UserError, match="one image alone needs 0.6 GiB"):
        refuse_a_batch_that_cannot_fit(model, [2000], 1, "cpu", 4, 4, free=GiB // 4)
    # Through the command line, against this machine's memory: refused at once, nothing allocated.
    assert_user_error(run_cli("eval", out / "last.pt", "--data", tiny_data, "--img-size", "224", "20000",
                              check=False), "images at 20000 px needs at least", "GiB free")


def test_eval_of_a_model_folder_equals_the_checkpoints(run, tiny_data, tmp_path):
    """`fastrsb eval FOLDER`: an exported folder gives the checkpoint's figures to the last digit,
    at the size and crop its config says; so does a folder as timm's hub models come (no class
    names, pytorch_model.bin), its classes taken as the data folder's in sorted order."""
    out, _ = run
    folder = tmp_path / "exported"
    run_cli("export", out / "last.pt", folder)
    checkpoint = json.loads(run_cli("eval", out / "last.pt", "--data", tiny_data, "--json").stdout)
    exported = json.loads(run_cli("eval", folder, "--data", tiny_data, "--json").stdout)
    keys = ("top1", "top5", "val_loss", "val_images", "img_size", "crop_pct", "epoch")
    assert [exported[k] for k in keys] == [checkpoint[k] for k in keys] and "notes" not in exported

    hub = tmp_path / "hub"
    hub.mkdir()
    config = json.loads((folder / "config.json").read_text())
    del config["label_names"], config["fastrsb"]
    config["pretrained_cfg"].update(test_input_size=[3, 32, 32], test_crop_pct=0.875, interpolation="bilinear")
    (hub / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file
    torch.save(load_file(folder / "model.safetensors"), hub / "pytorch_model.bin")
    at_32 = json.loads(run_cli("eval", out / "last.pt", "--data", tiny_data, "--json", "--img-size", "32",
                               "--crop-pct", "0.875").stdout)
    proc = run_cli("eval", hub, "--data", tiny_data)
    assert proc.stdout.splitlines()[:2] == [
        "note: the folder's config resizes bilinear; fastrsb's validation resizes bicubic",
        "note: config.json names no classes: they are taken as the data folder's class folders, in the order timm's "
        "ImageFolder indexes them (natural order: 'c2' before 'c10'; ImageNet's wnids sorted)"]
    assert proc.stdout.splitlines()[2] == (f"top1 {at_32['top1']:.2f} top5 {at_32['top5']:.2f} over 20 images "
                                           "at 32 px, crop 0.875")  # timm's test size and crop for the weights
    for source, named in ((hub, hub / "pytorch_model.bin"), (folder, folder / "model.safetensors")):
        assert f"--initial-checkpoint {named} " in run_cli(  # the file the folder holds, for timm's train.py
            "recipe", "tiny", "--timm", "--set", f"initial_checkpoint={source}").stdout


def test_eval_refuses_a_model_folder_it_cannot_evaluate_as_its_config_says(run, tiny_data, tmp_path):
    out, _ = run
    folder = tmp_path / "exported"
    run_cli("export", out / "last.pt", folder)
    config = json.loads((folder / "config.json").read_text())

    def refused(*words, edit=None, says=()):
        (folder / "config.json").write_text(json.dumps(edit(json.loads(json.dumps(config))) if edit else config))
        assert_user_error(run_cli("eval", folder, "--data", tiny_data, *words, check=False), *says)

    refused(edit=lambda c: {**c, "pretrained_cfg": {**c["pretrained_cfg"], "mean": [0.5, 0.5, 0.5]}},
            says=("its eval transform is not fastrsb's", "mean (0.5, 0.5, 0.5)"))
    refused(edit=lambda c: {**c, "pretrained_cfg": {**c["pretrained_cfg"], "crop_mode": "squash"}},
            says=("crop mode 'squash'",))
    refused(edit=lambda c: {**c, "label_names": c["label_names"][:-1] + ["n99_other"]}, says=("classes differ",))
    refused(edit=lambda c: {**c, "architecture": "resnet_nonexistent"}, says=("resnet_nonexistent",))
    refused(edit=lambda c: {**c, "num_classes": 5, "label_names": c["label_names"] + ["x"]},
            says=("does not fit the model", "fc.weight"))
    refused("--ema", says=("one set of weights",))
    (folder / "config.json").write_text("{")
    assert_user_error(run_cli("eval", folder, "--data", tiny_data, check=False), "cannot read", "config.json")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    assert_user_error(run_cli("eval", folder, "--data", tiny_data, check=False), "cannot read the weights")
    (folder / "model.safetensors").unlink()
    assert_user_error(run_cli("eval", folder, "--data", tiny_data, check=False), "holds no weights")


def _timm_train_checkpoint(folder: Path, weights: dict, args, ema_weights: dict | None, metric: float) -> Path:
    """What timm's train.py writes at the end of its first epoch: its own CheckpointSaver's file
    (the model, the optimizer, the arguments as an argparse.Namespace, the EMA, the metric)."""
    import timm
    from timm.utils import CheckpointSaver, ModelEmaV3
    model = timm.create_model(args.model, num_classes=args.num_classes)
    model.load_state_dict(weights)
    ema = None
    if ema_weights is not None:
        ema = ModelEmaV3(model)
        ema.module.load_state_dict(ema_weights)
    folder.mkdir()
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args, model_ema=ema,
                            checkpoint_dir=str(folder), recovery_dir=str(folder))
    saver.save_checkpoint(0, metric=metric)
    return folder / "model_best.pth.tar"


def test_eval_of_a_timm_train_checkpoint_measures_what_timm_recorded(run, tiny_data, tmp_path):
    """A checkpoint of timm's train.py (it holds an argparse.Namespace, which torch's weights_only
    load refused: fastrsb took none) is evaluated as train.py's validation saw it: at its
    arguments' size and crop (32 px, 0.875 here; the recipe tests at 40, 0.95), reaching the top-1
    timm's own eval transform gives, and to the last digit what fastrsb gives the same weights.
    --ema takes its EMA's weights, for which train.py records its figure where it keeps an EMA.
    A run starts from its EMA's weights where it kept an EMA, as timm's --initial-checkpoint does (it
    took the model's); it is not resumed."""
    import argparse
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    out, _ = run
    state = load_checkpoint(out / "last.pt")
    args = argparse.Namespace(model="resnet10t", num_classes=4, img_size=32, input_size=None, crop_pct=0.875,
                              mean=None, std=None, interpolation="", gp=None, model_kwargs={}, eval_metric="top1",
                              model_ema_force_cpu=False)
    model = timm.create_model("resnet10t", num_classes=4).eval()
    model.load_state_dict(state["model"])
    transform = create_transform(**resolve_data_config(vars(args), model=model))  # train.py's validation
    images = sorted((tiny_data / "val").glob("*/*"))
    with torch.no_grad():
        logits = model(torch.stack([transform(Image.open(path).convert("RGB")) for path in images]))
    labels = torch.tensor([state["classes"].index(path.parent.name) for path in images])
    timm_top1 = 100 * float((logits.argmax(1) == labels).float().mean())
    same = json.loads(run_cli("eval", out / "last.pt", "--data", tiny_data, "--json", "--img-size", "32",
                              "--crop-pct", "0.875").stdout)  # the trained weights, by fastrsb
    keys = ("top1", "top5", "val_loss", "val_images", "img_size", "crop_pct")
    note = "note: timm's train.py validated this checkpoint at 32 px, crop 0.875 and recorded top1 {:.2f} for {}"

    plain = _timm_train_checkpoint(tmp_path / "plain", state["model"], args, None, timm_top1)
    proc = run_cli("eval", plain, "--data", tiny_data)
    assert proc.stdout.splitlines()[0] == (note.format(timm_top1, "its weights") + " (the size and crop tested "
                                           "here unless --img-size or --crop-pct say others)")
    result = json.loads(run_cli("eval", plain, "--data", tiny_data, "--json").stdout)
    assert [result[k] for k in keys] == [same[k] for k in keys] and result["epoch"] == 1
    assert abs(result["top1"] - timm_top1) * len(images) / 100 <= 1  # DALI's resize and PIL's: one image may tip
    assert_user_error(run_cli("eval", plain, "--data", tiny_data, "--ema", check=False), "holds no EMA weights")
    # The network as train.py built it: its --gp, or the same pooling by --model-kwargs (at 64 px,
    # where the last feature map is 2 x 2: max and mean pool apart).
    pooled = {"avg": json.loads(run_cli("eval", plain, "--data", tiny_data, "--json", "--img-size", "64").stdout)}
    for name, built in (("gp", {"gp": "max"}), ("kwargs", {"model_kwargs": {"global_pool": "max"}})):
        saved = _timm_train_checkpoint(tmp_path / name, state["model"],
                                       argparse.Namespace(**{**vars(args), "img_size": 64, **built}), None, 0.0)
        pooled[name] = json.loads(run_cli("eval", saved, "--data", tiny_data, "--json").stdout)
    assert pooled["gp"]["img_size"] == 64 and pooled["gp"]["val_loss"] == pooled["kwargs"]["val_loss"]
    assert pooled["gp"]["val_loss"] != pooled["avg"]["val_loss"]
    # An EMA kept on the CPU is not what train.py validated, and its metric is the one it was told.
    cpu_ema = argparse.Namespace(**{**vars(args), "model_ema_force_cpu": True, "eval_metric": "top5"})
    saved = _timm_train_checkpoint(tmp_path / "cpu-ema", state["model"], cpu_ema, state["model"], 87.5)
    assert run_cli("eval", saved, "--data", tiny_data).stdout.startswith(
        "note: timm's train.py validated this checkpoint at 32 px, crop 0.875 and recorded top5 87.50 for its weights "
        "(the size")

    fresh = timm.create_model("resnet10t", num_classes=4).state_dict()  # the model's; the trained are its EMA's
    checkpoint = _timm_train_checkpoint(tmp_path / "timm", fresh, args, state["model"], timm_top1)
    assert run_cli("eval", checkpoint, "--data", tiny_data).stdout.startswith(
        note.format(timm_top1, "its EMA weights (--ema)"))
    ema = json.loads(run_cli("eval", checkpoint, "--data", tiny_data, "--json", "--ema").stdout)
    assert ema["ema"] and [ema[k] for k in keys] == [same[k] for k in keys]
    model_weights = json.loads(run_cli("eval", checkpoint, "--data", tiny_data, "--json").stdout)
    assert model_weights["val_loss"] != ema["val_loss"]

    names = {name for name, _ in model.named_parameters()}
    for source, taken in ((checkpoint, state["model"]), (plain, state["model"])):
        started = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / f"ft-{source.parent.name}", "--device",
                          "cpu", "--set", f"initial_checkpoint={source}", *ZERO_LR, "--stop-after-steps", "1")
        ema_said = ", its EMA's weights, as timm's --initial-checkpoint takes them" if source == checkpoint else ""
        assert (f"weights: from {source} (timm's train.py: resnet10t, 1 epoch(s) trained){ema_said}, its classifier "
                "included") in started.stdout
        by_timm = timm.create_model("resnet10t", num_classes=4, checkpoint_path=str(source)).state_dict()
        started_from = _parameters(load_checkpoint(tmp_path / f"ft-{source.parent.name}" / "last.pt")["model"], names)
        assert _weights_equal(started_from, _parameters(by_timm, names))
        assert _weights_equal(started_from, _parameters(taken, names))
    assert not _weights_equal(_parameters(fresh, names), _parameters(state["model"], names))
    assert_user_error(run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / "again", "--device", "cpu",
                              "--resume", checkpoint, check=False),
                      "is a checkpoint of timm's train.py (resnet10t, 1 epoch(s) trained), not fastrsb's",
                      f"--set initial_checkpoint={checkpoint}")
    assert_user_error(run_cli("export", checkpoint, tmp_path / "exported", check=False), "timm's train.py")


def test_eval_of_a_folder_holding_some_of_the_weights_classes(run, tiny_data, tmp_path):
    """A folder holding some of the weights' classes (ImageNet-A's and -R's 200 of ImageNet's 1,000)
    is refused without --partial-classes, the two ways giving other figures (it was refused as other
    classes); "only" ranks each image among the folder's classes alone (timm's --valid-labels): the
    same figures for the run's checkpoint (its classes by name) and for timm weights naming none,
    whose 1,000 outputs are then read as ImageNet's; "all" ranks among every output."""
    import shutil
    from fastrsb.class_order import imagenet_classes
    out, _ = run
    state = load_checkpoint(out / "last.pt")
    imagenet = imagenet_classes()
    state["classes"] = [*imagenet[:3], imagenet[500]]  # the run's 4 classes, under ImageNet's names
    torch.save(state, tmp_path / "named.pt")
    for old, new in zip(sorted((tiny_data / "val").iterdir())[:3], imagenet[:3]):
        shutil.copytree(old, tmp_path / "some" / new)
    size = ["--data", tmp_path / "some", "--img-size", "40", "--crop-pct", "0.95", "--json"]
    assert_user_error(run_cli("eval", tmp_path / "named.pt", *size, check=False), "holds 3 of the weights' 4 classes",
                      "--partial-classes only", "--partial-classes all")
    only, every = (json.loads(run_cli("eval", tmp_path / "named.pt", *size, "--partial-classes", way).stdout)
                   for way in ("only", "all"))
    assert only["val_images"] == every["val_images"] == 15 and only["val_loss"] < every["val_loss"]
    assert only["notes"][-1].endswith("each image ranked among those 3 alone")
    rows = torch.tensor([0, 1, 2, 500])  # timm's weights: ImageNet's 1,000 outputs, these 4 trained
    fc_weight, fc_bias = state["model"]["fc.weight"], state["model"]["fc.bias"]
    wide = {**state["model"], "fc.weight": torch.zeros(1000, fc_weight.shape[1]).index_copy(0, rows, fc_weight),
            "fc.bias": torch.zeros(1000).index_copy(0, rows, fc_bias)}
    torch.save({"arch": "resnet10t", "state_dict": wide}, tmp_path / "imagenet.pth.tar")
    timm_only = json.loads(run_cli("eval", tmp_path / "imagenet.pth.tar", *size, "--partial-classes", "only").stdout)
    assert (timm_only["top1"], timm_only["top5"]) == (only["top1"], only["top5"])  # (a 1,000-row matmul rounds
    assert timm_only["val_loss"] == pytest.approx(only["val_loss"], rel=1e-5)     # otherwise than a 4-row one)
    assert any("outputs are read as ImageNet-1k's classes" in note for note in timm_only["notes"])
    assert_user_error(run_cli("eval", tmp_path / "imagenet.pth.tar", *size, check=False),
                      "holds 3 of the weights' 1000 classes")


def test_the_lowest_classes_are_five_the_first_of_equals_first():
    """eval's line of the lowest top-1: five classes, equals in the order of their outputs, each
    with the class its images are most often taken for; a class without images has no row."""
    from fastrsb.per_class import class_rows, lowest
    # evaluate's counts by output: images, top-1 hits, top-5 hits, the output most often taken for, how often
    counts = [[4, 4, 4, -1, 0], [4, 1, 2, 0, 3], [4, 1, 4, 4, 2], [0, 0, 0, -1, 0], [4, 2, 4, 1, 1],
              [4, 3, 4, 4, 1], [4, 0, 1, 1, 4]]
    rows = class_rows(counts, [f"c{k}" for k in range(7)], {"c1": "one, uno"})
    assert [row["class"] for row in rows] == ["c0", "c1", "c2", "c4", "c5", "c6"]
    assert lowest(rows) == ("c6 0.00 of 4 (taken for c1 (one) 100%); c1 (one) 25.00 of 4 (taken for c0 75%); "
                            "c2 25.00 of 4 (taken for c4 50%); c4 50.00 of 4 (taken for c1 (one) 25%); "
                            "c5 75.00 of 4 (taken for c4 25%)")


def test_eval_per_class_figures_add_up_and_are_each_class_evaluated_alone(run, tiny_data, tmp_path, monkeypatch):
    """--per-class CSV: each class's images, top-1 and top-5 and the class it is most often taken
    for (a row per class, size and crop), the classes of the lowest top-1 named on the line. The rows add up to the totals, and each class's
    figures are what its folder evaluated alone measures (ranked among every output, as in the
    whole folder: --partial-classes all); ImageNet's words beside its wnids; a path the CSV cannot
    go to is refused before anything is evaluated."""
    import csv
    import shutil
    from fastrsb.class_order import imagenet_classes
    out, _ = run
    table = tmp_path / "classes.csv"
    result = json.loads(run_cli("eval", out / "last.pt", "--data", tiny_data, "--json", "--batch-size", "8",
                                "--per-class", table).stdout)
    rows, classes = result["per_class"], sorted(p.name for p in (tiny_data / "val").iterdir())
    assert [(r["index"], r["class"], r["images"]) for r in rows] == [(k, name, 5) for k, name in enumerate(classes)]
    for figure in ("top1", "top5"):
        assert sum(r[figure] * r["images"] for r in rows) / 20 == pytest.approx(result[figure])
    assert result["mean_class_top1"] == pytest.approx(sum(r["top1"] for r in rows) / 4)
    with open(table, newline="") as f:
        written = list(csv.DictReader(f))
    assert [(w["checkpoint"], w["img_size"], w["class"], int(w["images"]), float(w["top1"]), float(w["top5"]),
             w["taken_for"] or None, float(w["taken_for_share"])) for w in written] == \
        [(str(out / "last.pt"), "40", r["class"], 5, r["top1"], r["top5"], r["taken_for"], r["taken_for_share"])
         for r in rows]
    for r in rows:
        shutil.copytree(tiny_data / "val" / r["class"], tmp_path / r["class"] / r["class"])
        alone = json.loads(run_cli("eval", out / "last.pt", "--data", tmp_path / r["class"], "--json", "--batch-size",
                                   "8", "--partial-classes", "all", "--per-class", tmp_path / "alone.csv").stdout)
        assert [(a["class"], a["top1"], a["top5"], a["taken_for"], a["taken_for_share"]) for a in alone["per_class"]] \
            == [(r["class"], r["top1"], r["top5"], r["taken_for"], r["taken_for_share"])]
        assert (alone["top1"], alone["top5"]) == (r["top1"], r["top5"])
    # Classes of other sizes (2, 3, 4 and 5 images): the classes' mean top-1 weighs each class alike,
    # where the top-1 weighs each image (on classes of one size the two are one figure).
    for k, name in enumerate(classes):
        for jpeg in sorted((tiny_data / "val" / name).iterdir())[:k + 2]:
            (tmp_path / "unbalanced" / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(jpeg, tmp_path / "unbalanced" / name)
    uneven = json.loads(run_cli("eval", out / "last.pt", "--data", tmp_path / "unbalanced", "--json", "--per-class",
                                tmp_path / "uneven.csv").stdout)
    assert [r["images"] for r in uneven["per_class"]] == [2, 3, 4, 5]
    assert uneven["mean_class_top1"] == pytest.approx(sum(r["top1"] for r in uneven["per_class"]) / 4)
    assert uneven["mean_class_top1"] != pytest.approx(uneven["top1"])
    # Classes that are ImageNet's wnids: their words beside them, on the line and in the rows.
    state = load_checkpoint(out / "last.pt")
    state["classes"] = imagenet_classes()[:4]  # n01440764 (tench), n01443537 (goldfish), ...
    torch.save(state, tmp_path / "named.pt")
    for old, new in zip(classes, state["classes"]):
        shutil.copytree(tiny_data / "val" / old, tmp_path / "wnids" / new)
    text = run_cli("eval", tmp_path / "named.pt", "--data", tmp_path / "wnids", "--batch-size", "8", "--per-class",
                   table).stdout.splitlines()
    with open(table, newline="") as f:
        written = list(csv.DictReader(f))
    assert written[0]["class"] == "n01440764" and written[0]["words"] == "tench, Tinca tinca"
    worst = min(range(4), key=lambda k: (rows[k]["top1"], k))
    lowest = f"{state['classes'][worst]} ({written[worst]['words'].split(',')[0]}) {rows[worst]['top1']:.2f} of 5"
    if rows[worst]["taken_for"]:  # the class it is taken for most, by its wnid and words too
        other = state["classes"][classes.index(rows[worst]["taken_for"])]
        assert written[worst]["taken_for"] == other
        lowest += f" (taken for {other} ({written[worst]['taken_for_words'].split(',')[0]}) " \
                  f"{rows[worst]['taken_for_share']:.0f}%)"
    assert text[1].startswith(f"  the classes' mean top-1 {sum(r['top1'] for r in rows) / 4:.2f} (each class alike); "
                              f"lowest top-1: {lowest}") and text[-1] == f"each class's figures: {table}"
    # Past CONFUSION_LIMIT outputs the (label, top-1) pairs are not counted: no class is named as taken for.
    import fastrsb.train
    monkeypatch.setattr(fastrsb.train, "CONFUSION_LIMIT", 3)
    capped = json.loads(run_cli("eval", out / "last.pt", "--data", tiny_data, "--json", "--batch-size", "8",
                                "--per-class", table).stdout)["per_class"]
    assert [(r["top1"], r["taken_for"], r["taken_for_share"]) for r in capped] == [(r["top1"], None, 0.0) for r in rows]
    for where, why in ((tmp_path / "no" / "such.csv", f"its folder {tmp_path / 'no'} does not exist"),
                       (tmp_path, "is a folder")):
        assert_user_error(run_cli("eval", out / "last.pt", "--data", tiny_data, "--per-class", where, check=False),
                          why)


def test_predict_names_each_images_classes_as_eval_ranks_them(run, tiny_data, tmp_path):
    """fastrsb predict: each image's top classes, by the pipeline and weights eval tests with. Every
    image below a folder once, in the walk's order; its top class is its folder's exactly as often,
    class by class, as eval counts top-1 hits; its probabilities are the softmax's, in falling
    order, summing to 1 over all the classes; an image given alone gets what it got among the
    others; an exported model folder gives the same classes, and its config's words for them; the
    CSV holds the same rows; ImageNet's words beside its wnids."""
    import csv
    from fastrsb.class_order import imagenet_classes
    out, _ = run
    val, table = tiny_data / "val", tmp_path / "predictions.csv"
    classes = sorted(p.name for p in val.iterdir())
    proc = run_cli("predict", out / "last.pt", val, "--json", "--top", "9", "--batch-size", "8", "--csv", table)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["file"] for r in rows] == sorted(str(p) for p in val.rglob("*") if p.is_file())
    for r in rows:
        assert sorted(t["index"] for t in r["top"]) == [0, 1, 2, 3]  # --top 9 of 4 classes: all 4
        assert [t["class"] for t in r["top"]] == [classes[t["index"]] for t in r["top"]]
        probabilities = [t["probability"] for t in r["top"]]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1)
    evaluated = json.loads(run_cli("eval", out / "last.pt", "--data", tiny_data, "--json", "--batch-size", "8",
                                   "--per-class", tmp_path / "classes.csv").stdout)
    hits = [sum(r["top"][0]["class"] == name for r in rows if Path(r["file"]).parent.name == name) for name in classes]
    assert hits == [round(c["top1"] * c["images"] / 100) for c in evaluated["per_class"]]
    # eval's "taken for": the class predict names first most often for a class's images but its own.
    for name, c in zip(classes, evaluated["per_class"]):
        wrong = [r["top"][0]["index"] for r in rows if Path(r["file"]).parent.name == name and r["top"][0]["class"] != name]
        most = min(set(wrong), key=lambda k: (-wrong.count(k), k)) if wrong else None
        assert (c["taken_for"], c["taken_for_share"]) == \
            ((classes[most], 100 * wrong.count(most) / c["images"]) if wrong else (None, 0.0))
    assert any(c["taken_for"] for c in evaluated["per_class"])  # (the tiny run errs: the check has work)
    with open(table, newline="") as f:
        written = list(csv.DictReader(f))
    assert [(w["file"], int(w["rank"]), w["class"], float(w["probability"])) for w in written] == \
        [(r["file"], rank, t["class"], t["probability"]) for r in rows for rank, t in enumerate(r["top"], 1)]
    alone = json.loads(run_cli("predict", out / "last.pt", rows[7]["file"], "--json").stdout)
    assert [t["index"] for t in alone["top"]] == [t["index"] for t in rows[7]["top"]]
    assert [t["probability"] for t in alone["top"]] == pytest.approx([t["probability"] for t in rows[7]["top"]],
                                                                    abs=1e-5)
    run_cli("export", out / "last.pt", tmp_path / "exported")
    exported = [json.loads(line) for line in run_cli("predict", tmp_path / "exported", val, "--json", "--top", "2",
                                                      "--batch-size", "8").stdout.splitlines()]
    assert [[t["class"] for t in r["top"]] for r in exported] == [[t["class"] for t in r["top"][:2]] for r in rows]
    config = json.loads((tmp_path / "exported" / "config.json").read_text())  # a folder's own words for its classes
    config["label_descriptions"] = {name: f"{name.split('_')[1]}, pattern" for name in classes}
    (tmp_path / "exported" / "config.json").write_text(json.dumps(config))
    top = rows[0]["top"][0]
    assert run_cli("predict", tmp_path / "exported", rows[0]["file"], "--top", "1").stdout.splitlines()[0] == \
        f"{rows[0]['file']}: {top['class']} ({top['class'].split('_')[1]}) {100 * top['probability']:.1f}%"
    per_class = json.loads(run_cli("eval", tmp_path / "exported", "--data", tiny_data, "--json", "--per-class",
                                   tmp_path / "classes.csv").stdout)["per_class"]  # eval's rows name them too
    assert [r["words"] for r in per_class] == [config["label_descriptions"][name] for name in classes]
    # The terminal's lines, and ImageNet's words beside classes that are its wnids.
    state = load_checkpoint(out / "last.pt")
    state["classes"] = imagenet_classes()[:4]  # n01440764 (tench), n01443537 (goldfish), ...
    torch.save(state, tmp_path / "named.pt")
    text = run_cli("predict", tmp_path / "named.pt", rows[0]["file"], "--top", "1").stdout.splitlines()
    first = rows[0]["top"][0]
    named = state["classes"][first["index"]]
    words = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
             "n01491361": "tiger shark"}[named]
    assert text == [f"{rows[0]['file']}: {named} ({words}) {100 * first['probability']:.1f}%",
                     "1 image(s) at 40 px, crop 0.95"]
    # timm's weights name no classes: 1,000 outputs are ImageNet's (here the 4 trained rows first,
    # the others held out of the softmax by their bias), with a note saying so.
    weights = state["model"]
    wide = {**weights, "fc.weight": torch.zeros(1000, weights["fc.weight"].shape[1]).index_copy(
        0, torch.arange(4), weights["fc.weight"]), "fc.bias": torch.full((1000,), -1e4).index_copy(
        0, torch.arange(4), weights["fc.bias"])}
    torch.save({"arch": "resnet10t", "state_dict": wide}, tmp_path / "imagenet.pth.tar")
    proc = run_cli("predict", tmp_path / "imagenet.pth.tar", rows[0]["file"], "--top", "2", "--img-size", "40",
                   "--crop-pct", "0.95")
    assert "note: the weights name no classes: their 1,000 outputs are read as ImageNet-1k's" in proc.stdout
    as_json = run_cli("predict", tmp_path / "imagenet.pth.tar", rows[0]["file"], "--img-size", "40", "--json")
    assert "note: the weights name no classes" in as_json.stderr  # beside the JSON lines, which stay JSON
    assert json.loads(as_json.stdout)["top"][0]["class"] == named
    second = rows[0]["top"][1]
    assert f"{named} ({words}) {100 * first['probability']:.1f}%; {state['classes'][second['index']]}" in proc.stdout


def test_flip_averages_each_images_outputs_with_its_mirror_images(run, tiny_data, tmp_path):
    """--flip (predict and eval): an image's outputs are the mean of the model's for it and for its
    mirror image, here read from a file of the mirror (square PNGs, whose resize and centre crop
    mirror exactly): softmax of the mean of the two images' log-probabilities (the log-softmax
    is the outputs less one constant an image). eval --flip counts its top-1 on those outputs."""
    import numpy as np
    from PIL import Image
    out, _ = run
    classes = sorted(p.name for p in (tiny_data / "val").iterdir())
    for split in ("train", "val"):
        for name in classes:
            for k, jpeg in enumerate(sorted((tiny_data / "val" / name).iterdir())):
                picture = Image.open(jpeg).convert("RGB").resize((84, 84), Image.BICUBIC)
                for kind, image in (("as", picture), ("mirror", picture.transpose(Image.FLIP_LEFT_RIGHT))):
                    (tmp_path / kind / split / name).mkdir(parents=True, exist_ok=True)
                    image.save(tmp_path / kind / split / name / f"{k}.png")

    def probabilities(folder, *flip):
        rows = [json.loads(line) for line in run_cli("predict", out / "last.pt", folder, "--json", "--top", "4",
                                                     *flip).stdout.splitlines()]
        return np.array([[{t["index"]: t["probability"] for t in r["top"]}[k] for k in range(4)] for r in rows])
    plain, mirrored = probabilities(tmp_path / "as" / "val"), probabilities(tmp_path / "mirror" / "val")
    assert np.abs(plain - mirrored).max() > 1e-3  # the model tells an image from its mirror: the test has work
    mean = (np.log(plain) + np.log(mirrored)) / 2
    expected = np.exp(mean) / np.exp(mean).sum(axis=1, keepdims=True)
    assert probabilities(tmp_path / "as" / "val", "--flip") == pytest.approx(expected, abs=2e-5)
    result = json.loads(run_cli("eval", out / "last.pt", "--data", tmp_path / "as", "--json", "--flip").stdout)
    labels = np.repeat(np.arange(4), 5)  # the walk's order: class by class
    assert result["flip"] and result["top1"] == pytest.approx(100 * (expected.argmax(axis=1) == labels).mean())
    # Its loss is the cross-entropy of those outputs (the top-1 alone may not move with them).
    assert result["val_loss"] == pytest.approx(-np.log(expected[np.arange(20), labels]).mean(), rel=1e-4)
    assert "each image with its mirror image (--flip)" in run_cli("eval", out / "last.pt", "--data", tmp_path / "as",
                                                                 "--flip").stdout


def test_average_is_the_mean_of_the_weights_and_a_checkpoint_eval_and_export_take(run, tiny_data, tmp_path):
    """fastrsb average: each entry's mean (timm's avg_checkpoints.py: BatchNorm's statistics too; its
    step counts rounded), the EMA's where all kept one; eval, export and predict take the result, a
    resume does not (no optimizer state). Refused: one checkpoint, one given twice (a hard link
    too), another model's classes, --out over an input."""
    out, _ = run
    a = load_checkpoint(out / "last.pt")
    b = {**a, "model": {k: v + (1 if v.is_floating_point() else 3) for k, v in a["model"].items()}, "epoch": 7}
    torch.save(b, tmp_path / "b.pt")
    proc = run_cli("average", out / "last.pt", tmp_path / "b.pt", "--out", tmp_path / "avg.pt")
    assert f"the mean of 2 checkpoints' weights (epochs {a['epoch']}, 7)" in proc.stdout
    mean = load_checkpoint(tmp_path / "avg.pt")
    for key, value in a["model"].items():  # (the sum in float64, as timm's: v + 0.5 in float32 rounds otherwise)
        expected = ((value.double() + b["model"][key].double()) / 2)  # a step count's: n + 1.5, rounded
        expected = expected.float() if value.is_floating_point() else expected.round().to(value.dtype)
        assert torch.equal(mean["model"][key], expected), key
        assert value.is_floating_point() or expected == value + 2 - value % 2  # half to even, not truncated
    assert "ema" not in mean and [c["epoch"] for c in mean["averaged_from"]] == [a["epoch"], 7]
    torch.save({**a, "ema": a["model"]}, tmp_path / "with_ema.pt")  # an EMA in one of the two: not averaged, said
    assert "note: not every checkpoint kept an EMA" in run_cli("average", tmp_path / "with_ema.pt", tmp_path / "b.pt",
                                                               "--out", tmp_path / "avg2.pt").stdout
    assert "ema" not in load_checkpoint(tmp_path / "avg2.pt")
    assert "top1" in json.loads(run_cli("eval", tmp_path / "avg.pt", "--data", tiny_data, "--json").stdout)
    assert f"(the mean of epochs {a['epoch']}, 7, the model's weights)" in run_cli(
        "export", tmp_path / "avg.pt", tmp_path / "exported").stdout
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert [c["epoch"] for c in config["fastrsb"]["averaged_from"]] == [a["epoch"], 7]
    assert_user_error(run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / "again", "--device", "cpu",
                              "--resume", tmp_path / "avg.pt", check=False),
                      "holds weights only (a mean of checkpoints: fastrsb average)", "initial_checkpoint=")
    (tmp_path / "same.pt").hardlink_to(tmp_path / "b.pt")
    other = {**a, "classes": list(reversed(a["classes"]))}
    torch.save(other, tmp_path / "other.pt")
    for inputs, said in (([out / "last.pt"], "give two checkpoints or more"),
                         ([tmp_path / "b.pt", tmp_path / "same.pt"], "is a checkpoint given before"),
                         ([out / "last.pt", tmp_path / "other.pt"], "classify other classes")):
        assert_user_error(run_cli("average", *inputs, "--out", tmp_path / "x.pt", check=False), said)
    assert_user_error(run_cli("average", out / "last.pt", tmp_path / "b.pt", "--out", tmp_path / "same.pt",
                              check=False), "is one of the checkpoints averaged")
    assert not (tmp_path / "x.pt").exists()


def test_average_of_three_keeps_the_last_ones_epoch_and_refuses_another_network(run, tiny_data, tmp_path):
    """Three checkpoints: each entry divided by three, the EMAs' too where all kept one (said; an
    EMA in some only, the first's or a later one's, not averaged and said);
    the mean has the last one's epoch and step, no top-1 of its own (export claims none; each
    source's is kept), and is written into a folder made for it. Refused, nothing written:
    another model's weights (its name), other tensors (one of another shape, one missing), --out
    a folder."""
    out, _ = run
    a = load_checkpoint(out / "last.pt")
    shifted = {k: v + (1 if v.is_floating_point() else 3) for k, v in a["model"].items()}
    sources = [{**a, "ema": a["model"]},
               {**a, "ema": shifted, "model": shifted, "epoch": 7, "step": 70, "metrics": {"top1": 30.0}},
               {**a, "ema": a["model"], "model": {k: v * 2 for k, v in a["model"].items()}, "epoch": 9, "step": 90,
                "metrics": {"top1": 45.0, "ema_top1": 50.0}}]
    for k, state in enumerate(sources):
        torch.save(state, tmp_path / f"{k}.pt")
    paths = [tmp_path / f"{k}.pt" for k in range(3)]
    proc = run_cli("average", *paths, "--out", tmp_path / "new" / "folder" / "avg.pt")
    assert "the mean of 3 checkpoints' weights (epochs 2, 7, 9) and of their EMAs;" in proc.stdout
    assert "note:" not in proc.stdout
    mean = load_checkpoint(tmp_path / "new" / "folder" / "avg.pt")
    for part in ("model", "ema"):
        for key, value in a["model"].items():
            total = sum(state[part][key].double() for state in sources) / 3
            expected = total.float() if value.is_floating_point() else total.round().to(value.dtype)
            assert torch.equal(mean[part][key], expected), (part, key)
    assert (mean["epoch"], mean["step"], mean["metrics"]) == (9, 90, {})
    assert [c["top1"] for c in mean["averaged_from"]] == [a["metrics"]["top1"], 30.0, 45.0]
    run_cli("export", tmp_path / "new" / "folder" / "avg.pt", tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())["fastrsb"]
    assert config["top1"] is None and [c["top1"] for c in config["averaged_from"]] == [a["metrics"]["top1"], 30.0, 45.0]
    # An EMA in a later checkpoint only: not averaged either, and said so as where the first has one.
    assert "note: not every checkpoint kept an EMA" in run_cli("average", out / "last.pt", paths[1], "--out",
                                                               tmp_path / "plain.pt").stdout

    other_model = {**a, "recipe": {**a["recipe"], "model": "resnet14t"}}
    fc = next(k for k in a["model"] if k.endswith("fc.weight"))
    reshaped = {**a, "model": {**a["model"], fc: a["model"][fc][:-1]}}
    missing = {**a, "model": {k: v for k, v in a["model"].items() if k != fc}}
    for name, state in (("other_model", other_model), ("reshaped", reshaped), ("missing", missing)):
        torch.save(state, tmp_path / f"{name}.pt")
    for name, said in (("other_model", f"is a resnet14t, {out / 'last.pt'} a {a['recipe']['model']}: only one "
                                       "model's weights average"),
                       ("reshaped", f"holds other tensors than {out / 'last.pt'}: not one network's weights"),
                       ("missing", "holds other tensors than")):
        assert_user_error(run_cli("average", out / "last.pt", tmp_path / f"{name}.pt", "--out", tmp_path / "x.pt",
                                  check=False), said)
    assert_user_error(run_cli("average", out / "last.pt", paths[1], "--out", tmp_path, check=False),
                      f"--out {tmp_path} is a folder: give the file to write (e.g. {tmp_path / 'average.pt'})")
    # A path mistyped is said before any checkpoint is read (ten take minutes): here before the
    # first, which is no checkpoint, would be.
    (tmp_path / "cut.pt").write_bytes((out / "last.pt").read_bytes()[:1000])
    assert_user_error(run_cli("average", tmp_path / "cut.pt", tmp_path / "typo.pt", "--out", tmp_path / "x.pt",
                              check=False), f"no checkpoint at {tmp_path / 'typo.pt'}")
    assert not (tmp_path / "x.pt").exists()


def test_average_measures_batch_norm_anew_as_swa_does(run, tiny_data, tmp_path):
    """average --bn-data: the mean's weights, with BatchNorm's running statistics measured anew
    over the train images as torch's SWA update_bn measures them (the same batches: the recipe's
    train loader from its seed), not averaged; --bn-images caps the images; a data set of other
    classes is refused before anything is written."""
    from torch.optim.swa_utils import update_bn
    from fastrsb.data_folder import open_split
    from fastrsb.model import make_model
    from fastrsb.parts import open_train_loader
    out, _ = run
    a = load_checkpoint(out / "last.pt")
    b = {**a, "model": {k: v * 1.5 if v.is_floating_point() else v for k, v in a["model"].items()}}
    torch.save(b, tmp_path / "b.pt")
    run_cli("average", out / "last.pt", tmp_path / "b.pt", "--out", tmp_path / "plain.pt")
    proc = run_cli("average", out / "last.pt", tmp_path / "b.pt", "--out", tmp_path / "bn.pt", "--bn-data", tiny_data,
                   "--device", "cpu")
    assert f"BatchNorm's statistics measured anew over 48 train images of {tiny_data} at 32 px" in proc.stdout
    plain, measured = load_checkpoint(tmp_path / "plain.pt"), load_checkpoint(tmp_path / "bn.pt")
    model = make_model(a["recipe"]["model"], 4)
    model.load_state_dict(plain["model"])
    train = open_split(tiny_data, "train")
    update_bn(open_train_loader(a["recipe"], train, 48, "cpu", seed=a["recipe"]["seed"]), model)
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    reference = model.state_dict()
    for key, value in plain["model"].items():
        want = reference[key] if key.endswith(statistics) else value
        assert torch.equal(measured["model"][key], want), key
    assert any(not torch.equal(measured["model"][k], plain["model"][k]) for k in plain["model"] if k.endswith("running_var"))
    assert measured["bn_recomputed"]["images"] == 48
    capped = run_cli("average", out / "last.pt", tmp_path / "b.pt", "--out", tmp_path / "capped.pt", "--bn-data",
                     tiny_data, "--device", "cpu", "--bn-images", "20", "--batch-size", "8").stdout
    assert "measured anew over 20 train images" in capped
    assert "top1" in json.loads(run_cli("eval", tmp_path / "bn.pt", "--data", tiny_data, "--json").stdout)
    other = tmp_path / "other"
    for split in ("train", "val"):
        shutil.copytree(tiny_data / split, other / split)
    (other / "train" / "n00_hstripes").rename(other / "train" / "zz_renamed")
    assert_user_error(run_cli("average", out / "last.pt", tmp_path / "b.pt", "--out", tmp_path / "x.pt", "--bn-data",
                              other, "--device", "cpu", check=False), "holds other classes than the checkpoints")
    assert not (tmp_path / "x.pt").exists()


def test_predict_into_a_pipe_closed_early_ends_quietly(run, tiny_data):
    """`fastrsb predict ... | head`: the reader goes before the lines end. The command ends as one
    killed by SIGPIPE does (141), without a traceback (it printed one)."""
    import subprocess
    out, _ = run
    proc = subprocess.Popen([sys.executable, "-m", "fastrsb", "predict", str(out / "last.pt"), str(tiny_data / "val"),
                             "--batch-size", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as head does once it has its lines
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and b"Traceback" not in err, err.decode()


def test_predict_refuses_what_it_cannot_read_in_one_line(run, tiny_data, tmp_path):
    """A path that is nothing, a file that is no image, a folder without images, an image that
    does not decode (named), a CSV path that cannot be written: one line each, before any output."""
    out, _ = run
    image = next((tiny_data / "val").rglob("*.JPEG"))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(image.read_bytes())
    (tmp_path / "broken" / "b.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 200)  # a JPEG's start, then nothing
    for args, why in (((tmp_path / "none.jpg",), f"no file or folder {tmp_path / 'none.jpg'}"),
                      ((image, tmp_path / "notes.txt"), "is not an image the decoders read"),
                      ((tmp_path / "empty",), f"{tmp_path / 'empty'} holds no images"),
                      ((tmp_path / "broken",), f"cannot decode {tmp_path / 'broken' / 'b.jpg'}"),
                      ((image, "--csv", tmp_path), "is a folder"),
                      ((image, "--csv", tmp_path / "no" / "p.csv"), f"its folder {tmp_path / 'no'} does not exist")):
        proc = run_cli("predict", out / "last.pt", *args, check=False)
        assert_user_error(proc, why)
        assert proc.stdout == ""
    assert_user_error(run_cli("predict", tmp_path / "none.pt", image, check=False), "no checkpoint at")


def test_predict_reads_each_image_once_at_the_crop_asked(run, tiny_data, tmp_path, monkeypatch):
    """What predict reads: a folder's images alone (not the notes beside them), an image named
    twice (itself and through its folder) once, at the --crop-pct asked (other outputs than the
    recipe's 0.95); a file name that is not UTF-8, which DALI's reader cannot take, refused in one
    line before anything is read."""
    out, _ = run
    image = next((tiny_data / "val").rglob("*.JPEG"))
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(image, folder / "a.jpg")
    (folder / "notes.txt").write_text("where the photo was taken")
    rows = [json.loads(line) for line in run_cli("predict", out / "last.pt", folder / "a.jpg", folder, image, "--json",
                                                 "--top", "1").stdout.splitlines()]
    assert [r["file"] for r in rows] == [str(folder / "a.jpg"), str(image)]
    assert rows[0]["top"] == rows[1]["top"]  # one image, as the two files hold
    monkeypatch.chdir(folder)  # a path relative to the working folder, named as given
    relative = json.loads(run_cli("predict", out / "last.pt", "a.jpg", "--json", "--top", "1").stdout)
    assert relative == {**rows[0], "file": "a.jpg"}
    text = run_cli("predict", out / "last.pt", image, "--top", "1", "--crop-pct", "0.5").stdout.splitlines()
    assert text[-1] == "1 image(s) at 40 px, crop 0.5"
    cropped = json.loads(run_cli("predict", out / "last.pt", image, "--json", "--top", "1", "--crop-pct", "0.5").stdout)
    assert cropped["top"] != rows[1]["top"]  # the crop asked, not the recipe's, gave these outputs
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as latin1:  # named in Latin-1
        latin1.write(image.read_bytes())
    proc = run_cli("predict", out / "last.pt", folder, check=False)
    assert_user_error(proc, "1 file name(s) are not UTF-8, which DALI's reader needs")
    assert proc.stdout == ""


def test_eval_of_timm_weights_without_train_arguments(run, tiny_data, tmp_path):
    """timm's layout without train.py's arguments ("arch" and "state_dict" alone) is tested at the
    size and crop timm's validate.py takes for the model; its classes counted from its classifier.
    Weights that classify another number of classes than the data folder has are refused (their
    labels would index other classes), as is a model name timm does not know; a model train.py
    fetched from timm's hub repositories (at a revision) is known by their name; weights saved from
    a DDP-wrapped compiled model ("module._orig_mod." names) are the bare model's; the network is
    built channels-last, as fastrsb trains and evaluates."""
    out, _ = run
    weights = load_checkpoint(out / "last.pt")["model"]
    torch.save({"arch": "resnet10t", "state_dict": weights, "epoch": 4, "version": 2}, tmp_path / "bare.pth.tar")
    proc = run_cli("eval", tmp_path / "bare.pth.tar", "--data", tiny_data, "--json")
    result = json.loads(proc.stdout)
    assert (result["img_size"], result["crop_pct"], result["epoch"]) == (224, 0.95, 5)  # resnet10t's test size
    assert result["notes"][0].startswith("the checkpoint holds no arguments of timm's train.py")
    assert result["notes"][0].endswith("the size and crop timm's validate.py takes for resnet10t (224 px, crop 0.95)")
    from fastrsb.timm_checkpoint import model_to_evaluate, read_timm_checkpoint
    built = model_to_evaluate(read_timm_checkpoint(torch.load(tmp_path / "bare.pth.tar"), tmp_path / "bare.pth.tar"),
                              ema=False).model
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in built.modules()
               if isinstance(m, torch.nn.Conv2d))
    wrapped = {f"module._orig_mod.{name}": value for name, value in weights.items()}
    torch.save({"arch": "resnet10t", "state_dict": wrapped}, tmp_path / "wrapped.pth.tar")
    assert json.loads(run_cli("eval", tmp_path / "wrapped.pth.tar", "--data", tiny_data, "--json").stdout)["top1"] == \
        result["top1"]
    wide = {**weights, "fc.weight": torch.zeros(1000, weights["fc.weight"].shape[1]), "fc.bias": torch.zeros(1000)}
    torch.save({"arch": "resnet10t", "state_dict": wide}, tmp_path / "imagenet.pth.tar")
    assert_user_error(run_cli("eval", tmp_path / "imagenet.pth.tar", "--data", tiny_data, check=False),
                      "its 4 class folders are not the 1000 classes the weights classify")
    torch.save({"arch": "resnet", "state_dict": weights}, tmp_path / "unnamed.pth.tar")
    assert_user_error(run_cli("eval", tmp_path / "unnamed.pth.tar", "--data", tiny_data, check=False),
                      "names its model 'resnet', which is no model this timm")
    # A fine-tune of a model train.py fetched from the hub: timm's repositories bear the model's name.
    torch.save({"arch": "hf-hub:timm/resnet10t.c3_in1k@a1b2c3d", "state_dict": weights}, tmp_path / "hub.pth.tar")
    assert json.loads(run_cli("eval", tmp_path / "hub.pth.tar", "--data", tiny_data, "--json").stdout)["top1"] == \
        result["top1"]
    assert "weights: from" in run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / "ft", "--device", "cpu",
                                      "--set", f"initial_checkpoint={tmp_path / 'hub.pth.tar'}",
                                      "--stop-after-steps", "1").stdout


ZERO_LR = ["--set", "lr=0", "--set", "warmup_lr=0", "--set", "min_lr=0", "--set", "warmup_epochs=0"]


def assert_same_figures(result: dict, want: dict) -> None:
    """The same figures from weights whose classifier rows are in another order: the counts
    exactly, the loss to float32's precision (a matrix product over permuted rows may round its
    last bit otherwise, by the CPU: oneDNN picks its kernels by CPU)."""
    assert [result[k] for k in ("top1", "top5", "val_images")] == [want[k] for k in ("top1", "top5", "val_images")]
    assert math.isclose(result["val_loss"], want["val_loss"], rel_tol=1e-6), (result["val_loss"], want["val_loss"])


def _classes_renamed(out, tiny_data, tmp_path):
    """The run's last checkpoint as tmp_path/renamed.pt, and a copy of its data as tmp_path/data,
    with the classes renamed B c1 c10 c2: sorted (fastrsb's order) unlike timm's natural order."""
    import shutil
    state = load_checkpoint(out / "last.pt")
    renamed = ["B", "c1", "c10", "c2"]  # sorted; natural (timm's): B, c1, c2, c10
    assert len(state["classes"]) == len(renamed)
    data = tmp_path / "data"
    for split in ("train", "val"):
        for old, new in zip(state["classes"], renamed):
            shutil.copytree(tiny_data / split / old, data / split / new)
    state["classes"] = renamed
    torch.save(state, tmp_path / "renamed.pt")
    return data, state, renamed


def test_classes_cross_to_timm_and_back_by_name_where_the_orders_differ(run, tiny_data, tmp_path):
    """fastrsb indexes a folder's classes sorted (as torchvision), timm's ImageFolder in natural
    order; here 'c10' comes before 'c2' in one and after it in the other. Exported weights give
    timm's output k the class timm's own ImageDataset indexes k (they gave it fastrsb's k: the
    export classified every image of these classes under another's name in timm's tools). eval
    reads an export, a checkpoint of timm's train.py (indexed as timm trained it: natural order,
    or its --class-map) and fastrsb's own checkpoint to the same figures; a run started from the
    timm checkpoint keeps its classifier, each row under its own class."""
    import argparse
    import timm
    from timm.data import ImageDataset
    out, _ = run
    data, state, renamed = _classes_renamed(out, tiny_data, tmp_path)
    ours = json.loads(run_cli("eval", tmp_path / "renamed.pt", "--data", data, "--json").stdout)

    run_cli("export", tmp_path / "renamed.pt", tmp_path / "exported")
    exported = timm.create_model(f"local-dir:{tmp_path / 'exported'}", pretrained=True).eval()
    trained = timm.create_model("resnet10t", num_classes=4).eval()
    trained.load_state_dict(state["model"])
    timm_index = ImageDataset(str(data / "val")).reader.class_to_idx
    assert list(timm_index) == ["B", "c1", "c2", "c10"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs, mine = exported(x), trained(x)
    for name, k in timm_index.items():  # timm's output k is the class timm's ImageDataset labels k
        assert torch.allclose(theirs[:, k], mine[:, renamed.index(name)]), name
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["label_names"] == list(timm_index)
    from_export = json.loads(run_cli("eval", tmp_path / "exported", "--data", data, "--json", "--img-size", "40",
                                     "--crop-pct", "0.95").stdout)
    assert_same_figures(from_export, ours)

    # timm's train.py trained these weights on this folder: its rows in natural order, or in its class map's.
    args = argparse.Namespace(model="resnet10t", num_classes=4, img_size=40, input_size=None, crop_pct=0.95,
                              mean=None, std=None, interpolation="", gp=None, model_kwargs={}, eval_metric="top1",
                              model_ema_force_cpu=False, class_map="", data_dir=str(data))
    natural = [renamed.index(name) for name in timm_index]
    by_timm = {k: v[natural] if k.startswith("fc.") else v for k, v in state["model"].items()}
    checkpoint = _timm_train_checkpoint(tmp_path / "timm", by_timm, args, None, 0.0)
    timm_eval = json.loads(run_cli("eval", checkpoint, "--data", data, "--json").stdout)
    assert_same_figures(timm_eval, ours)
    assert "natural order" in timm_eval["notes"][-1]
    mapped = ["c2", "B", "c10", "c1"]
    (data / "classes.txt").write_text("".join(f"{name}\n" for name in mapped))
    by_map = {k: v[[renamed.index(name) for name in mapped]] if k.startswith("fc.") else v
              for k, v in state["model"].items()}
    mapped_args = argparse.Namespace(**{**vars(args), "class_map": "classes.txt"})
    mapped_checkpoint = _timm_train_checkpoint(tmp_path / "mapped", by_map, mapped_args, None, 0)
    mapped_eval = json.loads(run_cli("eval", mapped_checkpoint, "--data", data, "--json").stdout)
    assert_same_figures(mapped_eval, ours)
    # predict names the map's classes too (weights naming none: without the map, outputs by index).
    image = next((data / "val" / "c10").iterdir())
    predicted = [json.loads(run_cli("predict", weights, image, "--json", "--top", "4", "--img-size", "40",
                                    "--crop-pct", "0.95").stdout)["top"] for weights in (tmp_path / "renamed.pt",
                                                                                          mapped_checkpoint)]
    assert [t["class"] for t in predicted[1]] == [t["class"] for t in predicted[0]]
    unmapped = run_cli("predict", checkpoint, image, "--top", "4", "--img-size", "40").stdout
    assert "note: the weights name no classes: each of their 4 outputs is named by its index" in unmapped
    assert sorted(re.findall(r"; (\d) ", f"; {unmapped.splitlines()[-2].split(': ', 1)[1]}")) == ["0", "1", "2", "3"]
    for name in ("w", "x", "y", "z"):  # none of the map's classes
        shutil.copytree(data / "val" / "B", tmp_path / "unmapped" / name)
    shutil.copy(data / "classes.txt", tmp_path / "unmapped")
    assert_user_error(run_cli("eval", mapped_checkpoint, "--data", tmp_path / "unmapped", check=False),
                      f"{tmp_path / 'unmapped'}: none of its classes is in the class map classes.txt")
    (data / "classes.txt").unlink()
    assert_user_error(run_cli("eval", mapped_checkpoint, "--data", data, check=False),
                      "trained with --class-map classes.txt", str(data / "classes.txt"))
    # Found where train.py found it: in a split of its data folder, named `data` by timm's older releases.
    (tmp_path / "old" / "train").mkdir(parents=True)
    (tmp_path / "old" / "train" / "classes.txt").write_text("".join(f"{name}\n" for name in mapped))
    older = argparse.Namespace(**{k: v for k, v in vars(mapped_args).items() if k != "data_dir"},
                               data=str(tmp_path / "old"))
    older_checkpoint = _timm_train_checkpoint(tmp_path / "older", by_map, older, None, 0)
    assert_same_figures(json.loads(run_cli("eval", older_checkpoint, "--data", data, "--json").stdout), ours)

    started = run_cli("train", "tiny", "--data", data, "--out", tmp_path / "ft", "--device", "cpu",
                      "--set", f"initial_checkpoint={checkpoint}", *ZERO_LR, "--stop-after-steps", "1")
    assert "its classifier included (its rows put in this run's class order" in started.stdout
    assert torch.equal(load_checkpoint(tmp_path / "ft" / "last.pt")["model"]["fc.weight"], state["model"]["fc.weight"])
    # Trained with a class map under a data folder that is gone: the map is found beside this run's data.
    moved = argparse.Namespace(**{**vars(mapped_args), "data_dir": str(tmp_path / "gone")})
    moved_checkpoint = _timm_train_checkpoint(tmp_path / "moved", by_map, moved, None, 0)
    (data / "train" / "classes.txt").write_text("".join(f"{name}\n" for name in mapped))
    started = run_cli("train", "tiny", "--data", data, "--out", tmp_path / "ft-map", "--device", "cpu",
                      "--set", f"initial_checkpoint={moved_checkpoint}", *ZERO_LR, "--stop-after-steps", "1")
    assert "its classifier included (its rows put in this run's class order" in started.stdout
    fc = load_checkpoint(tmp_path / "ft-map" / "last.pt")["model"]["fc.weight"]
    assert torch.equal(fc, state["model"]["fc.weight"])


def test_class_folders_named_by_index_are_read_as_imagenet_v2s(run, tiny_data, tmp_path):
    """ImageNet-V2 names its class folders 0 to 999, folder k holding the images of class k in
    timm's order (ImageNet's wnids sorted). eval reads them so, with a note, for weights naming
    their classes in any order (fastrsb's checkpoint, an export) and for timm's naming none: the
    same figures as the folder by name (it was refused: "its classes differ from the weights'")."""
    import argparse
    import shutil
    out, _ = run
    data, state, renamed = _classes_renamed(out, tiny_data, tmp_path)
    by_name = json.loads(run_cli("eval", tmp_path / "renamed.pt", "--data", data, "--json").stdout)
    for index, name in enumerate(["B", "c1", "c2", "c10"]):  # timm's order
        shutil.copytree(data / "val" / name, tmp_path / "v2" / str(index))
    run_cli("export", tmp_path / "renamed.pt", tmp_path / "exported")
    args = argparse.Namespace(model="resnet10t", num_classes=4, img_size=40, input_size=None, crop_pct=0.95,
                              mean=None, std=None, interpolation="", gp=None, model_kwargs={}, eval_metric="top1",
                              model_ema_force_cpu=False, class_map="", data_dir=str(data))
    natural = {k: v[[0, 1, 3, 2]] if k.startswith("fc.") else v for k, v in state["model"].items()}
    timm_checkpoint = _timm_train_checkpoint(tmp_path / "timm", natural, args, None, 0.0)
    notes = []
    for weights in (tmp_path / "renamed.pt", tmp_path / "exported", timm_checkpoint):
        result = json.loads(run_cli("eval", weights, "--data", tmp_path / "v2", "--json", "--img-size", "40",
                                    "--crop-pct", "0.95").stdout)
        assert_same_figures(result, by_name)
        notes.append(result["notes"][-1])
    assert all("named by index, as ImageNet-V2's" in note for note in notes)
    assert "class k in timm's order (0: B, 1: c1, ...)" in notes[0]  # the weights' order is B c1 c10 c2
    shutil.rmtree(tmp_path / "v2" / "3")  # a subset of the classes, by index
    subset = json.loads(run_cli("eval", timm_checkpoint, "--data", tmp_path / "v2", "--json", "--partial-classes",
                                "all").stdout)
    assert subset["val_images"] == by_name["val_images"] - len(list((data / "val" / "c10").iterdir()))
    # Weights whose classes are named "0" to "3" read such folders by name, without the note.
    state["classes"] = ["0", "1", "2", "3"]
    torch.save(state, tmp_path / "digits.pt")
    shutil.copytree(data / "val" / "c10", tmp_path / "v2" / "3")
    assert "notes" not in json.loads(run_cli("eval", tmp_path / "digits.pt", "--data", tmp_path / "v2", "--json").stdout)
    # A folder of another class than the weights' is refused, by its name.
    shutil.copytree(data / "val" / "c10", tmp_path / "other" / "zebra")
    for name in renamed:
        shutil.copytree(data / "val" / name, tmp_path / "other" / name)
    assert_user_error(run_cli("eval", tmp_path / "renamed.pt", "--data", tmp_path / "other", check=False),
                      "its 5 classes differ from the weights' 4 ('zebra' is not one of theirs: B, c1, c10, ...)")


def _parameters(model_state: dict, names) -> dict:
    return {k: v for k, v in model_state.items() if k in names}


def test_initial_checkpoint_starts_a_run_from_trained_weights(run, tiny_data, tmp_path):
    """A new run from a checkpoint's weights: with the LR at 0 (LAMB moves nothing; BatchNorm's
    running statistics still follow the batches), its weights end as they began. Resumed, it reads
    its own checkpoint, not the initial one, which may be gone."""
    from fastrsb.model import make_model
    out, _ = run
    source = tmp_path / "source.pt"
    source.write_bytes((out / "last.pt").read_bytes())
    names = {name for name, _ in make_model("resnet10t", 4).named_parameters()}
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / "ft", "--device", "cpu",
                   "--set", f"initial_checkpoint={source}", *ZERO_LR, "--stop-after-steps", "3")
    assert f"weights: from {source} (epoch 2), its classifier included" in proc.stdout
    started = load_checkpoint(source)["model"]
    assert _weights_equal(_parameters(load_checkpoint(tmp_path / "ft" / "last.pt")["model"], names),
                          _parameters(started, names))
    source.unlink()
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / "ft", "--device", "cpu",
                   "--set", f"initial_checkpoint={source}", *ZERO_LR, "--resume", "auto")
    assert "resumed from" in proc.stdout and "weights: from" not in proc.stdout
    assert _weights_equal(_parameters(load_checkpoint(tmp_path / "ft" / "last.pt")["model"], names),
                          _parameters(started, names))


def test_initial_checkpoint_from_a_model_folder_on_other_classes_starts_the_classifier_anew(run, tiny_data, tmp_path):
    from fastrsb.demo_data import write_demo
    from fastrsb.model import make_model
    out, _ = run
    folder = tmp_path / "exported"
    run_cli("export", out / "last.pt", folder)
    three = write_demo(tmp_path / "three", train_per_class=8, val_per_class=2, seed=3, num_classes=3)
    proc = run_cli("train", "tiny", "--data", three, "--out", tmp_path / "ft", "--device", "cpu",
                   "--set", f"initial_checkpoint={folder}", *ZERO_LR, "--set", "epochs=1")
    assert f"weights: from model folder {folder}, with a new classifier (its 4 classes are not this run's 3)" in proc.stdout
    names = {name for name, _ in make_model("resnet10t", 3).named_parameters()}
    trained, started = load_checkpoint(tmp_path / "ft" / "last.pt")["model"], load_checkpoint(out / "last.pt")["model"]
    body = names - {"fc.weight", "fc.bias"}
    assert _weights_equal(_parameters(trained, body), _parameters(started, body))
    assert trained["fc.weight"].shape == (3, 512)
    # A folder naming no classes (as timm's hub models): kept where their number is the run's.
    config = json.loads((folder / "config.json").read_text())
    del config["label_names"]
    (folder / "config.json").write_text(json.dumps(config))
    for data, said in ((tiny_data, "its classifier included"),
                       (three, "with a new classifier (its classes are not this run's 3)")):
        proc = run_cli("train", "tiny", "--data", data, "--out", tmp_path / f"nameless-{data.name}", "--device", "cpu",
                       "--set", f"initial_checkpoint={folder}", "--stop-after-steps", "1")
        assert f"weights: from model folder {folder}, {said}" in proc.stdout
    # A checkpoint of as many classes named otherwise: not this run's classes, whatever their number.
    renamed = {**load_checkpoint(out / "last.pt"), "classes": ["w", "x", "y", "z"]}
    torch.save(renamed, tmp_path / "renamed.pt")
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / "renamed", "--device", "cpu",
                   "--set", f"initial_checkpoint={tmp_path / 'renamed.pt'}", "--stop-after-steps", "1")
    assert "with a new classifier (its 4 classes are not this run's 4)" in proc.stdout


def test_initial_checkpoint_from_weights_alone(run, tiny_data, tmp_path):
    """timm's --initial-checkpoint takes a file of weights alone, and so does fastrsb's (it took a
    checkpoint or a model folder only): a bare state dict (torch.save), timm's layout ("state_dict"
    and "arch", with a DDP model's "module." prefixes), a .safetensors file, and an EMA's weights
    under the keys timm's loader prefers ("state_dict_ema", "model_ema": torchvision's reference
    scripts', an AveragedModel's; the model's were taken): the weights timm starts from. With the
    LR at 0 each run's weights end as they began; an "arch" other than the recipe's model, and
    weights that do not fit it, are named; the timm command passes such a file as it is."""
    import timm
    from safetensors.torch import save_file
    from fastrsb.model import make_model
    out, _ = run
    started = load_checkpoint(out / "last.pt")["model"]
    fresh = make_model("resnet10t", 4).state_dict()
    averaged = {"n_averaged": torch.tensor(9), **{f"module.{k}": v for k, v in started.items()}}
    files = {"bare.pth": started, "timm.pth.tar": {"state_dict": {f"module.{k}": v for k, v in started.items()},
                                                   "arch": "resnet10t", "epoch": 7},
             "ema.pth": {"state_dict": fresh, "state_dict_ema": started, "epoch": 3},
             "torchvision.pth": {"model": fresh, "model_ema": averaged, "epoch": 3}}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    save_file({k: v.contiguous() for k, v in started.items()}, tmp_path / "w.safetensors")
    names = {name for name, _ in make_model("resnet10t", 4).named_parameters()}
    said = {"timm.pth.tar": "timm's train.py: resnet10t, 7 epoch(s) trained",  # an older saver's epoch: those done
            "ema.pth": "weights alone, its EMA's under \"state_dict_ema\" as timm's --initial-checkpoint takes them",
            "torchvision.pth": "weights alone, its EMA's under \"model_ema\" as timm's --initial-checkpoint takes them"}
    for name in (*files, "w.safetensors"):
        proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / f"ft-{name}", "--device", "cpu",
                       "--set", f"initial_checkpoint={tmp_path / name}", *ZERO_LR, "--stop-after-steps", "2")
        assert f"weights: from {tmp_path / name} ({said.get(name, 'weights alone')}), its classifier included" in proc.stdout
        trained = load_checkpoint(tmp_path / f"ft-{name}" / "last.pt")["model"]
        assert _weights_equal(_parameters(trained, names), _parameters(started, names)), name
        if name != "torchvision.pth":  # timm's strict load refuses the AveragedModel's n_averaged
            by_timm = timm.create_model("resnet10t", num_classes=4, checkpoint_path=str(tmp_path / name))
            assert _weights_equal(_parameters(by_timm.state_dict(), names), _parameters(started, names)), name
    common = ["train", "tiny", "--data", tiny_data, "--device", "cpu"]
    torch.save({"state_dict": started, "arch": "resnet18"}, tmp_path / "r18.pth")
    assert_user_error(run_cli(*common, "--out", tmp_path / "a", "--set", f"initial_checkpoint={tmp_path / 'r18.pth'}",
                              check=False), "holds resnet18 weights and the recipe trains resnet10t")
    first = next(iter(started))  # a weight of the body (without the classifier's, it starts anew)
    torch.save({k: v for k, v in started.items() if k != first}, tmp_path / "short.pth")
    assert_user_error(run_cli(*common, "--out", tmp_path / "b", "--set", f"initial_checkpoint={tmp_path / 'short.pth'}",
                              check=False), f"short.pth does not fit the model: 1 missing key(s), e.g. {first}")
    torch.save([1, 2], tmp_path / "list.pth")
    assert_user_error(run_cli(*common, "--out", tmp_path / "c", "--set", f"initial_checkpoint={tmp_path / 'list.pth'}",
                              check=False), "nor a state dict of weights alone")
    assert f"--initial-checkpoint {tmp_path / 'bare.pth'} " in run_cli(
        "recipe", "tiny", "--timm", "--set", f"initial_checkpoint={tmp_path / 'bare.pth'}").stdout
    assert "timm indexes these classes otherwise" not in proc.stdout  # n00_... n03_...: one order
    data, _, _ = _classes_renamed(out, tiny_data, tmp_path)  # B c1 c10 c2: timm's order is another
    proc = run_cli("train", "tiny", "--data", data, "--out", tmp_path / "renamed", "--device", "cpu",
                   "--set", f"initial_checkpoint={tmp_path / 'bare.pth'}", *ZERO_LR, "--stop-after-steps", "1")
    assert ("its classifier included (rows taken in this run's class order, sorted: B, c1, c10, c2, ...; timm "
            "indexes these classes otherwise: B, c1, c2, c10, ...") in proc.stdout


def test_initial_checkpoint_that_cannot_start_the_run(run, tiny_data, tmp_path):
    out, _ = run
    common = ["train", "tiny", "--data", tiny_data, "--device", "cpu"]
    assert_user_error(run_cli(*common, "--out", tmp_path / "a", "--set", f"initial_checkpoint={tmp_path / 'none.pt'}",
                              check=False), "initial_checkpoint", "does not exist")
    # Said once, before --nproc starts its processes (each would say it), and no run folder made.
    assert_user_error(run_cli(*common, "--out", tmp_path / "a", "--nproc", "2", "--set",
                              f"initial_checkpoint={tmp_path / 'none.pt'}", check=False), "does not exist")
    assert_user_error(run_cli(*common, "--out", tmp_path / "a", "--set", f"initial_checkpoint={tmp_path}", check=False),
                      f"initial_checkpoint {tmp_path} is a folder without config.json")
    assert not (tmp_path / "a").exists()
    assert_user_error(run_cli(*common, "--out", tmp_path / "b", "--set", f"initial_checkpoint={out / 'last.pt'}",
                              "--set", "model=resnet18", check=False),
                      "holds resnet10t weights and the recipe trains resnet18", "--set model=resnet10t")
    assert "--initial-checkpoint EXPORTED_FOLDER/model.safetensors" in run_cli(
        "recipe", "tiny", "--timm", "--set", f"initial_checkpoint={out / 'last.pt'}").stdout


def test_export_names_imagenet_classes_in_words():
    from fastrsb.class_order import imagenet_descriptions
    assert imagenet_descriptions(["n01440764", "n01443537"]) == {"n01440764": "tench, Tinca tinca",
                                                                  "n01443537": "goldfish, Carassius auratus"}
    assert imagenet_descriptions(["n01440764", "n00_hstripes"]) is None


def test_run_folder_is_not_overwritten(run, tiny_data):
    out, _ = run
    before = (out / "metrics.jsonl").read_text()
    assert_user_error(run_cli("train", "tiny", "--data", tiny_data, "--out", out, "--device", "cpu", check=False),
                      "already holds a run")
    assert (out / "metrics.jsonl").read_text() == before


def test_another_tools_files_are_not_written_over(tiny_data, tmp_path):
    """A folder holding a file of a name a run writes whole, but no metrics.jsonl (timm's output
    folder has a summary.csv; a hand-made one may hold a last.pt), is not a fastrsb run: a run
    starting anew there (new, or --resume auto without a last.pt to continue) is refused and the
    file kept. A fastrsb run stopped at start-up (its recipe.json, no rows) starts again."""
    from fastrsb.metrics_log import WRITTEN_OVER
    common = ["train", "tiny", "--data", tiny_data, "--device", "cpu"]
    for name in WRITTEN_OVER:
        folder = tmp_path / name.replace(".", "-")
        folder.mkdir()
        (folder / name).write_text("theirs")
        for resume in ([], ["--resume", "auto"]) if name != "last.pt" else ([],):  # (auto resumes a last.pt)
            assert_user_error(run_cli(*common, "--out", folder, *resume, check=False),
                              f"{folder} already holds {name} but no metrics.jsonl")
        assert [(p.name, p.read_text()) for p in folder.iterdir()] == [(name, "theirs")]
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "recipe.json").write_text("{}")
    run_cli(*common, "--out", stopped, "--stop-after-steps", "1")
    assert (stopped / "last.pt").is_file()


def test_one_train_at_a_time_in_a_run_folder(run, tiny_data):
    """A second train in a folder a train is writing (--resume auto from another terminal, two jobs
    given one --out) is refused, naming the first, and changes nothing; the lock is the kernel's,
    so a holder that was killed leaves none behind."""
    from fastrsb.doctor import run_folder_check
    from fastrsb.folder_lock import FolderLock
    from fastrsb.recipe import load_recipe
    from fastrsb.train import train
    out, _ = run
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    with folder_held(out) as holder:
        said = f"{out} is being written by fastrsb train (pid {holder.pid} on {socket.gethostname()}, since "
        for resume in ("auto", None):  # the CLI's check, before it imports torch
            argv = ["train", "tiny", "--data", tiny_data, "--out", out, "--device", "cpu"] + (["--resume", resume] if resume else [])
            assert_user_error(run_cli(*argv, check=False), said)
        # train() itself (what each torchrun process and a library user call) takes the lock or stops.
        with pytest.raises(UserError, match=re.escape(said)):
            train(load_recipe("tiny"), tiny_data, out, device="cpu", resume="auto")
        assert said in run_folder_check(out, None).text  # fastrsb doctor --out
        assert f"pid {holder.pid}" in (out / ".fastrsb.lock").read_text()  # its lock file, left to it
    assert run_folder_check(out, None) is None
    lock = FolderLock(out)
    lock.take()  # its file is still there, its lock is not
    lock.release()
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before


def test_looks_at_a_lock_do_not_pass_for_its_holder(tmp_path):
    """Every torchrun process looks at the data folder's lock at once (a shared lock, an instant
    each): the looks do not exclude each other, and a job taking the lock meanwhile waits them out."""
    import fcntl
    import threading
    from fastrsb.folder_lock import LOCK_NAME, FolderLock, in_use
    # A killed job's, longer than the next holder's line
    (tmp_path / LOCK_NAME).write_text(f"fastrsb data prepare (pid 1 on {'a-long-host-name.' * 8}, since long ago)")
    look = os.open(tmp_path / LOCK_NAME, os.O_RDONLY)
    fcntl.flock(look, fcntl.LOCK_SH)  # another process's look, under way
    assert in_use(tmp_path) is None
    threading.Timer(0.05, os.close, (look,)).start()  # over in 0.05 s, well within the 0.5 s a take waits
    lock = FolderLock(tmp_path)
    lock.take()
    assert in_use(tmp_path).startswith(f"fastrsb train (pid {os.getpid()} on ")
    assert "long ago" not in in_use(tmp_path)  # the killed job's words written over whole, not in part
    lock.release()


def test_a_lock_taken_in_a_race_is_the_one_at_its_path_and_a_refusal_says_why(tmp_path, monkeypatch):
    """A job that ends between another's open and flock unlinks the file the other then locks:
    the other locks the file at the path instead (else a third could take that one too). A lock
    whose holder has not yet written its name is "just started"; a data job's refusal says why two
    must not write one folder; a folder it may not write is said in one line."""
    import fcntl
    import fastrsb.folder_lock as folder_lock
    from fastrsb.folder_lock import LOCK_NAME, FolderLock, in_use
    lock_soon, raced = folder_lock._lock_soon, []

    def ended_meanwhile(fd, *args):
        if not raced:  # the job holding it ends now: its release unlinks the file
            (tmp_path / LOCK_NAME).unlink()
            raced.append(fd)
        return lock_soon(fd, *args)
    monkeypatch.setattr(folder_lock, "_lock_soon", ended_meanwhile)
    (tmp_path / LOCK_NAME).write_text("fastrsb train (pid 1 on gone, since long ago)")
    lock = FolderLock(tmp_path, "fastrsb data shrink")
    lock.take()
    assert raced and in_use(tmp_path).startswith("fastrsb data shrink (pid ")  # the file at the path is held
    lock.release()
    monkeypatch.setattr(folder_lock, "_lock_soon", lock_soon)

    (tmp_path / LOCK_NAME).write_text("")
    held = os.open(tmp_path / LOCK_NAME, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # taken, its holder's name not written yet
    try:
        assert in_use(tmp_path) == "another fastrsb job, just started"
        with pytest.raises(UserError, match="is being written by another fastrsb job, just started; two jobs writing "
                                            "one folder race for the same files: wait for it to end or stop it"):
            FolderLock(tmp_path, "fastrsb data prepare").take()
    finally:
        os.close(held)

    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "open", refused)  # (as root, chmod would not refuse)
    with pytest.raises(UserError, match=f"cannot write in {re.escape(str(tmp_path))}: Permission denied"):
        FolderLock(tmp_path).take()


def test_a_run_folder_that_takes_no_locks_trains_unguarded_and_says_so(tmp_path, monkeypatch, capsys):
    """Some NFS and Lustre mounts answer flock with ENOLCK or ENOSYS: the run goes on, and says
    that nothing guards its folder, rather than not starting at all (the data tools likewise)."""
    import errno
    import fcntl
    from fastrsb.folder_lock import FolderLock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = FolderLock(tmp_path)
    lock.take()
    lock.release()
    assert ("file system takes no file locks (No locks available): nothing stops a second job from writing there "
            "while this fastrsb train does") in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", ["auto", "pillow"])  # auto: matplotlib (the test extra installs it)
def test_plot_writes_the_curves(run, tmp_path, backend):
    from PIL import Image
    out, _ = run
    proc = run_cli("plot", out, "-o", tmp_path / "curves.png", "--backend", backend)
    assert "curves.png" in proc.stdout
    image = Image.open(tmp_path / "curves.png").convert("RGB")
    assert image.size == (1680, 600)
    colours = {c for _, c in image.getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours  # curves were drawn, not just axes
    # The sixth panel: each epoch's peak memory (fastrsb.peak_memory), where the rows hold it.
    corner = {c for _, c in image.crop((1120, 300, 1680, 600)).getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in corner
    assert_user_error(run_cli("plot", tmp_path, check=False), "no metrics.jsonl", "nor summary.csv")
    # -o: a folder takes the default name, missing folders are made, and no other file is written over.
    assert run_cli("plot", out, "-o", tmp_path, "--backend", backend).stdout == f"wrote {tmp_path / 'curves.png'}\n"
    run_cli("plot", out, "-o", tmp_path / "new" / "a.png", "--backend", backend)
    assert Image.open(tmp_path / "new" / "a.png").size == (1680, 600)
    before = (out / "last.pt").read_bytes()
    for name in ("last.pt", "metrics.jsonl", "curves"):
        assert_user_error(run_cli("plot", out, "-o", out / name, "--backend", backend, check=False),
                          "the curves are written as a PNG: name a .png file (or a folder)")
    assert (out / "last.pt").read_bytes() == before and not (out / "curves").exists()


@pytest.mark.parametrize("backend", ["auto", "pillow"])
def test_plot_compares_runs_in_a_colour_each(run, tmp_path, backend, monkeypatch):
    """Two runs in one figure: each run's curves in its own colour in every panel (six panels: the
    train and validation losses apart), named by folder; the default file lands in the current
    folder; a folder that is no run is named."""
    from PIL import Image
    out, _ = run
    other = tmp_path / "other"
    other.mkdir()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Another run's figures: every curve moved, so that neither hides the other.
    moved = [{**r, "loss": r.get("loss", 1) * 2, "val_loss": r.get("val_loss", 1) * 2, "top1": r.get("top1", 0) / 2,
              "lr": r["lr"] / 2, "images_per_sec": r["images_per_sec"] / 2, "data_wait": r["data_wait"] + 0.1}
             for r in rows]
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in moved))
    monkeypatch.chdir(tmp_path)
    proc = run_cli("plot", out, other, "--backend", backend)
    written = tmp_path / f"curves-{out.name}-other.png"
    assert f"wrote curves-{out.name}-other.png" in proc.stdout and written.is_file()
    image = Image.open(written).convert("RGB")
    assert image.size == (1680, 600)
    # The sixth panel (data wait) is drawn too: both runs' colours in the lower right third.
    corner = {c for _, c in image.crop((1120, 300, 1680, 600)).getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in corner and (214, 39, 40) in corner
    assert_user_error(run_cli("plot", out, tmp_path / "nothing", check=False), "no metrics.jsonl")


# The arguments timm's train.py writes to args.yaml (yaml.safe_dump of its argparse namespace; here
# those its scheduler factory and fastrsb read, as `fastrsb recipe a3 --timm` sets them).
TIMM_A3_ARGUMENTS = dict(
    model="resnet50", epochs=95, warmup_epochs=5, warmup_prefix=True, cooldown_epochs=0, sched="cosine",
    sched_on_updates=True, lr=0.008, warmup_lr=1e-4, min_lr=1e-6, decay_epochs=90, decay_milestones=[90, 180, 270],
    decay_rate=0.1, patience_epochs=10, lr_noise=None, lr_cycle_mul=1.0, lr_cycle_decay=0.5, lr_cycle_limit=1,
    lr_k_decay=1.0, seed=0, eval_metric="top1", mixup=0.1, cutmix=1.0, smoothing=0.0, aa="rand-m6-mstd0.5-inc1",
    device="cuda", experiment="")


def _timm_output(folder: Path, rows: list[tuple[int, float, float, bool]], **arguments) -> Path:
    """An output folder of timm's train.py: its args.yaml, and its summary.csv written by timm's
    own update_summary, a row per (epoch, loss, top1, header written before it)."""
    from collections import OrderedDict
    import yaml
    from timm.utils import update_summary
    folder.mkdir(parents=True)
    (folder / "args.yaml").write_text(yaml.safe_dump(dict(TIMM_A3_ARGUMENTS, **arguments), default_flow_style=False))
    for epoch, loss, top1, header in rows:
        update_summary(epoch, OrderedDict(loss=loss), OrderedDict(loss=loss + 0.5, top1=top1, top5=100.0),
                       str(folder / "summary.csv"), lr=0.008 / (epoch + 1), write_header=header)
    return folder


def test_plot_panels_are_what_the_rows_say(tmp_path, monkeypatch):
    """What `fastrsb plot` draws, from written rows (no run trained): the loss on a log axis, the
    data wait in percent, the crop sizes of a progressive run in the images/s title (where the size
    changes), each epoch's peak memory on an axis from 0 where the rows hold it (a sixth panel; a
    run without it has five, the spare axis hidden); two runs' folders of one name are named by
    their paths; a metrics.jsonl without log or epoch rows, and a PNG that cannot be written, are
    said in one line."""
    import matplotlib.pyplot as plt
    from fastrsb import plot
    logs = [{"kind": "log", "epoch": e, "loss": 2.0 / e, "lr": 0.1, "images_per_sec": 100.0, "data_wait": w}
            for e, w in ((0.5, 0.25), (1.5, 0.5))]
    epochs = [{"kind": "epoch", "epoch": e, "top1": 10.0 * e, "top5": 30.0, "train_loss": 2.0, "val_loss": 2.5,
               "img_size": size, "peak_memory_gib": 1.5 + e / 10} for e, size in ((1, 32), (2, 48), (3, 48))]
    drawn = plot.panels(logs, epochs)
    assert [(title, axis) for title, _, axis in drawn] == [
        ("loss", plot.LOG), ("validation accuracy (%)", plot.LINEAR), ("learning rate", plot.LINEAR),
        ("images/s per process (32/48 px from epochs 1/2)", plot.LINEAR),
        ("share of step time waiting for data (%)", plot.LINEAR), ("peak memory per epoch (GiB)", plot.FROM_ZERO)]
    assert drawn[4][1] == [("data wait", [0.5, 1.5], [25.0, 50.0])] and [name for name, _, _ in drawn[5][1]] == ["process"]
    unsized = [{k: v for k, v in row.items() if k not in ("img_size", "peak_memory_gib")} for row in epochs]
    assert [title for title, _, _ in plot.panels(logs, unsized)][3:] == [
        "images/s per process", "share of step time waiting for data (%)"]
    compared = plot.compared_panels([("a", logs, epochs), ("b", logs, epochs)])
    assert compared[5][1][1] == ("b", [0.5, 1.5], [25.0, 50.0])
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # the drawn figure kept, to read its axes
    for name in ("x/run", "y/run", "z/run"):
        (tmp_path / name).mkdir(parents=True)
        rows = logs + (epochs if name != "z/run" else unsized)
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_cli("plot", tmp_path / "x/run", "--backend", "matplotlib")
    axes = figures[-1].axes
    assert axes[0].get_yscale() == "log" and axes[5].get_ylim()[0] == 0 and axes[5].axison
    run_cli("plot", tmp_path / "z/run", "--backend", "matplotlib")
    assert not figures[-1].axes[5].axison
    monkeypatch.chdir(tmp_path)
    assert run_cli("plot", "x/run", "y/run", "--backend", "matplotlib").stdout == "wrote curves-run-run.png\n"
    assert [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()] == ["x/run", "y/run"]
    (tmp_path / "x/run/metrics.jsonl").write_text(json.dumps({"kind": "start"}) + "\n")
    assert_user_error(run_cli("plot", "x/run", check=False), "metrics.jsonl has no rows yet")
    (tmp_path / "notes.txt").write_text("")
    assert_user_error(run_cli("plot", "y/run", "-o", "notes.txt/curves.png", check=False),
                      "could not write notes.txt/curves.png")
    monkeypatch.undo()
    plt.close("all")


def test_plot_draws_a_timm_run_beside_a_fastrsb_run(run, tmp_path):
    """timm's train.py output folder (its summary.csv, written here by timm's own update_summary)
    is drawn beside a fastrsb run: its epoch rows at the epochs done (timm counts from 0), its loss
    and LR an epoch's; what it does not measure (images/s, data wait) stays empty. A run resumed in
    its folder (train.py writes the header again) from an earlier checkpoint (epochs written
    again) is read as the run went on: the header passed over, the resumed run's rows from the
    first epoch it wrote again on, the first run's past that point dropped."""
    from PIL import Image
    from fastrsb.plot import read_metrics
    out, _ = run
    timm_run = _timm_output(tmp_path / "20261203-resnet10t-32", [(0, 0.9, 30.0, True), (1, 0.8, 45.0, False)])
    logs, epochs = read_metrics(timm_run)
    assert [(r["epoch"], r["top1"], r["train_loss"], r["lr"]) for r in epochs] == [(1, 30.0, 0.9, 0.008),
                                                                                    (2, 45.0, 0.8, 0.004)]
    assert [(r["epoch"], r["loss"], r["images_per_sec"]) for r in logs] == [(1, 0.9, None), (2, 0.8, None)]
    resumed = _timm_output(tmp_path / "resumed", [(0, 0.9, 30.0, True), (1, 0.8, 45.0, False), (1, 0.85, 44.0, True),
                                                   (2, 0.7, 50.0, False)])
    assert [(r["epoch"], r["top1"]) for r in read_metrics(resumed)[1]] == [(1, 30.0), (2, 44.0), (3, 50.0)]
    # Resumed from epoch 1's checkpoint after epoch 3 was written: the run is now at epoch 2.
    rewound = _timm_output(tmp_path / "rewound", [(0, 0.9, 30.0, True), (1, 0.8, 45.0, False), (2, 0.7, 48.0, False),
                                                  (1, 0.85, 44.0, True)])
    assert [(r["epoch"], r["top1"]) for r in read_metrics(rewound)[1]] == [(1, 30.0), (2, 44.0)]
    # timm before 0.6 (the RSB paper's runs) wrote no lr; a run without validation no eval_ figures.
    from collections import OrderedDict
    from timm.utils import update_summary
    validated = OrderedDict(loss=1.2, top1=31.0, top5=90.0)
    for name, validation, lr in (("old", validated, None), ("unvalidated", None, 0.1)):
        (tmp_path / name).mkdir()
        for epoch in range(2):
            # write_header as train.py passes it (timm 1.0.29, the GPU machine's, writes one only when told to)
            update_summary(epoch, OrderedDict(loss=0.9), validation, str(tmp_path / name / "summary.csv"), lr=lr,
                           write_header=epoch == 0)
    assert [(r["top1"], r["lr"]) for r in read_metrics(tmp_path / "old")[1]] == [(31.0, None)] * 2
    unvalidated = read_metrics(tmp_path / "unvalidated")[1]
    assert [(r["top1"], r["val_loss"], r["lr"]) for r in unvalidated] == [(None, None, 0.1)] * 2
    run_cli("plot", out, tmp_path / "old", tmp_path / "unvalidated", "-o", tmp_path / "three.png")
    run_cli("plot", out, timm_run, "-o", tmp_path / "both.png")
    colours = {c for _, c in Image.open(tmp_path / "both.png").convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours  # both runs drawn
    assert "wrote" in run_cli("plot", timm_run, "-o", tmp_path / "timm.png").stdout  # alone too
    # A timm run that validated an EMA wrote the EMA's figures: drawn as the EMA's, as a fastrsb
    # run's that keeps one (by which either judged its epochs); an EMA kept on the CPU was not validated.
    from fastrsb.plot import compared_panels, panels
    ema_run = _timm_output(tmp_path / "ema", [(0, 0.9, 30.0, True), (1, 0.8, 45.0, False)], model_ema=True)
    cpu_ema = _timm_output(tmp_path / "cpu-ema", [(0, 0.9, 30.0, True)], model_ema=True, model_ema_force_cpu=True)
    ema_epochs = read_metrics(ema_run)[1]
    assert [(r["top1"], r["ema_top1"], r["ema_val_loss"]) for r in ema_epochs] == [(None, 30.0, 1.4), (None, 45.0, 1.3)]
    assert ("EMA top-1", [1, 2], [30.0, 45.0]) in panels(*read_metrics(ema_run))[1][1]
    assert "ema_top1" not in read_metrics(cpu_ema)[1][0]
    fastrsb_ema = [{**r, "ema_top1": r["top1"] + 1, "ema_val_loss": r["val_loss"]} for r in epochs]
    compared = dict((title, series) for title, series, _ in compared_panels(
        [("timm", *read_metrics(ema_run)), ("fastrsb", logs, fastrsb_ema), ("plain", logs, epochs)]))
    assert compared["validation top-1 (%)"] == [
        ("timm (EMA)", [1, 2], [30.0, 45.0]), ("fastrsb (EMA)", [1, 2], [31.0, 46.0]), ("plain", [1, 2], [30.0, 45.0])]
    (timm_run / "summary.csv").write_text("epoch,loss\n0,1\n")
    assert_user_error(run_cli("plot", timm_run, check=False), "is not a summary.csv of timm's train.py")
    (timm_run / "summary.csv").write_text("epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n")  # its header alone
    assert_user_error(run_cli("plot", timm_run, check=False), "has no rows yet: timm's run has not ended its first epoch")


def test_runs_lists_every_run_folder_with_its_progress(run, tmp_path):
    """`fastrsb runs DIR`: a finished run and one whose metrics stop after epoch 1 (from before
    starts.jsonl), from their files, without opening a checkpoint; a folder that is no run is
    passed over; no run folders at all, or no folder, are said."""
    import shutil
    from fastrsb.progress import clock
    from fastrsb.provenance import read_starts
    out, _ = run
    root = tmp_path / "runs"
    shutil.copytree(out, root / "a")
    shutil.copytree(out, root / "b")
    (root / "b" / "starts.jsonl").unlink()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (root / "b" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["epoch"] <= 1))
    (root / "notes").mkdir()
    listed = [json.loads(line) for line in run_cli("runs", root, "--json").stdout.splitlines()]
    assert [Path(r["run"]).name for r in listed] == ["a", "b"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    a, b = listed
    assert (a["recipe"], a["model"], a["epochs"], a["epochs_done"]) == ("tiny", "resnet10t", 2, 2)
    assert a["top1"] == epochs[-1]["top1"] and a["best_top1"] == max(r["top1"] for r in epochs)
    start = read_starts(out)[0]
    assert (a["started"], a["starts"], a["processes"], a["device"], a["commit"]) == (
        start["started"], 1, 1, "cpu", start["commit"])
    assert (b["epochs_done"], b["top1"], b["started"], b["processes"]) == (1, epochs[0]["top1"], None, None)
    assert (a["state"], b["state"], a["trainer"]) == ("done", "stopped", None)
    # The time b still needs: its one epoch left at epoch 1's pace (training after its first progress
    # line, and validation); a run done needs none.
    assert a["time_left_seconds"] is None
    assert b["time_left_seconds"] == epochs[0]["train_seconds_steady"] + epochs[0]["val_seconds"] > 0
    text = run_cli("runs", root).stdout.splitlines()
    assert text[0].split()[:4] == ["run", "recipe", "epochs", "state"] and len(text) == 3
    assert re.search(f"tiny \\(resnet10t\\)  2/2     done  +{epochs[-1]['top1']:.2f}", text[1]) and "1 x cpu" in text[1]
    assert f"1/2     stopped (~{clock(b['time_left_seconds'])} to go)  " in text[2]
    # The most a process held over an epoch (the runs' memory compared at a glance), of the epochs it has.
    assert a["peak_memory_gib"] == max(r["peak_memory_gib"] for r in epochs) > 0
    assert b["peak_memory_gib"] == epochs[0]["peak_memory_gib"]
    assert f"1 x cpu  {a['peak_memory_gib']:.1f} GiB " in text[1] and text[0].split()[8:10] == ["peak", "mem"]
    with folder_held(root / "b") as holder:  # a train resumed in b, running now
        b = json.loads(run_cli("runs", root, "--json").stdout.splitlines()[1])
        assert b["state"] == "running" and b["trainer"].startswith(f"fastrsb train (pid {holder.pid} on ")
        assert "1/2     running" in run_cli("runs", root).stdout.splitlines()[2]
    assert json.loads(run_cli("runs", root, "--json").stdout.splitlines()[1])["state"] == "stopped"
    (root / "c").mkdir()
    (root / "c" / "recipe.json").write_text("{not json")  # listed as such, the others still listed
    text = run_cli("runs", root).stdout.splitlines()
    assert len(text) == 4 and text[3].startswith(f"{root / 'c'}  unreadable: Expecting property name")
    for other in ("[1]", '{"name": "x"}'):  # another tool's recipe.json (a list stopped the table with a traceback)
        (root / "c" / "recipe.json").write_text(other)
        line = run_cli("runs", root).stdout.splitlines()[3]
        assert line.startswith(f"{root / 'c'}  unreadable: its recipe.json is not a fastrsb recipe"), line
    assert "no run folders under" in run_cli("runs", root / "notes").stdout
    assert_user_error(run_cli("runs", tmp_path / "nowhere", check=False), "is not a folder")


def _written_run(folder: Path, rows: list[dict], starts: list[dict], **recipe) -> Path:
    """A run folder's records as a run writes them (recipe.json, metrics.jsonl, starts.jsonl), for
    what `fastrsb runs` reads from them without a run behind them."""
    folder.mkdir(parents=True)
    (folder / "recipe.json").write_text(json.dumps({"name": "a3", "model": "resnet50", "img_size": 160, **recipe}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "starts.jsonl").write_text("".join(json.dumps(start) + "\n" for start in starts))
    return folder


def test_runs_reads_each_figure_from_the_row_it_belongs_to(tmp_path, monkeypatch):
    """`fastrsb runs`, from written records (no run trained): the top-1 is the last epoch's EMA
    score and the best the highest (neither the last nor the model's); where a run runs now its
    last start's processes and device; the time left from the last progress row (epoch 3.25, not
    the last validated 3); last written by its newest file (last.pt); a resumed run says so; a
    folder named with a dot is passed over; a timm run that ran all its epochs is done, its
    figures its EMA's, its header-only summary.csv a run with no epoch yet; a run stopped
    says why, one running now does not; the ages in d, h, min and s (60 s is 1 min); the start in
    a timm folder's name is the local time train.py wrote it in (here 2 h east of UTC)."""
    from fastrsb import run_list
    epoch = {"kind": "epoch", "img_size": 160, "train_seconds": 100.0, "train_seconds_steady": 90.0, "val_seconds": 10.0}
    rows = [{"kind": "log", "epoch": 0.5}, {**epoch, "epoch": 1, "top1": 40.0, "ema_top1": 42.0},
            {**epoch, "epoch": 2, "top1": 50.0, "ema_top1": 55.0}, {**epoch, "epoch": 3, "top1": 52.0, "ema_top1": 50.0},
            {"kind": "log", "epoch": 3.25}]
    starts = [{"started": "2026-12-01T10:00:00+00:00", "processes": 1, "device": "cpu", "commit": "aaaaaaa"},
              {"started": "2026-12-02T10:00:00+00:00", "processes": 8, "device": "cuda", "commit": "bbbbbbb"}]
    root = tmp_path / "runs"
    run = _written_run(root / "a3", rows, starts, epochs=4, model_ema=True)
    (run / "train.log").write_text("===== fastrsb train a3\nstopped at step 9 (epoch 3 done)\n")
    (run / "last.pt").write_bytes(b"")
    os.utime(run / "metrics.jsonl", (1_700_000_000, 1_700_000_000))
    os.utime(run / "last.pt", (1_700_000_600, 1_700_000_600))
    _written_run(root / ".trash" / "old", rows, starts, epochs=4)  # under a dot-folder: listed
    _written_run(root / ".hidden", rows, starts, epochs=4)  # a dot-folder itself: not
    timm = TIMM_A3_ARGUMENTS | {"epochs": 1, "warmup_epochs": 0, "warmup_prefix": False, "model_ema": True}
    _timm_output(root / "20261203-101530-done", [(0, 0.9, 30.0, True)], **timm)
    (root / "20261203-101530-done" / "last.pth.tar").write_bytes(b"")  # written after summary.csv
    os.utime(root / "20261203-101530-done" / "summary.csv", (1_700_000_000, 1_700_000_000))
    os.utime(root / "20261203-101530-done" / "last.pth.tar", (1_700_000_060, 1_700_000_060))
    (_timm_output(root / "timm-new", [], **timm) / "summary.csv").write_text("epoch,train_loss,eval_loss,eval_top1\n")
    import time
    monkeypatch.setenv("TZ", "UTC-2")  # POSIX's sign: local time is UTC + 2 h
    time.tzset()
    try:
        listed = {Path(r["run"]).name: r for r in map(run_list.describe, run_list.run_folders(root))}
    finally:
        monkeypatch.undo()
        time.tzset()
    assert sorted(listed) == ["20261203-101530-done", "a3", "old", "timm-new"]
    a3 = listed["a3"]
    assert (a3["top1"], a3["best_top1"], a3["ema"], a3["epochs_done"], a3["state"]) == (50.0, 55.0, True, 3, "stopped")
    assert (a3["started"], a3["starts"], a3["processes"], a3["device"], a3["commit"]) == (
        "2026-12-01T10:00:00+00:00", 2, 8, "cuda", "bbbbbbb")
    assert a3["time_left_seconds"] == 0.75 * (90.0 + 10.0)
    assert a3["last_written"] == "2023-11-14T22:23:20+00:00"  # last.pt's time, 600 s after metrics.jsonl's
    assert a3["why"] == "stopped at step 9 (epoch 3 done)"
    done, new = listed["20261203-101530-done"], listed["timm-new"]
    assert (done["state"], done["epochs_done"], done["top1"], done["ema"]) == ("done", 1, 30.0, True)
    assert (done["started"], done["last_written"]) == ("2026-12-03T08:15:30+00:00", "2023-11-14T22:14:20+00:00")
    assert (new["state"], new["epochs_done"], new["top1"], "unreadable" in new) == ("unfinished", 0, None, False)
    now = datetime.datetime(2023, 11, 14, 22, 23, 20, tzinfo=datetime.timezone.utc)
    text = run_list.table([a3, done], now=now + datetime.timedelta(seconds=60)).splitlines()
    assert "stopped (~0:01:15 to go)  50.00 (EMA)  55.00  2026-12-01 10:00 (+1 resume(s))  8 x cuda" in text[1]
    assert text[1].endswith("  1 min ago") and text[2] == "  why: stopped at step 9 (epoch 3 done)"
    assert "30.00 (EMA)" in text[3]
    for later, said in ((59, "59 s"), (3 * 3600 + 5, "3 h"), (2 * 86400 + 7, "2 d"), (-30, "0 s")):
        assert run_list.table([a3], now=now + datetime.timedelta(seconds=later)).splitlines()[1].endswith(f"  {said} ago")
    with folder_held(run):
        running = run_list.describe(run)
    assert (running["state"], running["why"]) == ("running", None)
    assert "why:" not in run_list.table([running], now=now)


def test_the_log_keeps_what_a_run_said_and_why_it_ended(tmp_path, monkeypatch):
    """RUN_DIR/train.log (fastrsb.run_log), what the runs above do not show: what was said before
    the run folder existed is held, up to a bound, and written under the start's line (and dropped
    where none is made); each line is in the file once said; a progress bar redrawn on a terminal
    goes in as its last state, also where the run ends before the bar; a log that cannot be
    written (a folder, a full disk) is said once and the output goes on; a log that just ends
    reads as a run that ended without a word, one whose last start is done as no stopped run."""
    import io
    from fastrsb import run_log
    from fastrsb.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with run_log.RunLog():
        print("checked the headers", file=sys.stderr)
        bar = Progress("epoch 1/1", 4)
        for done in (1, 2, 4):
            bar.update(done, 10.0, loss=0.5)
        bar.close()
        run_log.attach(tmp_path / "train.log", "fastrsb train x")
        print("stopped at step 4 (epoch 1 done)", file=sys.stderr)
    assert sys.stderr is terminal and terminal.getvalue().count("\r") == 3  # the terminal saw every redraw
    assert (tmp_path / "train.log").read_text().splitlines() == [
        "===== fastrsb train x", "checked the headers",
        "epoch 1/1 [########################] 4/4 10 img/s loss 0.5 eta 0:00:00", "stopped at step 4 (epoch 1 done)"]
    assert run_log.stop_reason(tmp_path) == "stopped at step 4 (epoch 1 done)"
    with (tmp_path / "train.log").open("a") as log:
        log.write("===== fastrsb train x --resume auto\nrun card: global batch 64\n")  # and then killed
    assert run_log.stop_reason(tmp_path) == "ended without a word: killed (out of memory?), or its machine went down"
    # An error fastrsb did not foresee (a traceback, which Python prints after the log is closed), and
    # under --nproc the error of a rank that stopped with another, which that one says on the terminal.
    with pytest.raises(RuntimeError), run_log.RunLog():
        run_log.attach(tmp_path / "train.log", "fastrsb train x --resume auto")
        raise RuntimeError("CUDA error: an illegal memory access")
    assert run_log.stop_reason(tmp_path) == ("error: RuntimeError: CUDA error: an illegal memory access (train.log has "
                                             "the traceback)")
    with pytest.raises(SystemExit), run_log.RunLog():
        run_log.attach(tmp_path / "train.log", "fastrsb train x --nproc 2 --resume auto")
        run_log.log_only("fastrsb: error: rank 1 (node7) stopped: cannot decode x.JPEG; rank 0 stops with it\n")
        raise SystemExit(2)
    assert "rank 1 (node7)" not in terminal.getvalue()
    assert run_log.stop_reason(tmp_path) == "error: rank 1 (node7) stopped: cannot decode x.JPEG; rank 0 stops with it"
    # A terminal that hung up before its SIGHUP arrived: the write fails (EIO); the line is logged and
    # the terminal's output sent to /dev/null (run_log.terminal_gone), not the run stopped by the error.
    import errno

    class HungUp(Terminal):
        def write(self, text):
            raise OSError(errno.EIO, "Input/output error")
    gone = []
    monkeypatch.setattr(run_log, "terminal_gone", lambda: gone.append(True))
    monkeypatch.setattr(sys, "stderr", HungUp())
    with run_log.RunLog():
        run_log.attach(tmp_path / "train.log", "fastrsb train x --resume auto")
        print("epoch 2: train_loss 0.4", file=sys.stderr, flush=True)
    monkeypatch.setattr(sys, "stderr", terminal)
    assert gone and (tmp_path / "train.log").read_text().endswith("auto\nepoch 2: train_loss 0.4\n")
    # The --nproc launcher: what it says of its ranks goes after rank 0's lines, not what it said before.
    with run_log.RunLog():
        print("generating the demo data set in data/demo ...")
        run_log.hold_anew()
        print("fastrsb: rank 1 ended by SIGKILL, without a word", file=sys.stderr)
        run_log.attach(tmp_path / "train.log", None)
    assert (tmp_path / "train.log").read_text().endswith(
        "train_loss 0.4\nfastrsb: rank 1 ended by SIGKILL, without a word\n")
    with run_log.RunLog():
        print("refused before the run folder was made", file=sys.stderr)
        run_log.attach(tmp_path / "nowhere.log", None)  # no log there (a run refused): none made
    (tmp_path / "folder").mkdir()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["folder", "train.log"]  # nothing else written
    with run_log.RunLog():
        run_log.attach(tmp_path / "folder", "fastrsb train y")  # a folder where the log would go: not writable
        print("epoch 1: train_loss 0.5", file=sys.stderr)
    assert terminal.getvalue().splitlines()[-2:] == [
        f"could not write {tmp_path / 'folder'} (Is a directory): the run goes on without its log",
        "epoch 1: train_loss 0.5"]
    assert run_log.stop_reason(tmp_path / "folder") is None  # no log: nothing to say (a run of before train.log)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "train.log").write_text("===== fastrsb train x\nstopped at step 4 (epoch 1 done)\n"
                                                 "===== fastrsb train x --resume auto\ndone: top1 80.00\n")
    assert run_log.stop_reason(tmp_path / "done") is None  # its last start finished the run
    for said, reason in (
            (["stopped after epoch 1"], "stopped after epoch 1"),  # --stop-after-steps at an epoch's end
            (["fastrsb: interrupted"], "interrupted (Ctrl-C)"),  # a KeyboardInterrupt outside the training loop
            # A library's thread that printed a traceback and went on; then the run was stopped.
            (["Traceback (most recent call last):", '  File "x.py", line 1, in <module>', "OSError: [Errno 5]",
              "epoch 2/3 4/6", "stopped at step 10 (epoch 2, 4/6)"], "stopped at step 10 (epoch 2, 4/6)"),
            # torch's CUDA errors say more lines after the error's own: the error's line is the reason.
            (["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
              "RuntimeError: CUDA error: an illegal memory access was encountered",
              "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below "
              "might be incorrect.", "For debugging consider passing CUDA_LAUNCH_BLOCKING=1",
              "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.", ""],
             "error: RuntimeError: CUDA error: an illegal memory access was encountered (train.log has the "
             "traceback)")):
        (tmp_path / "done" / "train.log").write_text("\n".join(["===== fastrsb train x", *said]) + "\n")
        assert run_log.stop_reason(tmp_path / "done") == reason
    # What is held before the run folder exists is bounded (HELD_AT_MOST: a few KB are held in a run).
    with run_log.RunLog():
        sys.stderr.write("x" * 600_000)  # a line not ended yet when the next write does not fit
        for letter in "yz":
            print(letter * 600_000, file=sys.stderr)
        run_log.attach(tmp_path / "held.log", "fastrsb train z")
        print("epoch 1: train_loss 0.5", file=sys.stderr)
        # in the file as soon as it is said: a kill loses no line
        assert (tmp_path / "held.log").read_text().endswith("\nepoch 1: train_loss 0.5\n")
        Progress("epoch 2/3", 4).update(1, 5.0)  # an error ends the run before the bar does: its last state is kept
    held = (tmp_path / "held.log").read_text().splitlines()
    assert held[1] == "x" * 600_000 and held[2:4] == [
        "[fastrsb: what was said after this, before the run folder was made, is not kept: over 1 MiB]",
        "epoch 1: train_loss 0.5"]
    assert held[-1].startswith("epoch 2/3 [######..................] 1/4 5 img/s")
    with run_log.RunLog():
        run_log.attach(tmp_path / "held.log", None)
        sys.stderr.writelines(["a library's line\n", "and another\n"])  # a stream's other way in
    assert (tmp_path / "held.log").read_text().endswith("\na library's line\nand another\n")
    with run_log.RunLog():
        run_log.detach()  # a rank but the first: it keeps no log
        print("rank 1's line", file=sys.stderr)
        run_log.attach(tmp_path / "rank1.log", "fastrsb train x")
    assert not (tmp_path / "rank1.log").exists()
    with run_log.RunLog():
        run_log.attach(Path("/dev/full"), "fastrsb train x")  # a log on a full disk: its first write fails
        print("epoch 1: train_loss 0.5", file=sys.stderr)
        print("epoch 2: train_loss 0.4", file=sys.stderr)
    assert terminal.getvalue().splitlines()[-3:] == [
        "could not write /dev/full (No space left on device): the run goes on without its log",
        "epoch 1: train_loss 0.5", "epoch 2: train_loss 0.4"]


def test_runs_lists_timm_output_folders_beside_fastrsb_runs(run, tmp_path):
    """`fastrsb runs runs output/train`: timm train.py's output folders are listed with fastrsb's,
    their epochs those timm's scheduler runs (A3's 95 + 5 warm-up, then any cool-down), their
    top-1 the summary's; a folder of another tool's args.yaml, or of one that is no YAML, is
    passed over."""
    import shutil
    out, _ = run
    shutil.copytree(out, tmp_path / "runs" / "tiny")
    timm = tmp_path / "output" / "train"
    _timm_output(timm / "20261203-101530-resnet50-160", [(0, 0.9, 30.0, True), (1, 0.8, 45.0, False),
                                                         (2, 0.7, 40.0, False)])
    _timm_output(timm / "short", [], epochs=10, warmup_prefix=False, cooldown_epochs=2)  # no epoch ended yet
    (timm / "other").mkdir()
    (timm / "other" / "args.yaml").write_text("lr: 0.1\nepochs: 3\n")  # another tool's
    for name, text in (("cut-short", b"model: [resnet50\n"), ("binary", b"\xff\xfe\x00model")):  # no YAML text
        (timm / name).mkdir()
        (timm / name / "args.yaml").write_bytes(text)
    listed = [json.loads(line) for line in run_cli("runs", tmp_path / "runs", timm, "--json").stdout.splitlines()]
    assert [(Path(r["run"]).name, r["kind"]) for r in listed] == [
        ("tiny", "fastrsb"), ("20261203-101530-resnet50-160", "timm"), ("short", "timm")]
    _, a3, short = listed
    assert (a3["recipe"], a3["model"], a3["epochs"], a3["epochs_done"], a3["state"]) == (
        "timm", "resnet50", 100, 3, "unfinished")
    assert (a3["top1"], a3["best_top1"], a3["commit"], a3["peak_memory_gib"]) == (40.0, 45.0, None, None)
    assert a3["started"] == datetime.datetime(2026, 12, 3, 10, 15, 30).astimezone(datetime.timezone.utc).isoformat()
    assert (short["epochs"], short["epochs_done"], short["top1"], short["last_written"]) == (12, 0, None, None)
    written = datetime.datetime.fromtimestamp((timm / "short" / "args.yaml").stat().st_mtime, datetime.timezone.utc)
    assert short["started"] == written.isoformat(timespec="seconds")  # no date in its name: when args.yaml was written
    from fastrsb.timm_run import scheduled_epochs
    assert scheduled_epochs({**TIMM_A3_ARGUMENTS, "lr_cycle_limit": 2}) == 195  # timm's count: 2 cycles + warm-up
    assert scheduled_epochs({**TIMM_A3_ARGUMENTS, "warmup_epochs": "5 "}) == 95  # its factory refuses: --epochs
    text = run_cli("runs", timm).stdout.splitlines()
    assert len(text) == 3 and "timm (resnet50)  3/100   unfinished  40.00  45.00  " in text[1], text
    (timm / "short" / "summary.csv").write_text("epoch,train_loss,lr\n0,0.9,0.1\n")  # not validated: no top-1
    assert "timm (resnet50)  1/12    unfinished  -      -      " in run_cli("runs", timm).stdout.splitlines()[2]
    (timm / "short" / "summary.csv").write_text("epoch,loss\n0,1\n")
    assert "unreadable: " in run_cli("runs", timm).stdout.splitlines()[2]
    assert "args.yaml, timm train.py's" in run_cli("runs", timm / "other").stdout


@pytest.mark.parametrize("recipe", ["a1", "a2"])
def test_a1_a2_run_end_to_end(recipe, tiny_data, tmp_path):
    """Every part of A1/A2 (label smoothing, stochastic depth, 3 repeated augmentations,
    RandAugment m7, mixup/cutmix, BCE, LAMB) together, shrunk to seconds: only the model, sizes,
    batch and epochs are changed."""
    proc = run_cli("train", recipe, "--data", tiny_data, "--out", tmp_path, "--device", "cpu",
                   "--set", "model=resnet10t", "--set", "epochs=1", "--set", "warmup_epochs=0",
                   "--set", "batch_size=8", "--set", "img_size=32", "--set", "test_img_size=40")
    state = load_checkpoint(tmp_path / "last.pt")
    r = state["recipe"]
    assert r["aug_repeats"] == 3 and r["aa"] == "rand-m7-mstd0.5-inc1" and r["drop_path"] == 0.05
    # A batch of 8 does not divide into 3 views (nor does the recipe's 2048): ceil(8/3) images a batch.
    assert state["step"] == 48 // 8 and "done: top1" in proc.stdout


def test_a_model_error_in_evaluation_is_not_called_a_data_error(tiny_data, monkeypatch):
    """Only the loader's errors are explained as data errors: a model's own RuntimeError (say, CUDA
    out of memory, here with "decode" in it) propagates as it is, and nothing is re-decoded."""
    import fastrsb.data_folder
    from fastrsb.parts import open_val_loader
    from fastrsb.pipelines import list_images
    from fastrsb.recipe import load_recipe
    from fastrsb.train import evaluate

    def broken_model(images):
        raise RuntimeError("CUDA out of memory while the decoder ran")
    monkeypatch.setattr(fastrsb.data_folder, "find_undecodable", lambda *a, **k: pytest.fail("re-decoded the data"))
    loader = open_val_loader(load_recipe("tiny"), list_images(tiny_data / "val"), 8, "cpu")
    model = torch.nn.Module()
    model.forward = broken_model
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        evaluate(model, loader, "cpu", None)


def test_progress_rate_and_data_share_cover_the_same_interval(monkeypatch):
    """Both figures of a log step are over the interval since the last log step (images/s was
    since the epoch began, compile time included, while the data share was the last interval)."""
    import fastrsb.train
    clock = iter([100.0, 110.0, 112.0])
    monkeypatch.setattr(fastrsb.train.time, "perf_counter", lambda: next(clock))
    interval = fastrsb.train.Interval()  # opens at t=100
    interval.images, interval.waited = 500, 2.5
    assert interval.close() == (50.0, 0.25)  # closes at t=110: 500 images / 10 s, 2.5 s of 10 waiting
    interval.images, interval.waited = 64, 0.5
    assert interval.close() == (32.0, 0.25)  # the next interval alone: 64 images / 2 s


def test_the_progress_line_on_a_terminal_and_in_a_log(monkeypatch):
    """Elsewhere than on a terminal (a job's output file, CI), a plain line at each tenth of the
    epoch and at its end, nothing at close; on a terminal one line redrawn, ended at close; the
    time left at the pace so far; nothing from a process that does not print (ranks but the first)."""
    import io
    import fastrsb.progress
    from fastrsb.progress import Progress, clock
    now = [0.0]
    monkeypatch.setattr(fastrsb.progress.time, "perf_counter", lambda: now[0])
    assert (clock(3725), clock(59.9), clock(-3)) == ("1:02:05", "0:00:59", "0:00:00")
    log = io.StringIO()
    bar = Progress("epoch 2/9", 30, stream=log)
    for done in range(1, 31):
        now[0] = 2.0 * done
        bar.update(done, 1234.5, data=0.25, loss=0.51234, lr=0.008)
    bar.close()
    lines = log.getvalue().splitlines()
    assert [int(line.split()[2].split("/")[0]) for line in lines] == [1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 30]
    assert lines[3] == "epoch 2/9 10/30 1,234 img/s loss 0.5123 lr 0.008 data 25% eta 0:00:40"
    assert log.getvalue().endswith("eta 0:00:00\n")

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    terminal, now[0] = Terminal(), 0.0
    bar = Progress("validation", 4, stream=terminal, unit="files")
    for done in (1, 2):
        now[0] = 60.0 * done
        bar.update(done, 7.0)
    bar.close()
    assert terminal.getvalue() == ("\rvalidation [######..................] 1/4 7 files/s  eta 0:03:00\033[K"
                                   "\rvalidation [############............] 2/4 7 files/s  eta 0:02:00\033[K\n")
    quiet = Terminal()
    bar = Progress("epoch 1/1", 4, stream=quiet, enabled=False)
    bar.update(4, 10.0)
    bar.close()
    assert quiet.getvalue() == ""


def test_the_onnx_check_is_relative_to_the_logits_scale_and_covers_another_size(tmp_path, monkeypatch):
    """export --onnx (fastrsb.onnx_export): a float32 file of a network held in bfloat16; the check
    takes two runtimes' float32 kernels rounding apart by a share of the logits' scale, whatever
    that scale (a network of large logits), and refuses a file that gives the network's logits at
    the size it was traced at but not at another; a network the exporter cannot take, and a
    missing package, are refused in a line."""
    from fastrsb.onnx_export import _check, check_available, write_onnx
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    with torch.no_grad():
        net[-1].weight.mul_(1e6)  # logits of ~1e5: float32 rounds them ~1e-2 apart, ~1e-7 of their scale
    path = tmp_path / "model.onnx"
    assert write_onnx(net.to(torch.bfloat16), path, 32)["onnx_checked"] < 1e-5

    class OffAtOtherSizes(torch.nn.Module):
        def forward(self, images):
            logits = net(images)
            return logits if images.shape[-1] == 32 else logits + 1e-2 * logits.abs().max()
    assert _check(net, path, 32) < 1e-5
    with pytest.raises(UserError, match="the ONNX model's logits differ from the network's by 0.0099 of their scale"):
        _check(OffAtOtherSizes(), path, 32)

    class DataDependent(torch.nn.Module):
        def forward(self, images):
            return images.mean((2, 3)) if images.sum() > 0 else images.amax((2, 3))
    with pytest.raises(UserError) as refused:
        write_onnx(DataDependent(), tmp_path / "other.onnx", 32)
    assert str(refused.value).startswith("torch's ONNX exporter could not export the model: TorchExportError: ")
    assert "\x1b" not in str(refused.value) and "\n" not in str(refused.value)
    monkeypatch.setitem(sys.modules, "onnx", None)  # as where it is not installed
    with pytest.raises(UserError, match=r"--onnx needs the onnx package\(s\), which torch's ONNX exporter uses"):
        check_available()
