"""A run's state and its folder: what a checkpoint holds, saved and restored side by side, and
the metrics rows. RUN_DIR holds recipe.json, starts.jsonl, metrics.jsonl, last.pt and best.pt
(rank 0 writes).

A checkpoint is enough to continue bit for bit on the same number of processes: weights,
optimizer, GradScaler, EMA, and for every process its loader position, its random streams and its
loss sum so far in the epoch. On another number it continues all but the data order and the random
streams (_resharded_position), as it does from loader positions an earlier fastrsb wrote."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastrsb import __version__
from fastrsb.checkpoint import (KEPT, is_kept, kept_checkpoints, link_best, link_checkpoint, load_checkpoint, load_weights,
                                remove_partial_saves, save_checkpoint)
from fastrsb.checkpoint_writer import CheckpointWriter, host_copy
from fastrsb.distributed import Dist, broadcast_from_main, gather_to_main, stop_together
from fastrsb.errors import StoppedWithAnother, UserError
from fastrsb.metrics_log import append_rows, read_rows, replace_text, rewrite_rows, scalars
from fastrsb.parts import Run
from fastrsb.provenance import source_commit
from fastrsb.recipe import ADDED_KEYS, SPEED_ONLY


@dataclass
class Position:
    """Where a run is. The loop advances it; a checkpoint saves it."""
    epoch: int = 0  # epochs trained
    step: int = 0  # optimizer steps taken
    micro_done: int = 0  # micro-batches of the epoch under way already trained (a stop mid-epoch)
    loss_sum: float = 0.0  # this rank's summed loss over those micro-batches
    seconds: float = 0.0  # training seconds of the epoch under way before the stop
    validated: bool = True  # False: epoch `epoch` is trained and saved but not yet validated
    best_top1: float = -1.0
    metrics: dict = field(default_factory=dict)  # the last epoch's row (training figures only if not validated)
    # The peak memory figures of the epoch under way before this process's part of it (a stop
    # mid-epoch, then a resume: fastrsb.peak_memory.merged); None where the epoch began in this process.
    peak: dict | None = None


def find_resume(resume: str | None, out: Path) -> Path | None:
    """--resume auto: RUN_DIR/last.pt if there is one; --resume PATH: that file."""
    if resume is None:
        return None
    if resume == "auto":
        return out / "last.pt" if (out / "last.pt").is_file() else None
    return Path(resume)


def load_for_resume(path: Path, recipe: dict, classes: list[str], d: Dist) -> dict:
    """The checkpoint at `path`, refused with a clear message if this run cannot continue it."""
    state = load_checkpoint(path)
    saved = {**ADDED_KEYS, **state["recipe"]}
    # Where views are neither repeated nor on several processes, where they go changes nothing.
    spread_inert = recipe["aug_repeats"] <= 1 or d.world == 1
    differ = [f"{k} {saved.get(k)!r} -> {recipe[k]!r}" for k in recipe
              if k != "name" and k not in SPEED_ONLY and saved.get(k) != recipe[k]
              and not (k == "aug_repeats_across_ranks" and spread_inert)]
    if differ:
        # More epochs is another schedule (its cosine reaches min_lr later), not a continuation;
        # training on from the weights is what initial_checkpoint is for.
        longer = (f"; to train on from its weights with the new schedule: --set initial_checkpoint={path} and a new "
                  "--out" if any(item.startswith("epochs ") for item in differ) else "")
        raise UserError(f"{path} was trained with another recipe ({'; '.join(differ[:4])}): resume with the "
                        f"same recipe and --set values, or start a new --out{longer}")
    if state["classes"] != classes:
        differ = _class_difference(state["classes"], classes)
        raise UserError(f"{path} was trained on other classes than the data's ({differ}): its outputs are those "
                        "classes, in that order; resume on the data it was trained on")
    if "ranks" not in state:
        what = " (a mean of checkpoints: fastrsb average)" if "averaged_from" in state else ""
        raise UserError(f"{path} holds weights only{what}, no optimizer and loader state: it cannot be resumed; a new "
                        f"run starts from its weights with --set initial_checkpoint={path}")
    return state


def _class_difference(saved: list[str], classes: list[str]) -> str:
    """How the classes a checkpoint was trained on differ from the data's, in a few words: as many
    classes under other names is as wrong as a class missing (output i would train as another class)."""
    saved_set, data_set = set(saved), set(classes)
    only_saved = [name for name in saved if name not in data_set]
    only_data = [name for name in classes if name not in saved_set]
    counts = f"the checkpoint's {len(saved):,}, the data's {len(classes):,}"
    if not only_saved and not only_data:
        return f"{counts}, in another order"
    named = [f"only in the checkpoint: {', '.join(only_saved[:3])}" if only_saved else "",
             f"only in the data: {', '.join(only_data[:3])}" if only_data else ""]
    return f"{counts}; {'; '.join(part for part in named if part)}"


def resharded(state: dict, d: Dist) -> bool:
    """Whether a checkpoint was written by another number of processes than this run has."""
    return len(state["ranks"]) != d.world


def listed_before(state: dict) -> int | None:
    """The number of train images the checkpoint's loaders listed (None where it did not say)."""
    return state["ranks"][0]["loader"].get("fingerprint", {}).get("images")


def loaders_start_anew(state: dict, d: Dist, images: int) -> bool:
    """Whether this run's loaders, over `images` train images, cannot continue the checkpoint's
    positions: it was written by another number of processes, by loaders over another number of
    images (files added or removed since: a broken one taken out, say), or by an earlier fastrsb
    whose loaders cut their batches otherwise (pipelines.loader.POSITION_FORMAT)."""
    from fastrsb.pipelines import continues_exactly
    return (resharded(state, d) or listed_before(state) not in (None, images)
            or not all(continues_exactly(rank["loader"]) for rank in state["ranks"]))


def loader_start(state: dict | None, recipe: dict, d: Dist, images: int) -> tuple[dict | None, int]:
    """(this rank's loader position, the train loaders' seed) for a run over `images` train images
    starting from `state` (None: a new run: no position, the recipe's seed). On the number of
    processes and images the checkpoint was written with: its position and seed, to continue
    exactly. On another number, no position fits the new shards (nor does one an earlier fastrsb
    wrote): the loaders start anew, seeded by the checkpoint's step, so that the rest of the run
    draws a fresh order and fresh augmentations rather than replaying its first epoch's."""
    if state is None:
        return None, recipe["seed"]
    if not loaders_start_anew(state, d, images):
        return state["ranks"][d.rank]["loader"], state.get("loader_seed", recipe["seed"])
    return None, recipe["seed"] + state["step"] + 1


def resume_state(resume: str | None, out: Path, recipe: dict, classes: list[str], d: Dist
                 ) -> tuple[Path | None, dict | None]:
    """(path, state) of the checkpoint this run continues from, or (None, None). Rank 0 alone
    finds and reads it and sends it to every rank: only rank 0 writes the run folder, so that is
    where the checkpoint is. A multi-node run whose --out is a folder on rank 0's machine alone
    resumes as one on a shared file system (before, the other machines' ranks found no
    checkpoint there and started from scratch, out of step with rank 0), and N processes do not
    read one file N times. A checkpoint that rank 0 refuses stops every rank."""
    found, error = (None, None), None
    if d.main:
        try:
            path = find_resume(resume, out)
            found = (path, load_for_resume(path, recipe, classes, d) if path else None)
        except UserError as err:
            error = err
    if d.on:
        refused, *found = broadcast_from_main((error is not None, *found), d)
    if error is not None or (d.on and refused):
        raise error or StoppedWithAnother("rank 0 cannot resume from the checkpoint (its message says why)")
    return tuple(found)


def _rank_state(run: Run, pos: Position) -> dict:
    """What differs per process."""
    t = run.training
    return {"loader": run.train_data.state_dict(), "mixer": t.mixer.state_dict() if t.mixer else None,
            "torch_rng": torch.get_rng_state(), "epoch_loss_sum": pos.loss_sum,
            **({"cuda_rng": torch.cuda.get_rng_state()} if run.device == "cuda" else {})}


def save_run(run: Run, pos: Position, folder: RunFolder, best: bool = False, keep: bool = False) -> None:
    """Write RUN_DIR/last.pt (and best.pt; with keep, the epoch kept where --keep-every keeps it).
    Collective: every rank calls it (each sends its own part to rank 0). Rank 0 copies the state
    to host memory here and its folder's writer writes it beside the training
    (fastrsb.checkpoint_writer), after the save before, whose failure (a full disk) stops every
    rank here; finish_saves waits for the last one. Checkpoints only, so the copy's host syncs do
    not matter."""
    ranks = gather_to_main(_rank_state(run, pos), run.d)
    error = None
    if run.d.main:
        try:
            folder.writer.wait()
            snapshot = host_copy(_snapshot(run, pos, ranks))
            epoch, epochs = pos.epoch, run.recipe["epochs"]
            folder.writer.submit(lambda: _write(snapshot, folder, best, epoch if keep else None, epochs))
        except UserError as err:
            error = err
    stop_together(error, run.d, "saving the checkpoint")


def finish_saves(run: Run, folder: RunFolder) -> None:
    """Collective: returns once rank 0's last checkpoint is on disk; its failure stops every rank."""
    error = None
    if run.d.main:
        try:
            folder.writer.wait()
        except UserError as err:
            error = err
    stop_together(error, run.d, "saving the checkpoint")


def _snapshot(run: Run, pos: Position, ranks: list) -> dict:
    t = run.training
    partial = {"micro_done": pos.micro_done, "seconds": pos.seconds, "peak": pos.peak} if pos.micro_done else None
    return {"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(), "scaler": t.scaler.state_dict(),
            "epoch": pos.epoch, "step": pos.step, "partial": partial, "validated": pos.validated,
            "grad_accum_steps": run.schedule.grad_accum_steps, "micro_batch": run.micro,
            "ranks": ranks, "best_top1": pos.best_top1, "recipe": run.recipe, "classes": run.classes,
            "metrics": pos.metrics, "loader_seed": run.loader_seed, "version": __version__,
            "commit": source_commit(), **({"ema": t.ema.state_dict()} if t.ema else {})}


def _write(snapshot: dict, folder: RunFolder, best: bool, kept_epoch: int | None, epochs: int) -> None:
    """On the writer's thread: last.pt, then best.pt as a hard link to it (the same bytes: no
    second write; last.pt's next save is a new file, so best.pt keeps these), then the kept epoch."""
    save_checkpoint(snapshot, folder.out / "last.pt")
    if best:
        link_best(folder.out / "last.pt", folder.out / "best.pt")
    if kept_epoch is not None:
        folder.keep(kept_epoch, epochs)


def restore_run(run: Run, state: dict, path: Path) -> Position:
    """Load a checkpoint into the run's parts (the loader got its position when it was built) and
    return the position to continue from. A checkpoint of another number of processes continues
    too (_resharded_position), not bit for bit (resharded_note says so), as does one whose loader
    positions an earlier fastrsb wrote."""
    t = run.training
    load_weights(t.model, state["model"], str(path))
    t.optimizer.load_state_dict(state["optimizer"])
    t.scaler.load_state_dict(state["scaler"])
    if t.ema:
        t.ema.load_state_dict(state["ema"])
    ranks = state["ranks"]
    rank = ranks[run.d.rank] if run.d.rank < len(ranks) else None
    if rank is not None:  # a rank the checkpoint has: its own random streams
        if t.mixer:
            t.mixer.load_state_dict(rank["mixer"])
        # After the model's random initialisation, which drew from the torch RNG.
        torch.set_rng_state(rank["torch_rng"])
        if run.device == "cuda" and "cuda_rng" in rank:
            torch.cuda.set_rng_state(rank["cuda_rng"])
    partial = state.get("partial") or {}
    pos = Position(epoch=state["epoch"], step=state["step"], micro_done=partial.get("micro_done", 0),
                   loss_sum=rank["epoch_loss_sum"] if partial and rank is not None else 0.0,
                   seconds=partial.get("seconds", 0.0), validated=state.get("validated", True),
                   best_top1=state.get("best_top1", -1.0), metrics=state.get("metrics", {}),
                   peak=partial.get("peak", {}) if partial else None)  # {}: written before 2026-12-04, unknown
    anew = loaders_start_anew(state, run.d, len(run.train_data.images))
    return _resharded_position(run, state, pos) if anew else pos


def _resharded_position(run: Run, state: dict, pos: Position) -> Position:
    """The position of a checkpoint of M processes, for this run of N: the same step, epoch and
    steps into the epoch (in this run's micro-batches, at least one step left to take), the new
    loaders told how far into their epoch they are, and the epoch's loss so far carried as its
    mean (rank 0 holds it all). Weights, optimizer and EMA continue exactly, the LR schedule from
    the same point of the epoch (Schedule.lr: this run's steps an epoch may differ from the
    checkpoint's); the data order, the augmentations and the mixing draws do not (ranks the
    checkpoint lacks start theirs anew)."""
    saved, world, schedule = len(state["ranks"]), run.d.world, run.schedule  # M, N
    if pos.micro_done:
        steps_done = min(-(-pos.micro_done // state["grad_accum_steps"]), schedule.steps_per_epoch - 1)
        mean = sum(r["epoch_loss_sum"] for r in state["ranks"]) / (pos.micro_done * saved)
        pos.micro_done = steps_done * schedule.grad_accum_steps
        pos.loss_sum = mean * pos.micro_done * world if run.d.main else 0.0
        run.train_data.continue_epoch_at(pos.micro_done)
    return pos


def resharded_note(run: Run, state: dict) -> str:
    """What a run whose loaders start anew (loaders_start_anew) says, and why."""
    saved, images, before = len(state["ranks"]), len(run.train_data.images), listed_before(state)
    if saved != run.d.world:
        why, unlike = f"resumed on {run.d.world} process(es) from a checkpoint of {saved}", f"on {saved}"
    elif before not in (None, images):
        why = (f"resumed over {images:,} train images where the checkpoint's loaders listed {before:,} (files added "
               "or removed since)")
        unlike = "over the images it had"
    else:
        why = ("resumed from a checkpoint whose loader positions an earlier fastrsb wrote (its loaders cut their "
               "batches otherwise)")
        unlike = "it would have"
    return (f"{why}: weights, optimizer, EMA and schedule continue exactly; the data order, augmentations and mixing "
            f"draws start anew from here (loader seed {run.loader_seed}), so the run does not go on bit for bit as "
            f"{unlike}")


# timm's summary.csv columns (timm.utils.update_summary: epoch, train_*, eval_*, lr).
SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")


class RunFolder:
    """RUN_DIR's recipe.json, metrics.jsonl (every row), summary.csv (an epoch a row, timm's
    columns) and, where the `tensorboard` package is installed, TensorBoard event files under
    RUN_DIR/tensorboard (starts.jsonl is fastrsb.provenance's); the rows also go to the run's W&B
    run where it has one (wandb_project: fastrsb.wandb_log; its config the recipe, and FACTS under
    "run"). Rank 0 writes; the other ranks' calls do nothing."""

    def __init__(self, out: Path, recipe: dict, d: Dist, resumed: Position | None = None,
                 wandb_project: str | None = None, facts: dict | None = None, keep_every: int | None = None):
        self.out, self.main, self.board, self.wandb, self.keep_every = out, d.main, None, None, keep_every
        self.saved: tuple[Path, str] | None = None  # the run's newest checkpoint and where it stands (train.py)
        self.writer = CheckpointWriter()  # rank 0's checkpoints, written beside the training (save_run)
        self._pending: list[dict] = []  # rows not yet written (the disk was full)
        self._failing = False
        if not self.main:
            return
        out.mkdir(parents=True, exist_ok=True)
        files, size = remove_partial_saves(out)
        if files:
            print(f"removed {files} partial checkpoint file(s) ({size / 1e6:,.1f} MB) left in {out} by a save "
                  "that was killed", flush=True)
        replace_text(out / "recipe.json", json.dumps(recipe, indent=2) + "\n")
        metrics = out / "metrics.jsonl"
        if resumed is not None and metrics.is_file():
            # Rows written after the checkpoint are written again, and so is the epoch row of an
            # epoch the checkpoint had not validated yet.
            def kept(row: dict) -> bool:
                return row["step"] < resumed.step or (row["step"] == resumed.step and
                                                       (resumed.validated or row["kind"] != "epoch"))
            rewrite_rows(metrics, [row for row in read_rows(metrics) if kept(row)])
        if resumed is not None:
            self._drop_kept_after(resumed)
        self._write_summary()
        if wandb_project:
            from fastrsb.wandb_log import WandbLog
            # A run started again from step 0 (no checkpoint) starts a new W&B run, as its rows are new.
            self.wandb = WandbLog(out, wandb_project, {**recipe, "run": facts or {}},
                                  continued=resumed is not None and resumed.step > 0)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed (pip install "fastrsb[tensorboard]")
            return
        # purge_step: on resume, events written after the checkpoint's step are dropped, as metrics rows are.
        self.board = SummaryWriter(str(out / "tensorboard"), purge_step=resumed.step + 1 if resumed else None)

    def keep(self, epoch: int, epochs: int) -> None:
        """With keep_every: RUN_DIR/last.pt, just saved at EPOCH's end, kept as epoch-NNN.pt where
        EPOCH is a multiple of keep_every or the last (timm's train.py keeps its --checkpoint-hist
        best epochs instead, checkpoint-N.pth.tar): a hard link (no room taken until the next save
        writes last.pt as a new file), else a copy. One that cannot be kept (a full disk) is said,
        and the run goes on."""
        if not (self.main and self.keep_every and is_kept(epoch, epochs, self.keep_every)):
            return
        kept = self.out / KEPT.format(epoch)
        try:
            link_checkpoint(self.out / "last.pt", kept)
        except OSError as err:
            print(f"note: could not keep epoch {epoch}'s checkpoint as {kept} ({err.strerror}): the run goes on",
                  flush=True)

    def _drop_kept_after(self, resumed: Position) -> None:
        """A resumed run trains again from its checkpoint: the epochs kept after it belong to the run
        it no longer is (one resumed from an earlier checkpoint, say) and go, as their metrics rows
        do; each is kept again once the run gets there."""
        after = [(epoch, path) for epoch, path in kept_checkpoints(self.out).items()
                 if epoch > resumed.epoch or (epoch == resumed.epoch and not resumed.validated)]
        for _, path in after:
            path.unlink(missing_ok=True)
        if after:
            print(f"removed {len(after)} kept checkpoint(s) of epochs after the one resumed from "
                  f"({', '.join(path.name for _, path in after)})", flush=True)

    def log(self, row: dict) -> None:
        """Append a row. A write that fails (a full disk) does not stop the run: the row is kept
        and written with the next one that can be, and the failure is said once. (A full disk
        stops the run at its next checkpoint, cleanly, on every rank: run_state.save_run.)"""
        if not self.main:
            return
        self._pending.append(row)
        try:
            append_rows(self.out / "metrics.jsonl", self._pending)
        except OSError as err:
            self._write_failed(err)
            return
        if self._failing:
            print(f"{self.out} can be written to again: {len(self._pending)} kept metrics row(s) written", flush=True)
        written, self._pending, self._failing = self._pending, [], False
        if any(r["kind"] == "epoch" for r in written):
            try:
                self._write_summary()
            except OSError as err:  # rewritten whole from metrics.jsonl with the next epoch row
                self._write_failed(err)
        if self.board is not None:
            for r in written:
                for name, value in scalars(r).items():
                    self.board.add_scalar(name, value, r["step"])
            self.board.flush()
        if self.wandb is not None:
            self.wandb.log(written)

    def close(self, failed: bool) -> None:
        """The end of this process's part of the run: its last checkpoint written (where the run
        failed otherwise, a failed write is said beside that failure), its W&B run finished (a
        resume continues it)."""
        try:
            self.writer.wait()
        except Exception as err:  # beside the failure that ends the run, not in its place
            print(f"fastrsb: error: {err}", flush=True)
        if self.wandb is not None:
            self.wandb.finish(failed)

    def _write_failed(self, err: OSError) -> None:
        if not self._failing:
            print(f"could not write to {self.out} ({err.strerror or err}): training goes on; the metrics rows "
                  "are kept and written once it can be written to", flush=True)
        self._failing = True

    def _write_summary(self) -> None:
        """summary.csv from the epoch rows of metrics.jsonl: rewritten whole (replace_text: a kill
        meanwhile leaves the last one), so it matches the metrics after a resume too. Its eval_
        figures are the EMA's where the run keeps one, as timm's train.py writes them."""
        metrics = self.out / "metrics.jsonl"
        rows = read_rows(metrics) if metrics.is_file() else []
        lines = [",".join(SUMMARY_COLUMNS)]
        for r in rows:
            if r["kind"] == "epoch":
                ema = "ema_" if "ema_top1" in r else ""
                values = (r["epoch"], r["train_loss"], r[f"{ema}val_loss"], r[f"{ema}top1"], r[f"{ema}top5"], r["lr"])
                lines.append(",".join(str(v) for v in values))
        replace_text(self.out / "summary.csv", "\n".join(lines) + "\n")
