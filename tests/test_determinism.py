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
