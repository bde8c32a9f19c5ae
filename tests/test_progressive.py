"""Progressive resizing (fastrsb.progressive): FFCV's ramp of crop sizes, the loader's crops
resized between epochs where its stream stands, and a run that trains, stops and resumes across
the sizes as one that does not stop."""
import json

import numpy as np
import pytest
import torch

from conftest import assert_user_error, run_cli
from fastrsb import progressive
from fastrsb.checkpoint import load_checkpoint
from fastrsb.pipelines import train_loader
from fastrsb.recipe import load_recipe


def _ffcv_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """FFCV's ImageNet example's get_resolution (ffcv-imagenet train_imagenet.py), epochs from 0."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0] / 32)) * 32


@pytest.mark.parametrize("small,big,start,end,epochs", [(160, 192, 65, 76, 88),  # FFCV's rn50_88_epochs.yaml
                                                        (96, 160, 40, 85, 100), (128, 224, 0, 7, 8)])
def test_sizes_are_ffcvs_ramp(small, big, start, end, epochs):
    """FFCV counts epochs from 0, fastrsb from 1: its ramp from start to end is fastrsb's from
    start + 1 to end + 1."""
    recipe = load_recipe("a3", [f"img_size={big}", f"ramp_img_size={small}", f"ramp_start_epoch={start + 1}",
                                f"ramp_end_epoch={end + 1}", f"epochs={epochs}"])
    got = [progressive.size_at(recipe, epoch) for epoch in range(1, epochs + 1)]
    assert got == [_ffcv_resolution(epoch, small, big, end, start) for epoch in range(epochs)]
    runs = progressive.sizes(recipe)
    assert runs[0][0] == 1 and runs[0][1] >= start + 1 and runs[-1][1:] == (epochs, big) and len({s for *_, s in runs}) == len(runs)
    assert progressive.pixel_share(recipe) == pytest.approx(np.mean(np.square(got)) / big**2)


def test_off_in_the_rsb_recipes_and_said_on_the_card():
    for name in ("a1", "a2", "a3"):
        recipe = load_recipe(name)
        assert recipe["ramp_img_size"] is None and progressive.sizes(recipe) == [(1, recipe["epochs"], recipe["img_size"])]
    a3 = load_recipe("a3", ["ramp_img_size=96", "ramp_start_epoch=40", "ramp_end_epoch=85"])
    assert progressive.describe(a3) == ("100 epochs: 1-51 at 96 px, 52-73 at 128 px, 74-100 at 160 px "
                                        "(progressive resizing: 0.59 of the pixels)")
    timm = run_cli("recipe", "a3", "--timm", "--set", "ramp_img_size=96", "--set", "ramp_start_epoch=40",
                   "--set", "ramp_end_epoch=85").stdout
    assert "timm's train.py has no progressive resizing: it trains every epoch at 160 px" in timm
    # The time left: each epoch ahead at its size's pace; a size not yet trained, from one size
    # measured, at its pace scaled by the pixels, from two or more on a line in the pixels.
    ahead = progressive.train_seconds_ahead
    assert ahead(a3, 51, {96: 10.0}) == pytest.approx(10 * (22 * (128 / 96) ** 2 + 27 * (160 / 96) ** 2))
    assert ahead(a3, 73, {96: 10.0, 128: 15.0}) == pytest.approx(27 * (15 + 5 * (160**2 - 128**2) / (128**2 - 96**2)))
    assert progressive.pace_at(160, {96: 10.0, 128: 15.0, 144: 15.0 + 5 * (144**2 - 128**2) / (128**2 - 96**2)}) == \
        pytest.approx(15 + 5 * (160**2 - 128**2) / (128**2 - 96**2))  # three on one line: that line
    assert progressive.pace_at(160, {96: 10.0, 128: 9.0}) == pytest.approx(9 * (160 / 128) ** 2)  # no slope to trust
    assert ahead(a3, 72.5, {96: 10.0, 128: 15.0, 160: 30.0}) == pytest.approx(0.5 * 15 + 27 * 30)
    assert ahead(load_recipe("a3"), 10, {160: 8.0}) == 720


@pytest.mark.parametrize("sets,words", [
    (["ramp_img_size=160"], "'ramp_img_size' (160) must lie between 0 and img_size (160)"),
    (["ramp_img_size=100", "ramp_start_epoch=1", "ramp_end_epoch=9"], "'ramp_step' (32) must be a positive divisor of "
                                                                      "img_size - ramp_img_size (160 - 100 = 60)"),
    (["ramp_img_size=128", "ramp_start_epoch=9", "ramp_end_epoch=9"], "0 <= ramp_start_epoch < ramp_end_epoch <= "
                                                                      "epochs, not 9, 9 of 100"),
    (["ramp_img_size=128", "ramp_start_epoch=50", "ramp_end_epoch=101"], "not 50, 101 of 100"),
])
def test_a_ramp_that_cannot_be_run_is_refused(sets, words):
    assert_user_error(run_cli("recipe", "a3", *[a for s in sets for a in ("--set", s)], check=False), words)


def _batches(loader, count):
    return [tuple(x.clone() for x in batch) for _, batch in zip(range(count), loader)]


@pytest.mark.parametrize("aa,aa_impl", [(None, "auto"), ("rand-m9-mstd0.5-inc1", "tree"),
                                        ("rand-m9-mstd0.5-inc1", "torch")])
def test_a_resized_loader_goes_on_as_one_restored_at_the_new_size(tiny_data, aa, aa_impl):
    """resize() between epochs: the next epoch's images and labels as the loader would have read
    them, at the new size, the crops' and RandAugment's draws going on: pixel for pixel what a
    loader started at that size from the position gives (the resume path), and the labels of the
    loader that was not resized."""
    options = dict(batch_size=8, device="cpu", seed=5, aa=aa, aa_impl=aa_impl, num_threads=1)
    resized = train_loader(tiny_data / "train", img_size=32, **options)
    kept = train_loader(tiny_data / "train", img_size=32, **options)
    _batches(resized, len(resized)), _batches(kept, len(kept))
    restored = train_loader(tiny_data / "train", img_size=48, state=resized.state_dict(), **options)
    resized.resize(48)
    assert resized.settings["img_size"] == 48 and resized.state_dict()["fingerprint"]["img_size"] == 48
    got, want, same_labels = (_batches(x, len(resized)) for x in (resized, restored, kept))
    for (images, labels), (images_r, labels_r), (_, labels_k) in zip(got, want, same_labels):
        assert images.shape == (8, 3, 48, 48) and images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images, images_r) and torch.equal(labels, labels_r) and torch.equal(labels, labels_k)
    resized.resize(48)  # at its size: nothing to do, the stream goes on
    assert torch.equal(_batches(resized, 1)[0][1], _batches(restored, 1)[0][1])


def _rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "epoch"]


RAMP = ["epochs=3", "ramp_img_size=16", "ramp_start_epoch=1", "ramp_end_epoch=3", "ramp_step=8",
        "aa=rand-m9-mstd0.5-inc1", "drop_path=0.1"]


def _train(data, out, *more):
    sets = [a for s in RAMP for a in ("--set", s)]
    return run_cli("train", "tiny", "--data", data, "--out", out, "--device", "cpu", *sets, *more)


@pytest.fixture(scope="module")
def ramped(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ramped")
    _train(tiny_data, out, "--log-every", "2")
    return out


def test_a_run_trains_each_epoch_at_its_size(ramped):
    assert [(row["epoch"], row["img_size"]) for row in _rows(ramped)] == [(1, 16), (2, 24), (3, 32)]
    # Each epoch at a new size compiles anew on a GPU: its pace (what the time left is estimated
    # from) is taken after its first progress line, as the first epoch's.
    assert all(row["train_seconds_steady"] is not None for row in _rows(ramped))
    log = (ramped / "train.log").read_text()
    assert "3 epochs: 1 at 16 px, 2 at 24 px, 3 at 32 px (progressive resizing: 0.60 of the pixels), tested at 40 px" in log
    assert "epoch 2: crops of 24 px from here (progressive resizing)" in log
    assert "epoch 3: crops of 32 px from here (progressive resizing)" in log
    from fastrsb.plot import panels, read_metrics
    titles = [title for title, _, _ in panels(*read_metrics(ramped))]
    assert "images/s per process (16/24/32 px from epochs 1/2/3)" in titles  # its figures move with the size
    assert "wrote" in run_cli("plot", ramped).stdout


@pytest.mark.parametrize("stop_at", [6, 8])  # the end of epoch 1 (16 px; the next at 24); two steps into epoch 2
def test_stopped_and_resumed_across_the_sizes_equals_uninterrupted(tiny_data, tmp_path, ramped, stop_at):
    """A resumed run opens its loader at the size of the epoch it continues, from the position
    saved at another size, and ends with the weights of the run that did not stop."""
    stopped = _train(tiny_data, tmp_path, "--stop-after-steps", stop_at).stdout
    assert ("stopped after epoch 1" if stop_at == 6 else f"stopped at step {stop_at}") in stopped
    if stop_at == 6:  # `fastrsb runs`' time to go: epochs 2 and 3 at epoch 1's pace, scaled by their pixels
        first = _rows(tmp_path)[0]
        pace = first.get("train_seconds_steady") or first["train_seconds"]
        listed = json.loads(run_cli("runs", tmp_path, "--json").stdout)
        assert listed["time_left_seconds"] == pytest.approx(pace * ((24 / 16) ** 2 + (32 / 16) ** 2)
                                                            + 2 * first["val_seconds"])
    assert "epoch 3: crops of 32 px from here" in _train(tiny_data, tmp_path, "--resume", "auto").stdout
    left, right = load_checkpoint(ramped / "last.pt"), load_checkpoint(tmp_path / "last.pt")
    assert left["step"] == right["step"] == 18
    for key, value in left["model"].items():
        assert torch.equal(value, right["model"][key]), key
    measured = ("images_per_sec", "train_seconds", "train_seconds_steady", "val_seconds", "data_wait",
                "peak_memory_gib", "peak_torch_gib")
    assert [{k: v for k, v in r.items() if k not in measured} for r in _rows(ramped)] == \
        [{k: v for k, v in r.items() if k not in measured} for r in _rows(tmp_path)]



def test_each_crop_size_compiles_a_static_graph_of_its_own(monkeypatch):
    """Dynamo by default compiles the second shape it meets with symbolic sizes, so that the
    graphs of the later sizes (the final size's epochs) are made for any size; wrap_model compiles
    each size static, with the recompile limit raised for a ramp of more sizes than dynamo's 8.
    (A backend that records what dynamo hands it, in place of inductor's compile.)"""
    from fastrsb.distributed import Dist
    from fastrsb.step import wrap_model
    graphs = []

    def recording(graph, example_inputs):
        graphs.append([tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)])
        return graph.forward
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: compile_(model, backend=recording, **options))
    torch._dynamo.reset()
    model = wrap_model(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), Dist(), "cpu", True, shapes=12)
    config = torch._dynamo.config
    assert getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 0)) >= 14
    sizes = (8, 12, 16)
    for size in sizes:
        model(torch.randn(2, 3, size, size))
    torch._dynamo.reset()
    inputs = [shape for graph in graphs for shape in graph if len(shape) == 4 and shape[0] == 2]  # not the weight
    assert sorted(inputs) == [(2, 3, size, size) for size in sizes]
    assert all(isinstance(n, int) for shape in inputs for n in shape)  # no symbolic size


def test_two_processes_resize_together(tiny_data, tmp_path):
    """Under torchrun each rank resizes its own shard's loader at the same epochs (the size is the
    epoch's), and the ranks train in step: the trainer compares their weights after every epoch."""
    import os
    import subprocess
    import sys
    sets = [a for s in RAMP for a in ("--set", s)]
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fastrsb", "train", "tiny", "--device", "cpu", "--threads", "1", "--data",
                           str(tiny_data), "--out", str(tmp_path / "run"), *sets],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TMPDIR": str(temp)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(row["epoch"], row["img_size"]) for row in _rows(tmp_path / "run")] == [(1, 16), (2, 24), (3, 32)]
    assert proc.stdout.count("crops of 24 px from here") == 1  # rank 0 says it
