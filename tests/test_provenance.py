"""RUN_DIR/starts.jsonl: what made each start of a run (fastrsb.provenance), and `fastrsb compare`
naming what two runs' software and data differ in."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nvidia.dali
import pytest
import timm
import torch

from conftest import run_cli
from fastrsb.data_folder import open_dataset
from fastrsb.provenance import STARTS, read_starts, source_commit
from fastrsb.shards import listing_fingerprint

OTHER_TORCH = "2.0.0+cu118"  # a torch fastrsb never runs on (it needs 2.4 or later): never this one
TINY_RUN = ("--device", "cpu", "--set", "epochs=2", "--log-every", "1")


def test_every_start_is_recorded_with_its_command_software_and_data(tiny_data, tmp_path):
    """A run stopped and resumed: two lines, each with its command, the software it ran on, this
    machine and the data; the resume names the software that changed since the last start."""
    out = tmp_path / "run"
    first = ("train", "tiny", "--data", tiny_data, "--out", out, *TINY_RUN, "--stop-after-steps", "2")
    run_cli(*first)
    # As if the run had started under another torch: the resume says it goes on with another. And
    # as if a start had been killed while writing its line: the cut line is dropped.
    start = json.loads((out / STARTS).read_text())
    (out / STARTS).write_text(json.dumps({**start, "torch": OTHER_TORCH}) + "\n" + '{"started": "2026')
    resumed = run_cli("train", "tiny", "--data", tiny_data, "--out", out, *TINY_RUN, "--stop-after-steps", "4",
                      "--resume", "auto")
    assert (f"note: resumed with another setup than its last start's (torch {OTHER_TORCH} / {torch.__version__})"
            in resumed.stdout)
    starts = read_starts(out)
    assert len(starts) == 2 and starts[0]["torch"] == OTHER_TORCH
    starts[0]["torch"] = torch.__version__
    assert starts[0]["command"] == "fastrsb " + " ".join(map(str, first))
    assert starts[0]["resumed_at_step"] is None and starts[1]["resumed_at_step"] == 2
    assert starts[1]["command"].endswith("--stop-after-steps 4 --resume auto")
    for start in starts:
        assert (start["torch"], start["nvidia-dali"], start["timm"]) == (torch.__version__, nvidia.dali.__version__,
                                                                        timm.__version__)
        assert start["device"] == "cpu" and start["gpus"] == [] and start["processes"] == 1
        assert start["data"]["path"] == str(Path(tiny_data).resolve())
        assert (start["data"]["train_images"], start["data"]["val_images"], start["data"]["classes"]) == (48, 20, 4)
    # Each split's listing as the shard check fingerprints it (the start shares the train one).
    train_images, val_images = open_dataset(tiny_data)
    listings = {split: listing_fingerprint(images.files, images.labels)
                for split, images in (("train", train_images), ("val", val_images))}
    assert starts[0]["data"]["listing"] == starts[1]["data"]["listing"] == listings
    assert listings["train"] != listings["val"]


def test_the_same_data_copied_elsewhere_is_the_same_setup(tiny_data, tmp_path):
    """The data staged anew for a resumed job (a node's local disk, a job's scratch folder): the
    same listing, and so the same batches; the resume says where the data is read from now, not
    that the setup changed. A file taken out of the copy is another listing."""
    out, copy = tmp_path / "run", tmp_path / "scratch" / "job2" / "tiny"
    run_cli("train", "tiny", "--data", tiny_data, "--out", out, *TINY_RUN, "--stop-after-steps", "2")
    shutil.copytree(tiny_data, copy)
    resumed = run_cli("train", "tiny", "--data", copy, "--out", out, *TINY_RUN, "--stop-after-steps", "4",
                      "--resume", "auto").stdout
    assert "another setup" not in resumed
    assert f"note: the data is read from {copy} (the last start's: {Path(tiny_data).resolve()}): the same" in resumed
    first, second = read_starts(out)
    assert first["data"]["listing"] == second["data"]["listing"] and first["data"]["path"] != second["data"]["path"]
    train = open_dataset(copy)[0]
    assert listing_fingerprint(train.files[1:], train.labels[1:]) != second["data"]["listing"]["train"]
    moved = [f.replace(str(copy), str(tmp_path / "elsewhere")) for f in train.files]
    assert listing_fingerprint(moved, train.labels) == second["data"]["listing"]["train"]
    assert listing_fingerprint(train.files, [1 - y for y in train.labels]) != second["data"]["listing"]["train"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_commit_is_the_checkouts_and_none_elsewhere(tmp_path):
    """From this checkout: its HEAD (with "+changes" while code differs from it). A copy of the
    package lying untracked in another project's repository (a virtual environment inside it, say)
    has no commit of ours: None, not that project's."""
    package = Path(__file__).parent.parent / "fastrsb"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=package, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("fastrsb is not run from its git checkout here")
    assert source_commit().removesuffix("+changes") == head.stdout.strip()

    other = tmp_path / "project"
    shutil.copytree(package, other / "site" / "fastrsb", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    (other / "README").write_text("another project\n")
    subprocess.run(["git", "-C", str(other), "add", "README"], check=True)
    subprocess.run(["git", "-C", str(other), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
                   check=True)
    found = subprocess.run([sys.executable, "-c", "from fastrsb.provenance import source_commit as c; "
                            "import fastrsb; print(fastrsb.__file__, c())"],
                           cwd=other / "site", capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    path, commit = found.stdout.split()
    assert path.startswith(str(other)) and commit == "None", found.stderr


def test_compare_names_what_the_runs_software_differs_in(tiny_data, tmp_path):
    """Two runs that diverge, one of them (as if) on another torch, then with another recipe:
    compare says where they diverge and that torch and the recipe differ; runs that differ in
    nothing but their losses name nothing."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli("train", "tiny", "--data", tiny_data, "--out", a, *TINY_RUN, "--stop-after-steps", "3")
    shutil.copytree(a, b)
    rows = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    rows[1]["loss"] += 0.5
    (b / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    same = run_cli("compare", a, b, check=False)
    assert same.returncode == 1 and "diverged at step 2" in same.stdout and "note:" not in same.stdout

    start = json.loads((b / STARTS).read_text())
    (b / STARTS).write_text(json.dumps({**start, "torch": OTHER_TORCH}) + "\n")
    other = run_cli("compare", a, b, check=False)
    assert "diverged at step 2" in other.stdout
    assert f"note: the runs' first starts differ in torch {torch.__version__} / {OTHER_TORCH}" in other.stdout
    assert "recipes differ" not in other.stdout
    recipe = json.loads((b / "recipe.json").read_text())
    (b / "recipe.json").write_text(json.dumps({**recipe, "model": "resnet18", "lr": 0.5}))
    assert "note: the runs' recipes differ in lr 0.008 / 0.5; model resnet10t / resnet18" in \
        run_cli("compare", a, b, check=False).stdout
