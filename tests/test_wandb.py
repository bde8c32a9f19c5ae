"""fastrsb train --wandb: the metrics rows in a real W&B run, offline (WANDB_MODE=offline keeps
it in the run folder: no network here), read back from the record files W&B writes for `wandb
sync`, with W&B's own protobuf messages."""
import json
import shutil
import struct
import sys
import time

import pytest

from conftest import assert_user_error, run_cli


@pytest.fixture(autouse=True)
def wandb_kept_here(monkeypatch, tmp_path):
    """W&B offline, its settings and caches under the test's folder (not the home folder's)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no stored API key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb
    wandb.teardown()  # W&B reads its settings once a process: this test's, read anew
    yield
    wandb.teardown()


def wandb_records(record_file) -> list:
    """The records of a W&B record file (run-ID.wandb): W&B's header, then records in 32 KiB
    blocks, each chunk headed by a CRC, its length and its kind (a whole record, or its first,
    middle or last part), each record a wandb_internal Record message."""
    from wandb.proto import wandb_internal_pb2
    raw, block, at, records, part = record_file.read_bytes(), 32768, 7, [], b""
    assert raw[:4] == b":W&B"
    while at + 7 <= len(raw):
        left = block - at % block
        crc, length, kind = struct.unpack("<IHB", raw[at:at + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # a block's zero padding
            at += left
            continue
        part += raw[at + 7:at + 7 + length]
        at += 7 + length
        if kind in (1, 4):  # a whole record, or its last part
            records.append(part)
            part = b""
    parsed = []
    for data in records:
        parsed.append(wandb_internal_pb2.Record())
        parsed[-1].ParseFromString(data)
    return parsed


def wandb_history(record_file, config: dict | None = None) -> list[dict]:
    """The history rows of a W&B record file; CONFIG, where given, gets the run's config."""
    rows = []
    for record in wandb_records(record_file):
        kind = record.WhichOneof("record_type")
        if config is not None and kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def _next_second() -> None:
    """Wait for the clock's next second. W&B names an offline part of a run by the second it began
    (offline-run-YYYYmmdd_HHMMSS-ID): a tiny run resumed within the second its last part began
    (on a fast day these tests train their steps in under one) writes into that part's folder and
    the test reads one part too few (CI at 2a1b1a6). A real run's parts are minutes apart."""
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.02)


def test_the_metrics_rows_go_to_one_wandb_run_across_resumes(tiny_data, tmp_path):
    """A run stopped and resumed twice, the last time from an older checkpoint (as after a crash:
    the rows after it are written again): one W&B run (one id, its parts in RUN_DIR/wandb), every
    metrics row in it once at its step (progress rows as train/, epoch rows as epoch/), no step
    sent twice; the resumes need no --wandb; another project for the run is refused."""
    out = tmp_path / "run"
    train = ("train", "tiny", "--data", tiny_data, "--out", out, "--device", "cpu", "--log-every", "2")
    said = run_cli(*train, "--wandb", "fastrsb-tests", "--stop-after-steps", "8").stdout
    state = json.loads((out / "wandb.json").read_text())
    assert state == {"project": "fastrsb-tests", "id": state["id"], "step": 8, "epoch_sent": False}
    assert f"W&B: run {state['id']} of project fastrsb-tests: offline, in {out / 'wandb'}/offline-run-" in said
    shutil.copy(out / "last.pt", tmp_path / "at-8.pt")
    _next_second()
    assert f"W&B: resumed run {state['id']}" in run_cli(*train, "--resume", "auto", "--stop-after-steps", "10").stdout
    assert_user_error(run_cli(*train, "--resume", "auto", "--wandb", "other", check=False),
                      f"{out} logs to the W&B project 'fastrsb-tests' (its run {state['id']}")
    _next_second()
    run_cli(*train, "--resume", tmp_path / "at-8.pt")  # rows from step 8 on written again
    listed = json.loads(run_cli("runs", out, "--json").stdout.splitlines()[0])
    assert listed["wandb"] == {"project": "fastrsb-tests", "id": state["id"]}  # fastrsb runs names it
    parts = sorted((out / "wandb").glob(f"offline-run-*-{state['id']}"))
    config = {}
    histories = [wandb_history(part / f"run-{state['id']}.wandb", config if not k else None)
                 for k, part in enumerate(parts)]
    # The recipe, and how the run was set up, as the W&B run's config.
    recipe = json.loads((out / "recipe.json").read_text())
    assert {key: config[key] for key in recipe} == recipe
    assert {key: config["run"][key] for key in ("processes", "device", "micro_batch", "train_images")} == \
        {"processes": 1, "device": "cpu", "micro_batch": 8, "train_images": 48}
    assert [[row["_step"] for row in history] for history in histories] == [[2, 4, 6, 8], [10], [12]]
    sent = {row["_step"]: row for history in histories for row in history}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        prefix = "train" if row["kind"] == "log" else "epoch"
        figures = {f"{prefix}/{key}": value for key, value in row.items()
                   if key not in ("kind", "step", "epoch") and isinstance(value, (int, float))}
        if row["step"] == 10:  # W&B has the second part's row; the third's, written again, has other timings
            figures = {key: figures[key] for key in ("train/loss", "train/lr")}  # and the same loss (exact resume)
        assert figures and {key: sent[row["step"]][key] for key in figures} == pytest.approx(figures)
        assert sent[row["step"]]["epoch"] == pytest.approx(row["epoch"])
    assert {row["kind"] for row in rows} == {"log", "epoch"}


def test_an_epoch_validated_after_a_resume_reaches_wandb(tiny_data, tmp_path):
    """An epoch trained whose validation failed (a truncated image, mended before the resume): its
    progress rows went to W&B before the stop, its epoch row comes after the resume, where W&B
    (online) is past its step: it is sent at the next step, not dropped."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = sorted((data / "val" / "n03_dots").glob("*.JPEG"))[2]  # in the last val batch (test_errors)
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 3])
    out = tmp_path / "run"
    train = ("train", "tiny", "--data", data, "--out", out, "--device", "cpu", "--log-every", "2")
    assert_user_error(run_cli(*train, "--wandb", "fastrsb-tests", check=False), "cannot decode", victim.name)
    victim.write_bytes(good)
    _next_second()
    run_cli(*train, "--resume", "auto")
    run_id = json.loads((out / "wandb.json").read_text())["id"]
    parts = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    first, second = (wandb_history(part / f"run-{run_id}.wandb") for part in parts)
    assert [row["_step"] for row in first] == [2, 4, 6] and not any("epoch/top1" in row for row in first)
    assert [row["_step"] for row in second] == [7, 8, 10, 12]
    epoch_1 = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["kind"] == "epoch")
    assert (second[0]["epoch"], second[0]["epoch/top1"]) == (1, pytest.approx(epoch_1["top1"]))


def test_a_run_started_again_from_scratch_logs_to_a_new_wandb_run(tiny_data, tmp_path):
    """--resume auto where the run left no checkpoint (killed before its first) starts again from
    step 0, and so does its W&B run: a new one, not the old one, whose steps it would repeat (W&B
    online drops a step it has had)."""
    out = tmp_path / "run"
    train = ("train", "tiny", "--data", tiny_data, "--out", out, "--device", "cpu", "--log-every", "2")
    run_cli(*train, "--wandb", "fastrsb-tests", "--stop-after-steps", "2")
    first = json.loads((out / "wandb.json").read_text())["id"]
    (out / "last.pt").unlink()  # as a run killed before its first checkpoint leaves its folder
    _next_second()
    said = run_cli(*train, "--resume", "auto", "--stop-after-steps", "2").stdout
    second = json.loads((out / "wandb.json").read_text())["id"]
    assert second != first and f"W&B: run {second} of project fastrsb-tests" in said and "resumed run" not in said


def test_wandb_out_of_reach_leaves_the_training_going(tiny_data, tmp_path, monkeypatch):
    """W&B that cannot start (online without an API key) is said once and the run trains on, its
    rows in metrics.jsonl; without the package, --wandb is refused before anything runs."""
    monkeypatch.setenv("WANDB_MODE", "online")
    out = tmp_path / "run"
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", out, "--device", "cpu", "--wandb", "fastrsb-tests")
    assert proc.stdout.count("W&B could not start (") == 1 and "training goes on without it" in proc.stdout
    assert "done: top1" in proc.stdout and not (out / "wandb.json").exists()
    monkeypatch.setitem(sys.modules, "wandb", None)  # as where the package is not installed
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / "other", "--device", "cpu", "--wandb", "x",
                   check=False)
    assert_user_error(proc, "whose package is not installed here: pip install 'fastrsb[wandb]'")
    assert not (tmp_path / "other").exists()


def test_the_command_line_imports_timm_without_wandb_and_wandb_where_asked():
    """`import timm` imports wandb where it is installed (timm.utils.summary: ~3 s a command here,
    and hooks on stdout): under the command line it does not (fastrsb.quiet_imports), and wandb
    itself still imports for --wandb (and for anyone else). In a process of its own: this one has
    imported both."""
    import subprocess
    code = ("import sys; from fastrsb.cli import main; main(['recipe', 'tiny', '--json']); import timm; "
            "print('wandb' in sys.modules, 'timm.utils.summary' in sys.modules); "
            "import fastrsb.wandb_log, wandb; print(wandb.__name__ in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines()[-2:] == ["False True", "True"]


def test_a_run_folders_wandb_record_is_read_or_refused_in_words(tmp_path, monkeypatch, capsys):
    """RUN_DIR/wandb.json: a resume refuses one that names no project and run id (it would log to
    a run it cannot name), or does not parse; `fastrsb runs` lists such a folder without its W&B
    run. WANDB_MODE=disabled: said, nothing sent and nothing kept."""
    from fastrsb.errors import UserError
    from fastrsb.wandb_log import WandbLog, project_of, run_of
    out = tmp_path / "run"
    out.mkdir()
    assert project_of(out, "asked") == "asked" and run_of(out) is None  # no W&B run yet
    (out / "wandb.json").write_text(json.dumps({"project": "p", "id": "abc123", "step": 4, "epoch_sent": True}))
    assert project_of(out, None) == "p" and run_of(out) == {"project": "p", "id": "abc123"}
    for text, said in ((json.dumps({"project": "p"}), "does not hold a W&B project and run id: remove it"),
                       (json.dumps({"project": "p", "id": 7}), "does not hold a W&B project and run id"),
                       ('{"project": "p", ', f"cannot read {out / 'wandb.json'} (the run's W&B run)")):
        (out / "wandb.json").write_text(text)
        with pytest.raises(UserError, match=said.replace("(", r"\(").replace(")", r"\)")):
            project_of(out, None)
        assert run_of(out) is None
    (out / "wandb.json").unlink()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    import wandb
    wandb.teardown()
    log = WandbLog(out, "fastrsb-tests", {"model": "resnet10t"}, continued=False)
    log.log([{"kind": "log", "step": 2, "epoch": 0.1, "loss": 1.0}])
    log.finish(failed=False)
    assert "W&B: disabled (WANDB_MODE=disabled): nothing is sent" in capsys.readouterr().out
    assert not (out / "wandb.json").exists() and not (out / "wandb").exists()


def test_a_row_wandb_does_not_take_is_said_once_and_a_failed_run_ends_so(tmp_path, capsys):
    """W&B failing to take rows (its service gone, say) is said once, however many rows follow,
    and wandb.json keeps the last step W&B took (none: a resume sends those rows again); a run that
    failed ends its W&B run with exit code 1 (W&B's record of it), a run that finished with 0."""
    from fastrsb.wandb_log import WandbLog
    for failed in (True, False):
        out = tmp_path / f"run-{failed}"
        out.mkdir()
        log = WandbLog(out, "fastrsb-tests", {"model": "resnet10t"}, continued=False)
        if failed:
            def refused(*args, **kwargs):
                raise ConnectionError("the W&B service is gone")
            log.run.log = refused
        for step in (2, 4):
            log.log([{"kind": "log", "step": step, "epoch": step / 6, "loss": 1.0}])
        run_id = log.run.id
        log.finish(failed=failed)
        said = capsys.readouterr().out
        assert said.count("W&B did not take a row (ConnectionError: the W&B service is gone)") == (1 if failed else 0)
        assert json.loads((out / "wandb.json").read_text())["step"] == (-1 if failed else 4)  # the last step sent
        (part,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
        exits = [record.exit.exit_code for record in wandb_records(part / f"run-{run_id}.wandb")
                 if record.WhichOneof("record_type") == "exit"]
        assert exits == [1 if failed else 0]


def test_a_wandb_record_of_before_epoch_sent_takes_its_last_step_as_sent_whole(tmp_path):
    """A wandb.json written before it kept "epoch_sent": its last step's rows are taken as sent,
    the epoch's too, so a resume sends the rows after it and not that epoch's row again."""
    from fastrsb.wandb_log import WandbLog
    out = tmp_path / "run"
    out.mkdir()
    (out / "wandb.json").write_text(json.dumps({"project": "fastrsb-tests", "id": "older1", "step": 6}))
    log = WandbLog(out, "fastrsb-tests", {"model": "resnet10t"}, continued=True)
    log.log([{"kind": "log", "step": 6, "epoch": 1.0, "loss": 1.0},
             {"kind": "epoch", "step": 6, "epoch": 1, "top1": 50.0},
             {"kind": "log", "step": 8, "epoch": 1.3, "loss": 0.5},
             {"kind": "log", "step": 10, "epoch": 1.7, "loss": 0.4}])
    log.finish(failed=False)
    (part,) = (out / "wandb").glob("offline-run-*-older1")
    # W&B writes a step's row when a later step comes, and the last at finish: a finish under load
    # once left that last row out of the record file (CI at a40e0d1, with a single row, step 8 here).
    # The rows that tell what was sent come before it.
    assert [row["_step"] for row in wandb_history(part / "run-older1.wandb")] in ([8, 10], [8])
