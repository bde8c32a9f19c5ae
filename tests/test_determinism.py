"""--deterministic and fastrsb compare: two runs with one seed are the same, batch by batch."""
import torch

from conftest import assert_user_error, run_cli
from fastrsb.checkpoint import load_checkpoint


def _run(data, out, *extra):
    return run_cli("train", "tiny", "--data", data, "--out", out, "--device", "cpu", "--deterministic",
                   "--log-every", "2", *extra)


def test_two_deterministic_runs_agree_and_another_seed_is_named(tiny_data, tmp_path):
    _run(tiny_data, tmp_path / "a", "--stop-after-steps", "6")  # the first epoch, validated, saved
    _run(tiny_data, tmp_path / "b", "--stop-after-steps", "6")
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    same = run_cli("compare", tmp_path / "a", tmp_path / "b")
    assert same.returncode == 0 and "agree: the same batches and losses at all 3 common logged steps" in same.stdout
    _run(tiny_data, tmp_path / "c", "--set", "seed=1", "--stop-after-steps", "2")
    other = run_cli("compare", tmp_path / "a", tmp_path / "c", check=False)
    assert other.returncode == 1 and "diverged at step 2: the batches differ" in other.stdout
    assert_user_error(run_cli("compare", tmp_path / "a", tmp_path / "nowhere", check=False), "no metrics.jsonl")


def _written_run(folder, rows, recipe=None, start=None):
    """A run folder of metrics rows written by hand (and its recipe.json, starts.jsonl where given)."""
    import json
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if recipe is not None:
        (folder / "recipe.json").write_text(json.dumps(recipe))
    if start is not None:
        (folder / "starts.jsonl").write_text(json.dumps(start) + "\n")
    return folder


def test_compare_names_the_step_where_the_losses_part_and_what_else_differs(tmp_path):
    """Written rows, no training: the same batches with another loss name its step (the batch's
    hash alike); runs without hashes are compared by loss alone and say so; an epoch's row is no
    log step; runs of no common step are refused; the recipes' and the first starts' differences
    are noted beside the verdict."""
    def log(step, loss, batch=None):
        return {"kind": "log", "step": step, "epoch": step / 10, "loss": loss,
                **({"batch_hash": batch} if batch else {})}
    epoch = {"kind": "epoch", "step": 4, "epoch": 1, "loss": 9.0, "top1": 50.0}  # no log step: its loss is not one
    start = {"fastrsb": "0.1.0", "commit": "abc", "torch": "2.14.1", "data": {"listing": "f1"}, "processes": 1}
    a = _written_run(tmp_path / "a", [log(0, 2.5, "aa"), log(2, 2.25, "bb"), epoch, log(4, 2.0, "cc")],
                     {"model": "resnet10t", "seed": 0}, start)
    b = _written_run(tmp_path / "b", [log(0, 2.5, "aa"), log(2, 2.25, "bb"), {**epoch, "loss": 8.0},
                                      log(4, 2.125, "cc")],
                     {"model": "resnet10t", "seed": 0}, {**start, "torch": "2.11.0"})
    proc = run_cli("compare", a, b, check=False)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        "diverged at step 4: the same batch, but the losses differ (2.0 vs 2.125)",
        "note: the runs' first starts differ in torch 2.14.1 / 2.11.0"]
    unhashed = _written_run(tmp_path / "u", [log(0, 2.5), log(2, 2.25), log(4, 2.0)], {"model": "resnet10t", "seed": 1})
    proc = run_cli("compare", a, unhashed)
    assert proc.stdout.splitlines() == [
        "agree: the same losses (no batch hashes: run with --deterministic to compare batches) at all 3 common "
        "logged steps (up to step 4)", "note: the runs' recipes differ in seed 0 / 1"]
    assert "diverged at step 2: the same batch (not hashed), but the losses differ (2.5 vs 2.25)" in run_cli(
        "compare", _written_run(tmp_path / "v", [log(0, 2.5), log(2, 2.5)]), unhashed, check=False).stdout
    other = _written_run(tmp_path / "o", [log(1, 2.5, "aa"), log(3, 2.25, "bb")])
    assert_user_error(run_cli("compare", a, other, check=False), "share no logged step (different --log-every?)")
