"""Weights & Biases logging (`fastrsb train --wandb PROJECT`): every row of metrics.jsonl also
sent to a W&B run, as TensorBoard gets them (a progress row's figures as train/KEY, an epoch's as
epoch/KEY, at the row's optimizer step, and the epoch, fractional, to plot against), the recipe
as its config. Rank 0 sends; W&B's own files go under RUN_DIR/wandb.

The W&B run belongs to the run folder: its project and id are kept in RUN_DIR/wandb.json, so a
resumed run (`--resume auto`, a requeued job; `--wandb` need not be given again) continues the same
W&B run, and the rows a resumed run writes again (those after its checkpoint) are not sent twice,
W&B's steps going forward only. Without a network (a cluster's compute nodes): WANDB_MODE=offline
keeps the run in RUN_DIR/wandb for `wandb sync` later. W&B failing to start or to take a row does
not stop the training: it is said once, and metrics.jsonl keeps every row."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from fastrsb.errors import UserError
from fastrsb.metrics_log import replace_text, scalars

STATE_FILE = "wandb.json"  # {"project", "id", "step": the last step sent, "epoch_sent": its epoch row too}


def check_installed() -> None:
    """Refuse --wandb where the package is missing, before the run starts."""
    if importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb logs to Weights & Biases, whose package is not installed here: pip install "
                        "'fastrsb[wandb]' (or pip install wandb)")


def project_of(out: Path, asked: str | None) -> str | None:
    """The W&B project this run logs to: the one its folder's W&B run has (a resumed run), else
    ASKED. A resumed run asked to log to another project is refused: its W&B run is in one."""
    state = _read_state(out)
    if state is None:
        return asked
    if asked is not None and asked != state["project"]:
        raise UserError(f"{out} logs to the W&B project {state['project']!r} (its run {state['id']}, "
                        f"{out / STATE_FILE}): resume it without --wandb, or with --wandb {state['project']}")
    return state["project"]


def run_of(out: Path) -> dict | None:
    """The run folder's W&B run, {"project", "id"}, for `fastrsb runs`; None where it has none (or
    its wandb.json does not say: `fastrsb runs` lists runs, it does not judge them)."""
    try:
        state = _read_state(out)
    except UserError:
        return None
    return {"project": state["project"], "id": state["id"]} if state else None


def _read_state(out: Path) -> dict | None:
    try:
        state = json.loads((out / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {out / STATE_FILE} (the run's W&B run): {err}") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(key), str) for key in ("project", "id")):
        raise UserError(f"{out / STATE_FILE} does not hold a W&B project and run id: remove it to log to a new "
                        "W&B run")
    return state


class WandbLog:
    """The W&B run of a run folder (rank 0's), or nothing where it could not start."""

    def __init__(self, out: Path, project: str, config: dict, continued: bool):
        """config: the W&B run's (the recipe, and how the run was set up); continued: the run
        continues from a checkpoint, and so its W&B run (where it has one)."""
        self.out, self.run, self._said = out, None, False
        state = (continued and _read_state(out)) or {"project": project, "id": None, "step": -1, "epoch_sent": False}
        try:
            import wandb
            mode = wandb.setup().settings.mode  # WANDB_MODE, or `wandb offline`'s setting
            if mode == "disabled":
                print("W&B: disabled (WANDB_MODE=disabled): nothing is sent", flush=True)
                return
            offline = mode in ("offline", "dryrun")
            self.run = wandb.init(
                # Offline, W&B cannot look its run up: the same id, and `wandb sync --id` joins the parts.
                project=state["project"], name=out.name, id=state["id"],
                resume="allow" if state["id"] and not offline else None, dir=str(out), config=config,
                # fastrsb's own lines and train.log keep the console; W&B's banner would interleave them.
                settings=wandb.Settings(console="off", silent=True))
        except Exception as err:  # not logged in, no network without WANDB_MODE=offline, ...
            print(f"W&B could not start ({type(err).__name__}: {err}): training goes on without it; "
                  f"metrics.jsonl keeps every row (`wandb login`, or WANDB_MODE=offline and `wandb sync` later)",
                  flush=True)
            return
        self.state = {"project": state["project"], "id": self.run.id, "step": state.get("step", -1),
                      "epoch_sent": state.get("epoch_sent", True)}
        # A resumed W&B run takes steps after the last it has (online it drops the others).
        self._past_last = state["id"] is not None
        replace_text(out / STATE_FILE, json.dumps(self.state) + "\n")
        where = (f"offline, in {Path(self.run.settings.sync_dir)} (to upload every part of it: wandb sync --id "
                 f"{self.run.id} -p {state['project']} {out / 'wandb'}/offline-run-*-{self.run.id})" if offline
                 else self.run.url)
        print(f"W&B: {'resumed ' if state['id'] else ''}run {self.run.id} of project {state['project']}: {where}",
              flush=True)

    def log(self, rows: list[dict]) -> None:
        """Send ROWS (metrics.jsonl's), those W&B has not had."""
        if self.run is None:
            return
        try:
            for row in rows:
                step = self._step_for(row)
                if step is None:
                    continue
                self.run.log({**scalars(row), "epoch": row["epoch"]}, step=step)
                if row["step"] > self.state["step"]:
                    self.state.update(step=row["step"], epoch_sent=False)
                self.state["epoch_sent"] |= row["kind"] == "epoch"
                self._past_last = False
        except Exception as err:
            if not self._said:
                print(f"W&B did not take a row ({type(err).__name__}: {err}): training goes on; metrics.jsonl keeps "
                      "every row", flush=True)
            self._said = True
        replace_text(self.out / STATE_FILE, json.dumps(self.state) + "\n")

    def _step_for(self, row: dict) -> int | None:
        """The W&B step to send ROW at; None where W&B has it already (a resumed run writes the
        rows after its checkpoint again). An epoch's row comes at its last progress row's step;
        where a resume validates an epoch whose progress row went before the stop (its validation
        failed), W&B is past that step: the row goes at the next."""
        step, last = row["step"], self.state["step"]
        if step > last:
            return step
        if step == last and row["kind"] == "epoch" and not self.state["epoch_sent"]:
            return step + 1 if self._past_last else step
        return None

    def finish(self, failed: bool) -> None:
        """End the W&B run (a stopped run's too: a resume continues it)."""
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as err:
            print(f"W&B did not finish its run ({type(err).__name__}: {err})", flush=True)
        self.run = None
