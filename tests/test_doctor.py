"""fastrsb doctor on this CPU machine: every check at once, exit 0 only when a run can start."""
import importlib.metadata
import json
import shutil

import torch

import fastrsb

from conftest import assert_user_error, run_cli
from fastrsb.doctor import builds_too_new


def test_doctor_passes_on_a_good_folder(tmp_path):
    data = tmp_path / "data"
    run_cli("data", "demo", data, "--classes", "2", "--train-per-class", "70", "--val-per-class", "2")
    proc = run_cli("doctor", "--data", data, "--out", tmp_path / "run", "--recipe", "demo")
    out = proc.stdout
    assert "no CUDA GPU visible" in out and "DALI 2.4" in out and "decodes on the CPU" in out
    assert "CPU cores" in out and "last.pt + best.pt need" in out
    assert f"GiB free in {tmp_path} (where {tmp_path / 'run'} will be made); recipe demo's" in out  # said ".": where?
    assert "140 train / 4 val images in 2 classes: not ImageNet-1k's" in out
    assert "ok    the train set fills recipe demo's batch_size 64 (64 images a process over 1 process(es))" in out
    assert "decode probe:" in out and "img/s" in out and out.rstrip().endswith("0 problem(s): a run can start")
    assert "and augments as recipe demo does (no RandAugment)" in out
    report = json.loads(run_cli("doctor", "--json").stdout)  # without --data: the machine's checks only
    assert report["ok"] and [c["name"] for c in report["checks"]] == ["software", "gpu", "dali", "cpu", "disk"]
    # Recipe a3's (the default) train graph runs once, its RandAugment included, in the form a run takes.
    assert "augments as recipe a3 does (RandAugment rand-m6-mstd0.5-inc1, tree form)" in report["checks"][2]["text"]
    from fastrsb.doctor import dali_check  # A1's repeated views (3 an image) are in its graph too
    assert "augments as recipe a1 does (RandAugment rand-m7-mstd0.5-inc1, tree form, 3 views an image)" in \
        dali_check("cpu", "a1").text
    assert f"fastrsb {fastrsb.__version__}" in out and f"torch {torch.__version__}, torchvision" in out


def test_doctor_fails_where_dali_cannot_run_the_recipes_train_graph(monkeypatch):
    """A DALI operator the machine cannot run (a library its DALI lacks: NPP, say) fails the
    doctor, as it would fail the run's start; the recipe's augmentation reaches the loader."""
    import fastrsb.pipelines
    asked = {}

    def failing_loader(root, batch_size, img_size, **options):
        asked.update(options)
        raise RuntimeError("Error in GPU operator `nvidia.dali.fn.equalize`: libnppc.so.13: cannot open shared object")
    monkeypatch.setattr(fastrsb.pipelines, "train_loader", failing_loader)
    proc = run_cli("doctor", "--recipe", "a1", check=False)
    assert_user_error(proc, "1 problem(s)")
    assert ("FAIL  DALI could not decode and augment as recipe a1 does on the cpu: RuntimeError: Error in GPU operator "
            "`nvidia.dali.fn.equalize`: libnppc.so.13") in proc.stdout
    assert (asked["aa"], asked["aa_impl"], asked["interpolation"], asked["repeats"]) == (
        "rand-m7-mstd0.5-inc1", "auto", "random", 3)


def test_doctor_names_every_problem_and_exits_2(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = sorted((data / "val" / "n01_vstripes").glob("*.JPEG"))[0]
    victim.write_bytes(b"")
    proc = run_cli("doctor", "--data", data, check=False)  # recipe a3 by default: a batch of 2,048
    assert_user_error(proc, "2 problem(s)")
    assert f"FAIL  1 broken file(s): {victim} (empty file (0 bytes))" in proc.stdout
    assert ("FAIL  recipe a3: the 48 train images (48 a process over 1) do not fill one optimizer step of "
            "batch_size 2048") in proc.stdout  # as `fastrsb train a3` would refuse to start
    assert_user_error(run_cli("doctor", "--data", tmp_path / "nowhere", check=False), "1 problem(s)")
    # The run folder's place, as `fastrsb train` would refuse it: a file, or inside train/ or val/.
    (tmp_path / "a-file").write_text("")
    proc = run_cli("doctor", "--out", tmp_path / "a-file", check=False)
    assert_user_error(proc, "1 problem(s)")
    assert f"FAIL  the run folder {tmp_path / 'a-file'} is a file: a folder goes there" in proc.stdout
    proc = run_cli("doctor", "--data", data, "--out", data / "val" / "run", "--recipe", "tiny", check=False)
    assert f"FAIL  the run folder {data / 'val' / 'run'} lies inside the data's val/ folder" in proc.stdout
    assert_user_error(run_cli("doctor", "--recipe", "a9", check=False), "no recipe 'a9'")


def test_a_file_that_does_not_decode_fails_the_decode_probe(tmp_path):
    """A JPEG cut short passes the header scan; the decode probe (the train loader over the data)
    fails on it, and a run could not start: a failure, not a warning."""
    data = tmp_path / "data"
    run_cli("data", "demo", data, "--classes", "2", "--train-per-class", "70", "--val-per-class", "2")
    victim = sorted((data / "train").glob("*/*.JPEG"))[5]
    victim.write_bytes(victim.read_bytes()[:300])
    proc = run_cli("doctor", "--data", data, "--recipe", "demo", check=False)
    assert_user_error(proc, "1 problem(s)")
    assert "ok    every file of train/ and val/ starts as an image should" in proc.stdout
    assert "FAIL  decode probe failed: " in proc.stdout


def test_a_warning_is_said_and_does_not_stop_a_run():
    """A check that fails but is not fatal (too few cores a GPU, a slow decode probe) is a warning:
    said, and a run can still start (exit 0)."""
    from fastrsb.doctor import Check, report
    text, data = report([Check("disk", True, "room"), Check("cpu", False, "few cores", fatal=False)])
    assert text.splitlines() == ["ok    room", "warn  few cores", "0 problem(s): a run can start"] and data["ok"]
    text, data = report([Check("disk", False, "no room"), Check("cpu", False, "few cores", fatal=False)])
    assert text.splitlines()[-1] == "1 problem(s): a run cannot start" and not data["ok"]


def test_machines_on_other_software_are_named_as_a_warning():
    """A job whose machines run other versions (one node's environment upgraded): a warning naming
    the machine and its line, beside the first machine's."""
    from fastrsb.doctor_cluster import same_software_check

    def machine(node, line):
        return {"node": node, "checks": [{"name": "software", "text": line}, {"name": "gpu", "text": "GPU 0"}]}
    check = same_software_check([machine(0, "fastrsb 0.1.0, torch 2.11.0"), machine(1, "fastrsb 0.1.0, torch 2.11.0"),
                                 machine(2, "fastrsb 0.1.0, torch 2.14.1")])
    assert not check.ok and not check.fatal
    assert check.text == ("the machines run different software: machine 0: fastrsb 0.1.0, torch 2.11.0; "
                          "machine 2: fastrsb 0.1.0, torch 2.14.1")


def test_the_jobs_report_counts_failures_and_says_warnings(monkeypatch, tmp_path):
    """doctor under torchrun: a warning, a machine's (few cores) or the job's (machines on other
    software), is said as one and lets a run start (the job's failed the doctor before); a machine's
    failed check stops it; a machine whose checks raise, or which cannot list the data, is a failed
    check in the report, not a hang of the others."""
    from dataclasses import asdict
    from fastrsb.doctor import Check
    from fastrsb import doctor_cluster
    from fastrsb.doctor_cluster import problems, report_cluster, same_data_check, same_software_check

    def machine(node, host, ranks, *checks):
        return {"node": node, "host": host, "ranks": ranks, "listing": None, "checks": [asdict(c) for c in checks]}
    machines = [machine(0, "a", [0, 1], Check("software", True, "torch 2.11.0"),
                        Check("cpu", False, "few cores", fatal=False)),
                machine(1, "b", [2], Check("software", True, "torch 2.14.1"))]
    job = [same_software_check(machines), Check("all-reduce", True, "summed")]
    assert problems(machines, job) == 0
    text, data = report_cluster(problems(machines, job) == 0, machines, job)  # the verdict as the job takes it
    assert text.splitlines() == [
        "machine 0 (a, ranks 0-1):", "  ok    torch 2.11.0", "  warn  few cores", "machine 1 (b, rank 2):",
        "  ok    torch 2.14.1",
        "warn  the machines run different software: machine 0: torch 2.11.0; machine 1: torch 2.14.1",
        "ok    summed", "0 problem(s) on 2 machine(s): a run can start"]
    assert data["problems"] == 0
    machines[1]["checks"].append(asdict(Check("disk", False, "no room")))
    assert problems(machines, job) == 1 and problems(machines, job + [Check("all-reduce", False, "wrong")]) == 2

    def broken(*args):
        raise OSError("the disk went away")
    monkeypatch.setattr(doctor_cluster, "run_doctor", broken)
    (stopped,) = doctor_cluster._machine_checks(None, None, "tiny", None)
    assert not stopped.ok and stopped.fatal and stopped.text == "the checks stopped: OSError: the disk went away"
    assert doctor_cluster._listing(str(tmp_path / "nothing")) is None  # its machine's own check says why
    unlisted = same_data_check(machines)
    assert not unlisted.ok and unlisted.text == "no machine could list the data folder (above)"


def test_an_all_reduce_that_sums_wrong_fails_the_job(monkeypatch):
    """The all-reduce check compares the sum with what every rank sent: a wrong one (here the first
    all-reduce's, in a one-process gloo group) fails the check in words, not only its time."""
    from types import SimpleNamespace
    import torch.distributed as dist
    from fastrsb.doctor_cluster import all_reduce_check
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sums, real = [], dist.all_reduce

        def first_one_wrong(tensor, *args, **kwargs):
            work = real(tensor, *args, **kwargs)
            if not sums:
                tensor += 1
            sums.append(1)
            return work
        monkeypatch.setattr(dist, "all_reduce", first_one_wrong)
        check = all_reduce_check(SimpleNamespace(rank=0, world=1), "cpu", "tiny")
        assert not check.ok and check.text.startswith("all-reduce across 1 processes (gloo): resnet10t's gradients")
        assert check.text.endswith(": the sum came out wrong on at least one process")
        monkeypatch.setattr(dist, "all_reduce", real)
        assert all_reduce_check(SimpleNamespace(rank=0, world=1), "cpu", "tiny").ok
    finally:
        dist.destroy_process_group()


def test_cuda_builds_newer_than_the_driver_are_named():
    assert builds_too_new("12.4", {"torch": "13.0", "DALI": "13.0"}) == ["torch (CUDA 13.0)", "DALI (CUDA 13.0)"]
    assert builds_too_new("13.0", {"torch": "12.8", "DALI": "13.0"}) == []
    assert builds_too_new("12.2", {"torch": "12.8", "DALI": None}) == []  # minor-version compatibility
    # The versions compared, as NVML gives the driver's and DALI's package names its build's.
    from fastrsb.doctor import _dali_cuda, cuda_version, dali_package_cuda
    assert [cuda_version(n) for n in (13000, 12040, 12080, 11080)] == ["13.0", "12.4", "12.8", "11.8"]
    assert [dali_package_cuda(f"nvidia-dali-cuda{n}") for n in (130, 120, 110)] == ["13.0", "12.0", "11.0"]
    installed = [d.metadata["Name"].lower() for d in importlib.metadata.distributions()
                 if (d.metadata["Name"] or "").lower().startswith("nvidia-dali-cuda")]
    assert _dali_cuda() == dali_package_cuda(installed[0])


def test_the_cpu_check_counts_the_loaders_threads_by_its_rule(monkeypatch):
    """doctor's thread count is the loader's (at most 8 a process, the cores shared by the
    processes on the machine: one a GPU, or torchrun's LOCAL_WORLD_SIZE), and under 4 cores a GPU
    is a warning, not a failure. Here as on a 32-core machine."""
    from fastrsb.doctor import cpu_check
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    said = {gpus: cpu_check(gpus) for gpus in (0, 8, 16)}
    assert said[0].text == "32 CPU cores; the loader takes 8 thread(s) per process (1 process(es))" and said[0].ok
    assert said[8].text == "32 CPU cores; the loader takes 4 thread(s) per process (8 process(es))" and said[8].ok
    assert said[16].text.startswith("32 CPU cores; the loader takes 2 thread(s) per process (16 process(es)): under 4 "
                                    "cores per GPU the loader's CPU stages may starve the GPUs")
    assert not said[16].ok and not said[16].fatal
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # torchrun's count wins: here one core a process
    assert cpu_check(8).text.startswith("32 CPU cores; the loader takes 1 thread(s) per process (32 process(es)):")


def _doctor_as_two_machines(tmp_path, *args) -> tuple[list[str], list[int]]:
    """`fastrsb doctor` under torchrun as on two machines of one process each (node ranks 0 and 1,
    a static rendezvous on this host), each in a working folder of its own (its copy of the data).
    The rendezvous port was free a moment before; taken meanwhile, the launch is tried again."""
    for _ in range(3):
        outputs, codes = _doctor_as_two_machines_once(tmp_path, *args)
        if not any("address already in use" in output.lower() for output in outputs):
            break
    return outputs, codes


def _doctor_as_two_machines_once(tmp_path, *args) -> tuple[list[str], list[int]]:
    import socket
    import subprocess
    import sys
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "-m", "fastrsb", "doctor", *map(str, args)],
                              cwd=tmp_path / f"machine{node}", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for node in (0, 1)]
    try:
        outputs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    return [out + err for out, err in outputs], [proc.returncode for proc in procs]


def test_doctor_under_torchrun_reports_every_machine_and_the_all_reduce(tiny_data, tmp_path):
    """Two machines whose copies of the data differ by one validation image (a copy cut short):
    each machine's own checks pass, and rank 0's report says the copies differ, beside the
    all-reduce of the recipe's gradient size; both processes exit 2 (rank 1 silently)."""
    for node in (0, 1):
        (tmp_path / f"machine{node}").mkdir()
        shutil.copytree(tiny_data, tmp_path / f"machine{node}/data")
    sorted((tmp_path / "machine1/data/val").glob("*/*.JPEG"))[-1].unlink()
    outputs, codes = _doctor_as_two_machines(tmp_path, "--data", "data", "--recipe", "tiny")
    rank0, rank1 = outputs
    assert codes == [1, 1] and all("exitcode  : 2" in out for out in outputs), outputs  # torchrun says 1 for 2
    assert "machine 0 (" in rank0 and ", rank 0):" in rank0 and ", rank 1):" in rank0
    machine0, machine1 = rank0.split("\nmachine 1 (", 1)
    assert "48 train / 20 val images in 4 classes" in machine0 and "48 train / 19 val images" in machine1
    assert "FAIL  the machines' copies of the data differ: machine 1 (48 train / 19 val) against machine 0's " \
           "48 train / 20 val files" in rank0, rank0
    # tiny's resnet10t (5.4 M parameters at ImageNet's 1,000 classes), all-reduced by gloo, the sum
    # checked on every process.
    assert "ok    all-reduce across 2 processes (gloo): resnet10t's gradients (5.4 M float32 values" in rank0
    assert "ok    every machine runs the same software (2 machine(s))" in rank0
    assert "1 problem(s) on 2 machine(s): a run cannot start" in rank0
    assert "fastrsb: error: 1 problem(s)" in rank0 and "fastrsb: error" not in rank1 and "machine 0" not in rank1


def test_doctor_with_two_processes_on_one_machine_checks_it_once(tiny_data, tmp_path):
    """`fastrsb doctor --nproc 2`: the processes a run would start (fastrsb.launch, which torchrun's
    are like), one machine checked once with the options given (the run folder, the kept epochs),
    and the all-reduce between them."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "fastrsb", "doctor", "--data", tiny_data, "--recipe", "tiny",
                           "--json", "--nproc", "2", "--out", tmp_path / "runs" / "a", "--keep-every", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # rank 0's one object; rank 1 prints nothing
    (machine,) = report["machines"]
    assert machine["ranks"] == [0, 1] and [c["name"] for c in machine["checks"]].count("dali") == 1
    (disk,) = [c["text"] for c in machine["checks"] if c["name"] == "disk"]
    assert f"in {tmp_path} (where {tmp_path / 'runs' / 'a'} will be made)" in disk
    assert "recipe tiny's last.pt + best.pt + 1 kept epoch(s) (--keep-every 1)" in disk
    (cpu,) = [c["text"] for c in machine["checks"] if c["name"] == "cpu"]
    assert cpu.endswith("per process (2 process(es))")  # the processes on this machine share its cores
    (batch,) = [c["text"] for c in machine["checks"] if c["name"] == "batch"]  # the batch split as the run splits it
    assert batch == "the train set fills recipe tiny's batch_size 8 (4 images a process over 2 process(es))"
    same, software, collective = report["job"]
    assert report["ok"] and report["problems"] == 0 and same["ok"] and software["ok"] and collective["ok"]
    assert software["text"] == "every machine runs the same software (1 machine(s))"
    assert same["text"].startswith("every machine lists the same 48 train / 20 val files with the same labels")


def test_the_disk_check_counts_the_kept_epochs(tmp_path, monkeypatch):
    """doctor --keep-every N sizes the kept epochs a run will leave (every N-th and the last, which
    is last.pt's file) beside last.pt and best.pt: A3's 100 epochs with --keep-every 10 keep 10,
    9 of them files of their own. A recipe that keeps an EMA has a fourth copy of the weights in
    each (beside the weights and LAMB's two moments)."""
    import re
    from fastrsb.doctor import kept_epochs
    from fastrsb.recipe import builtin_path
    assert [kept_epochs(100, 10), kept_epochs(100, 30), kept_epochs(12, 1), kept_epochs(3, 5)] == [10, 4, 12, 1]

    def disk(*more):
        checks = json.loads(run_cli("doctor", "--json", *more).stdout)["checks"]
        text = next(c["text"] for c in checks if c["name"] == "disk")
        return text, float(re.search(r"need ([0-9.]+) GiB", text).group(1))
    plain, need = disk()
    kept, need_kept = disk("--keep-every", "10")
    assert "recipe a3's last.pt + best.pt need" in plain
    assert "recipe a3's last.pt + best.pt + 9 kept epoch(s) (--keep-every 10) need" in kept
    assert need_kept == round(need * 11 / 2, 2) or abs(need_kept - need * 11 / 2) < 0.01
    # doctor asks for twice what the checkpoints need: less fails.
    from collections import namedtuple
    from fastrsb.doctor import disk_check
    usage = namedtuple("usage", "total used free")
    for free, ok in ((1.5, False), (2.5, True)):
        monkeypatch.setattr("shutil.disk_usage", lambda path, free=free: usage(0, 0, int(free * need * 2**30)))
        check = disk_check(tmp_path, "a3")
        assert check.ok == ok and check.text.endswith(": free some space or choose another --out") != ok
    monkeypatch.undo()
    with_ema = tmp_path / "a3-ema.toml"
    with_ema.write_text(builtin_path("a3").read_text().replace("model_ema = false", "model_ema = true"))
    assert abs(disk("--recipe", str(with_ema))[1] - need * 4 / 3) < 0.01
