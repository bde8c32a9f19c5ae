"""The loaders in other people's loops: examples/plain_loop.py, lightning_train.py (through
fastrsb.integrations.lightning) and accelerate_train.py, each trained a few steps on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _run(cmd, cwd):
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")], proc.stdout


def test_plain_loop(tiny_data, monkeypatch, capsys):
    import runpy
    monkeypatch.setattr(sys, "argv", ["plain_loop.py", "--data", str(tiny_data), "--max-steps", "3", "--batch-size", "8"])
    runpy.run_path(str(EXAMPLES / "plain_loop.py"), run_name="__main__")  # as `python examples/plain_loop.py`
    stdout = capsys.readouterr().out
    assert "3 steps" in stdout and "of 20 val images" in stdout


def test_accelerate_two_processes(tiny_data, tmp_path):
    lines, _ = _run([*TWO, EXAMPLES / "accelerate_train.py", "--data", tiny_data, "--max-steps", 4, "--batch-size", 8],
                    tmp_path)
    (summary,) = lines
    assert summary["shards"] == [[0, 2], [1, 2]]  # disjoint parts of the data (DALI shards of one shuffle)
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["val_images"] == 20  # every val image once over both processes


def _lightning(tmp_path, *args):
    sys.path.insert(0, str(EXAMPLES))
    import lightning_train
    lightning_train.main(list(map(str, args)))


def test_lightning_resumes_with_the_next_batch(tiny_data, tmp_path, capsys):
    """Stopped at step 3 and resumed from Lightning's checkpoint, the run sees exactly the batches
    an uninterrupted run sees (steps 3-7), not the epoch's first again; and each validation
    counts all 20 images although the sanity check left a pass after 2 batches."""
    common = ["--data", tiny_data, "--batch-size", 8, "--max-steps", 8]
    _lightning(tmp_path, *common, "--out", tmp_path / "whole", "--batch-log", tmp_path / "whole.log")
    whole = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert whole["steps"] == 8 and whole["val_images"] == 20
    stopped = ["--data", tiny_data, "--batch-size", 8, "--out", tmp_path / "part", "--batch-log", tmp_path / "part.log"]
    _lightning(tmp_path, *stopped, "--max-steps", 3, "--ckpt-every", 3)
    _lightning(tmp_path, *stopped, "--max-steps", 8, "--resume", tmp_path / "part" / "step=3.ckpt")
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    assert read("part.log") == read("whole.log")  # steps 0-2, then 3-7 after the resume: the same batches
    assert [row["step"] for row in read("part.log")] == list(range(8))


def test_lightning_two_processes(tiny_data, tmp_path):
    """With repeated views exchanged between the processes (Lightning's process group is up by the
    time the DataModule builds its loaders)."""
    lines, _ = _run([sys.executable, EXAMPLES / "lightning_train.py", "--data", tiny_data, "--devices", 2,
                     "--batch-size", 8, "--max-steps", 3, "--out", tmp_path / "run", "--batch-log", tmp_path / "b.log",
                     "--repeats", 2, "--spread-views"], tmp_path)
    assert lines[-1]["world_size"] == 2 and lines[-1]["val_images"] == 20  # each val image once over 2 ranks
    rows = [json.loads(line) for line in (tmp_path / "b.log").read_text().splitlines()]
    assert sorted({(row["rank"], tuple(row["shard"])) for row in rows}) == [(0, (0, 2)), (1, (1, 2))]
    assert all(row["spread_views"] for row in rows)


def test_datamodule_refuses_another_world_size(tiny_data):
    import lightning as L
    from fastrsb.integrations.lightning import DaliDataModule
    data = DaliDataModule(tiny_data, batch_size=8, img_size=32, world_size=2)
    data.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    with pytest.raises(ValueError, match="world_size=2.*1 process"):
        data.setup("fit")
    without_trainer = DaliDataModule(tiny_data, batch_size=8, img_size=32)
    with pytest.raises(RuntimeError, match=r"trainer.fit\(model, datamodule=...\)"):
        without_trainer.setup("fit")  # an AttributeError on None before


def test_datamodule_builds_its_loaders_once_and_as_asked(tiny_data):
    """setup() again (a second trainer.fit, a validate after the fit) keeps the loaders it built,
    and with them the train loader's place in its epoch and its pipelines (built anew they would
    start the epoch again and hold a second set of buffers); the loaders are built with the seed
    and the validation crop asked, on the trainer's device."""
    import lightning as L
    from fastrsb.integrations.lightning import DaliDataModule
    data = DaliDataModule(tiny_data, batch_size=8, img_size=32, val_img_size=40, crop_pct=0.8, seed=5)
    data.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    data.setup("fit")
    train, val = data.train_dataloader(), data.val_dataloader()
    next(iter(train))
    data.setup("fit")
    data.setup("validate")
    assert data.train_dataloader() is train and data.val_dataloader() is val
    assert train.settings["seed"] == 5 and train.settings["img_size"] == 32 and val.settings["img_size"] == 40
    from fastrsb.pipelines import val_loader
    cropped = val_loader(tiny_data / "val", 8, 40, 0.8, device="cpu")
    assert torch.equal(next(iter(val))[0], next(iter(cropped))[0])  # the crop asked, not the default's
