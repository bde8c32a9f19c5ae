"""fastrsb doctor on this CPU machine: every check at once, exit 0 only when a run can start."""
import json
import shutil

from conftest import assert_user_error, run_cli
from fastrsb.doctor import builds_too_new


def test_doctor_passes_on_a_good_folder(tmp_path):
    data = tmp_path / "data"
    run_cli("data", "demo", data, "--classes", "2", "--train-per-class", "70", "--val-per-class", "2")
    proc = run_cli("doctor", "--data", data, "--out", tmp_path / "run")
    out = proc.stdout
    assert "no CUDA GPU visible" in out and "DALI 2.4" in out and "decodes on the CPU" in out
    assert "CPU cores" in out and "last.pt + best.pt need" in out
    assert "140 train / 4 val images in 2 classes: not ImageNet-1k's" in out
    assert "decode probe:" in out and "img/s" in out and out.rstrip().endswith("0 problem(s): a run can start")
    report = json.loads(run_cli("doctor", "--json").stdout)  # without --data: the machine's checks only
    assert report["ok"] and [c["name"] for c in report["checks"]] == ["gpu", "dali", "cpu", "disk"]


def test_doctor_names_every_problem_and_exits_2(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = sorted((data / "val" / "n01_vstripes").glob("*.JPEG"))[0]
    victim.write_bytes(b"")
    proc = run_cli("doctor", "--data", data, check=False)
    assert_user_error(proc, "1 problem(s)")
    assert f"FAIL  1 broken file(s): {victim} (empty file (0 bytes))" in proc.stdout
    assert_user_error(run_cli("doctor", "--data", tmp_path / "nowhere", check=False), "1 problem(s)")
    assert_user_error(run_cli("doctor", "--recipe", "a9", check=False), "no recipe 'a9'")


def test_cuda_builds_newer_than_the_driver_are_named():
    assert builds_too_new("12.4", {"torch": "13.0", "DALI": "13.0"}) == ["torch (CUDA 13.0)", "DALI (CUDA 13.0)"]
    assert builds_too_new("13.0", {"torch": "12.8", "DALI": "13.0"}) == []
    assert builds_too_new("12.2", {"torch": "12.8", "DALI": None}) == []  # minor-version compatibility
