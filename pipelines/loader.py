"""Loaders that any PyTorch trainer can iterate: `for images, labels in train_loader(...)`.

images: (B, 3, H, W) ImageNet-normalized, channels-last, on the device the pipeline ran on:
float16 on the GPU, float32 on the CPU, unless `dtype` says otherwise. labels: (B,) int64 on the
same device.
"""
from __future__ import annotations

import collections
import contextlib
import numbers
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .cuda_graphs import CapturedCall
from .image_list import DatasetError, ImageList, list_images
from .graphs import PIXEL_DTYPES, READER_NAME, train_pipeline, val_pipeline
from .randaugment import INTERPOLATIONS, parse_rand_augment
from .spread_views import spread, views_to_spread


# The profiler range around the loader's work in the consumer's thread (the torch RandAugment
# form): benchmarks/profile_summary.py counts the kernels launched inside it as the loader's.
AUGMENT_RANGE = "fastrsb.loader: RandAugment (torch form)"


class DaliLoader:
    """Wraps the DALI pipelines of one shard. Train loaders drop the last partial batch (fixed
    shapes: no torch.compile recompiles, the same number of steps on every rank); validation
    loaders return every image of the shard exactly once, the last batch short, and every `iter()`
    starts a pass at the first image (a pass left early, such as a sanity check of 2 batches,
    does not carry over into the next).

    A train loader is a continuous stream cut into epochs of `len(loader)` batches: breaking out
    of an epoch and iterating again continues where it stopped, and `state_dict()` /
    `load_state_dict()` (or `train_loader(..., state=...)`) save and restore that position exactly
    (DALI checkpointing: reader position and the random state of every augmentation).

    The stream is made of the readers' epochs, each one reshuffle of the shard: the full batches
    of it, as timm's drop-last makes them, equally many on every rank; the rest of the reshuffle,
    short and padded by the readers, is read and skipped, so that the next reshuffle starts a
    batch. An epoch is as many samples as the shard has images (len(data set) over the ranks, as
    timm's samplers count it), floor(shard / batch_size) batches: without repeated augmentation,
    exactly a readers' epoch; with R views of each image, a readers' epoch spans about R loader
    epochs.

    A train loader may run several pipelines, each on its own part of the shard (CPU loaders: 2,
    see train_loader), each making whole batches: they take turns, and the short rests of their
    parts, joined, make the reshuffle's last batches (as many as one pipeline over the shard
    would make: floor(pipelines x smallest part / batch)). They run concurrently in DALI's own
    threads, whichever batch Python asks for.

    Batches are not overwritten by later ones: a batch kept while the next ones are fetched (a
    prefetching trainer) holds its own memory."""

    def __init__(self, build: Callable[[list | None], list], images: ImageList, batch_size: int, train: bool,
                 repeats: int = 1, fingerprint: dict | None = None, state: dict | None = None,
                 settings: dict | None = None, augment: Callable | None = None, augment_stream: bool = False,
                 stream_handover: bool = False, spread: tuple[int, int] | None = None,
                 remake: Callable[[int], tuple[Callable, Callable | None]] | None = None):
        """build(checkpoints or None) -> the DALI pipelines, started from those DALI checkpoints.
        remake(img_size) -> (build, augment) at another crop size (train loaders: resize()).
        fingerprint: what a saved position must match; settings: more to report, not to match.
        augment: (uint8 NHWC images, draws) -> the batch's images, for pipelines that hand over
        their views unaugmented with a third output, "draws" (torch_augment.TorchRandAugment).
        augment_stream: take each batch over and augment it on a CUDA stream of the loader's own
        (_OwnStream). stream_handover: each GPU batch bound to the CUDA stream current where it is
        taken (_share_outputs_on). spread: (rank, world) to exchange repeated views with
        (spread_views.py)."""
        self.images = images
        self.batch_size = batch_size
        self.train = train
        self.repeats = repeats
        self._build = build
        self._fingerprint = fingerprint or {}
        self._settings = {**{key: value for key, value in self._fingerprint.items() if key not in ("images", "format")},
                          **(settings or {})}
        self._val_pass_open = False  # a validation pass was started and not finished
        self._augment = augment
        self._own_stream = _OwnStream() if augment_stream else None
        self._stream_handover = stream_handover
        self._spread = spread
        self._remake = remake
        self._in_use = _UntilRun()
        self._start(state)

    def _start(self, state: dict | None) -> None:
        # Training: FILL hands over every batch the readers make, each reshuffle's padded last one
        # included, and _next_parts skips that one itself. (DROP would leave the skipping to DALI's
        # iterator, which leaves the batch unread where a part is one image longer than the smallest
        # and the smallest fills its batches exactly: the next epoch would then start with it.)
        policy = LastBatchPolicy.FILL if self.train else LastBatchPolicy.PARTIAL
        pipes = self._build(state["dali"] if state else None)
        outputs = ["images", "labels"] + (["draws"] if self._augment else [])
        # The iterators read their first batches as they are made, on the stream current now; with
        # stream_handover each batch is bound to the stream current where it is taken, so the first
        # waits until then.
        with _undecodable_named(), _shut_down_on_failure(lambda: pipes):
            self._iterators = [DALIGenericIterator(pipe, outputs, reader_name=READER_NAME,
                                                   last_batch_policy=policy, auto_reset=True,
                                                   prepare_first_batch=not self._stream_handover) for pipe in pipes]
        if self._stream_handover:
            for pipe in pipes:
                device = torch.device("cuda", pipe.device_id)
                _share_outputs_on(pipe, lambda device=device: torch.cuda.current_stream(device))
        if not self.train:
            self._steps = len(self._iterators[0])
            return
        # A reshuffle, the same on every part of every shard (DALI's parts differ by an image at
        # most): each pipeline's `_fulls` whole batches of the smallest part, taken in turns, then
        # the `_tail` images left of it at the start of each one's next batch, joined into
        # `_tails` batches; the rest of its `_reads` batches a reshuffle (padded to the largest
        # part's) is skipped.
        reader, self._batch_images = pipes[0].reader_meta(READER_NAME), pipes[0].max_batch_size
        part = reader["epoch_size"] // reader["number_of_shards"]
        self._fulls, self._tail = divmod(part, self._batch_images)
        self._tails = len(pipes) * self._tail // self._batch_images
        self._reads = -(-reader["epoch_size_padded"] // reader["number_of_shards"] // self._batch_images)
        self._takes = len(pipes) * self._fulls + self._tails  # floor(pipelines x part / batch)
        if self._takes < 1:  # (train_loader refuses such pipelines first, with the numbers)
            raise DatasetError(f"{len(pipes)} pipelines' parts of {part} image(s) each do not fill a batch of "
                               f"{self._batch_images} together: use fewer pipelines")
        # The tails read and joined: (DALI's batches, the joined images), while some are still to be
        # taken; and the DALI checkpoints from before they were read, a position among them.
        self._joined: tuple[list[dict], dict] | None = None
        self._before_tails: list | None = None
        # With repeated augmentation a readers' epoch reads every image once and yields `repeats`
        # views of each, so it spans about `repeats` loader epochs: like timm's RepeatAugSampler,
        # an epoch is len(data set) samples, of which 1/repeats are distinct images.
        # Without, an epoch is a readers' epoch: floor(shard / batch) batches, as timm's drop-last
        # takes them, wherever several pipelines' rests join into as many (train_loader's default).
        shard = reader["epoch_size"] // (reader["number_of_shards"] // len(pipes))  # the pipelines' parts together
        self._steps = max(1, shard // self.batch_size) if self.repeats > 1 else self._takes
        self._done = state["done"] if state else 0  # batches of the current epoch already yielded
        self._taken = state["taken"] if state else 0  # batches of the readers' current epoch already taken

    @property
    def classes(self) -> list[str]:
        return self.images.classes

    @property
    def queued_batches(self) -> int:
        """How many batches the pipelines hold ready ahead of the consumer (prefetch queues), in
        this loader's batches: a benchmark must consume them before its timing starts."""
        return sum(_queue_depth(it._pipes[0]) for it in self._iterators)  # a DALI batch makes a loader batch

    @property
    def settings(self) -> dict:
        """What the loader was built with (batch_size, img_size, shards, seed, repeats, aa, pipelines,
        hw_decoder_load, ...); compile_augment as it runs (False once a compile has failed), and with
        cuda_graphs on a torch form, augment_captured: whether its graph replays (False during the
        warm-up batches and after a capture that failed)."""
        settings = dict(self._settings)
        if settings.get("compile_augment"):
            form = getattr(self._augment, "fn", self._augment)  # a CapturedCall holds the form as fn
            settings["compile_augment"] = form.compiled
        if isinstance(self._augment, CapturedCall):
            settings["augment_captured"] = self._augment.graph is not None and not self._augment.failed
        return settings

    def __len__(self) -> int:
        return self._steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._train_batches() if self.train else self._val_batches()
        with _undecodable_named(), _shut_down_on_failure(lambda: [p for it in self._iterators for p in it._pipes]):
            yield from batches

    def _val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._val_pass_open:
            # A DALI iterator cannot rewind mid-epoch (it warns and carries on where it stopped), so
            # the pipeline is built anew: a few hundred ms, not a pass over the rest of the images.
            self._iterators = []
            self._start(None)
        self._val_pass_open = True
        for (batch,) in self._iterators[0]:
            self._in_use.hand_over([batch])
            yield _to_nchw(batch["images"]), batch["labels"]
        self._in_use.hand_over(None)
        self._val_pass_open = False

    def _train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._done >= self._steps:
            self._done = 0
        while self._done < self._steps:
            if self._own_stream is not None:
                parts, images, labels = self._own_stream.run(self._take_batch)
            else:
                parts, images, labels = self._take_batch()
            self._in_use.hand_over(parts)  # on the consumer's stream: its work on the last batch is queued
            self._done += 1
            yield images, labels
        self._in_use.hand_over(None)
        self._done = 0

    def _take_batch(self) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
        """The DALI batches the next batch is made of, and its images and labels as the consumer
        gets them (augmented by the torch form where there is one)."""
        parts, batch = self._next_parts()
        if self.repeats > 1:  # ceil(batch / repeats) images x repeats views
            views = spread(batch, *self._spread) if self._spread else batch  # (R, n, ...): spread_views.py
            batch = {key: value.flatten(0, 1) for key, value in views.items()}
        # A surplus of fewer than `repeats` views is cut (a view, no copy).
        taken = {key: value[:self.batch_size] for key, value in batch.items()}
        if not self._augment:
            return parts, _to_nchw(taken["images"]), taken["labels"]
        with torch.profiler.record_function(AUGMENT_RANGE):  # its kernels are the loader's in a profile
            return parts, self._augment(taken["images"], taken["draws"]), taken["labels"]

    def _next_parts(self) -> tuple[list[dict], dict]:
        """The next batch, (DALI's batches it is made of, its tensors: images first): a readers'
        epoch's batches, then the next's. Counted, not told by DALI's iterators: one restored at
        the end of its epoch goes on into the next without the StopIteration it would otherwise
        raise first."""
        pipes = len(self._iterators)
        if self._taken == self._takes:
            for iterator in self._iterators:  # the reshuffle's padded rest
                for _ in range(self._reads - self._fulls - (1 if self._tails else 0)):
                    _next_batch(iterator)
            self._taken = 0
        index, self._taken = self._taken, self._taken + 1
        if index < pipes * self._fulls:  # whole batches, the pipelines in turn: as DALI made them, no copy
            batch = _next_batch(self._iterators[index % pipes])
            return [batch], batch
        if self._joined is None:
            if self._tails > 1:  # a position between the tail batches restarts from before their reads
                self._before_tails = [iterator.checkpoints()[0] for iterator in self._iterators]
            parts = [_next_batch(iterator) for iterator in self._iterators]
            self._joined = parts, {key: torch.cat([part[key][:self._tail] for part in parts]) for key in parts[0]}
        parts, joined = self._joined
        tail = index - pipes * self._fulls
        if tail == self._tails - 1:
            self._joined = self._before_tails = None
        return parts, {key: value[tail * self._batch_images:(tail + 1) * self._batch_images]
                       for key, value in joined.items()}

    def continue_epoch_at(self, done: int) -> None:
        """Count `done` batches of this epoch as taken: the next len(self) - done end it. For a new
        loader that takes over a run's epoch partway (a run resumed on another number of
        processes), so that its epochs end where the run's do."""
        if not self.train or not 0 <= done < self._steps:
            raise ValueError(f"a train loader's epoch has {self._steps} batches: cannot continue it at {done}")
        self._done = done

    def resize(self, img_size: int) -> None:
        """Crop to img_size from the next batch on (progressive resizing, between epochs): the
        pipelines are built anew at that size from where the stream stands, as a resumed loader's
        are, so the images and the draws go on as they would have at the old size (the batches the
        old pipelines had queued are read again). Costs a loader's start; a no-op at its size."""
        if self._remake is None:
            raise ValueError("only a train loader's crops can be resized")
        if img_size == self._fingerprint["img_size"]:
            return
        _check_sizes(self.batch_size, img_size, None, None, 1)
        state = self.state_dict()
        if torch.cuda.is_initialized():  # the old pipelines' last batch may still be read by queued kernels
            torch.cuda.synchronize()  # (on any stream: the loader's own too, with augment_stream)
        self._iterators = []  # the old pipelines go before the new ones take their memory
        self._build, self._augment = self._remake(img_size)
        self._fingerprint = {**self._fingerprint, "img_size": img_size}
        self._settings["img_size"] = img_size
        self._start(state)

    def state_dict(self) -> dict:
        """A train loader's position: restore it with load_state_dict() or train_loader(..., state=this).
        A validation loader has none to keep (every pass starts at its first image): {}."""
        if not self.train:
            return {}
        dali = self._before_tails or [iterator.checkpoints()[0] for iterator in self._iterators]
        return {"dali": dali, "done": self._done,
                "taken": self._taken, "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (the pipelines are built anew from its DALI checkpoints).
        A position saved by a loader with other settings is refused (DatasetError)."""
        if not self.train:
            return
        _check_state(state, self._fingerprint)
        self._iterators = []  # the old pipelines go before the new ones take their memory
        self._start(state)


class _UntilRun:
    """Keeps DALI's GPU batches alive until the GPU has run the work queued on them. DALI hands
    its output buffers to torch without a copy (DLPack), and DLPack has no stream-ordered release:
    a buffer freed as soon as Python drops its tensor could go back to DALI while kernels queued
    on it have yet to run. When the next batch is handed over, the consumer has queued its work on
    the previous one, so an event recorded then on its (current) stream marks the end of that
    work; the previous batch is let go once its event has completed. Events are polled, never
    waited on: no host sync, unless the consumer's thread runs more than AHEAD batches ahead of its
    GPU: it then waits for the oldest, so that the batches held (DALI's memory) stay few. CPU
    batches need none of this."""

    AHEAD = 4

    def __init__(self):
        self._held: collections.deque = collections.deque()  # (event, batch), oldest first
        self._last: list[dict] | None = None

    def hand_over(self, batch: list[dict] | None) -> None:
        """`batch` (DALI's batches it is made of) goes to the consumer now (None: none, the pass
        ended)."""
        labels = self._last[0]["labels"] if self._last is not None else None  # of DALI's first batch
        if labels is not None and labels.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(labels.device))
            self._held.append((event, self._last))
        while len(self._held) > self.AHEAD:
            self._held[0][0].synchronize()
            self._held.popleft()
        while self._held and self._held[0][0].query():
            self._held.popleft()
        self._last = batch


class _OwnStream:
    """The torch RandAugment form on a CUDA stream of the loader's own (augment_stream=True). A
    trainer's host thread runs ahead of its GPU: when it asks for batch i, the kernels of step
    i - 1 are still queued on its stream, and work queued behind them waits for them. Here DALI
    hands the batch over to the loader's stream instead (the plugin makes the stream current at the
    hand-over wait for DALI's "batch ready" event; DALI's iterator first waits for it on the host,
    unless stream_handover) and the form runs there, so the GPU can augment batch i beside step
    i - 1 (memory-bound kernels beside compute-bound ones). The consumer's stream then waits for
    the augmented batch: an event, no host sync. The images, made on this stream and used on the
    consumer's, are recorded there for torch's allocator, and so are the labels: DALI's own buffer
    (which the allocator passes over) but for a reshuffle's last batches, which torch.cat joins
    here, on this stream.
    One stream, on the current device (the loader's: one process per GPU). Unlike
    cuda_graphs.on_side_stream, it does not first wait for the consumer's queued work: not
    waiting for it is the point."""

    def __init__(self):
        self._stream: torch.cuda.Stream | None = None

    def run(self, take: Callable[[], tuple]) -> tuple:
        """take() -> (batch, images, labels), run on this stream."""
        consumer = torch.cuda.current_stream()
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        with torch.cuda.stream(self._stream):
            batch, images, labels = take()
        consumer.wait_stream(self._stream)
        images.record_stream(consumer)
        labels.record_stream(consumer)
        return batch, images, labels


def _share_outputs_on(pipe, stream: Callable[[], object]) -> None:
    """DALI's iterator takes each batch with pipe.share_outputs(), which, given no stream, waits on
    the host for the batch's GPU work (DALI's "synchronized with the host": a cudaEventSynchronize
    in the consumer's thread, every batch). Given one, DALI makes that stream wait for the batch on
    the GPU instead. Here each call passes stream(): for stream_handover, the CUDA stream current
    at that moment (the trainer's, or the loader's own with augment_stream), so the consumer's
    thread goes on to queue its work on the batch (the next step) while DALI is still making it.
    Needs DALI's dynamic executor."""
    share = pipe.share_outputs
    pipe.share_outputs = lambda: share(cuda_stream=stream())


# What DALI says where memory runs out: its CUDABadAlloc ("CUDA allocation failed", "Can't
# allocate N bytes on device 0."), a CUDA error, or the C++ allocator's (host memory).
_OUT_OF_MEMORY = re.compile(r"CUDA allocation failed|Can't allocate \d+ bytes|cudaErrorMemoryAllocation"
                            r"|CUDA_ERROR_OUT_OF_MEMORY|out of memory|bad_alloc", re.IGNORECASE)


def out_of_memory(text: str) -> str | None:
    """DALI's line that says memory ran out, where an error says so (else None). Its buffers grow
    with the batch and the largest image decoded, and where the decoder's outgrow the GPU the
    message names the decoder ("Error when executing Mixed operator ImageDecoder"): no image is
    broken, and none is to be looked for."""
    return next((line.strip() for line in text.splitlines() if _OUT_OF_MEMORY.search(line)), None)


@contextlib.contextmanager
def _undecodable_named():
    """A file the decoders cannot read fails the pipeline with a message that may not name it
    (DALI 2.4 on a text file under an image name: "nvImageCodec failure: '#4'"): say how to find
    it. Other errors pass as they are, memory run out in a decoder among them."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if "decod" not in text.lower() and "nvimagecodec" not in text.lower() or out_of_memory(text):
            raise
        raise RuntimeError(f"{text}\nAn image could not be decoded (DALI's message may not name it): "
                           "`fastrsb data check DIR` names every such file of a data folder or a file list, "
                           "and fastrsb.data_folder.find_undecodable(list_images(root).files) those of any "
                           "root a loader reads") from err


@contextlib.contextmanager
def _shut_down_on_failure(pipes: Callable[[], list]):
    """A loader that failed (a file that does not decode) stops its DALI pipelines at once, in the
    consumer's thread. Its error's traceback would otherwise keep them alive in a reference cycle
    until the cyclic garbage collector runs, at whatever allocation it runs: inside another
    loader's Python operator (the CPU graphs' resize, in a DALI thread), where shutting a pipeline
    down deadlocks both (seen with Python 3.12: a test that goes on to build the next loader hung).
    Leaving a pass early (a `break`: GeneratorExit) is no failure: the loader goes on."""
    try:
        yield
    except Exception:
        for pipe in pipes():  # (those of now: a validation pass may have built them anew)
            pipe._shutdown()  # DALI 2.4's Pipeline.__del__ does the same, at a moment of the collector's choosing
        raise


def _next_batch(iterator: DALIGenericIterator) -> dict:
    """The iterator's next batch, across the end of its epoch (a StopIteration holds no batch;
    auto_reset has started the next epoch)."""
    while True:
        try:
            return next(iterator)[0]
        except StopIteration:
            continue


def _queue_depth(pipe) -> int:
    depth = pipe.prefetch_queue_depth  # an int, or {"cpu_size": ..., "gpu_size": ...} with separated queues
    return depth if isinstance(depth, int) else sum(depth.values())


def images_per_batch(batch_size: int, repeats: int) -> int:
    """Images one DALI batch decodes: ceil(batch_size / repeats), each giving `repeats` views."""
    return -(-batch_size // repeats)


def _to_nchw(images: torch.Tensor) -> torch.Tensor:
    # (N, H, W, C) -> (N, C, H, W) as a view: the memory is already channels-last.
    return images.permute(0, 3, 1, 2)


# How a train loader cuts its batches from DALI's reads, kept in its positions: a position means
# something only to a loader that cuts them the same way. 3: each readers' epoch one reshuffle,
# its padded rest skipped; several pipelines take turns with whole batches, their rests joined
# into the reshuffle's last ones. 2 (before 0.1.0's release): the same, but a batch was joined
# from a share of every pipeline's, so one pipeline's positions (the GPU's) read alike. Before (no
# "format"), a shard's last batch read on into the next reshuffle and was dropped.
POSITION_FORMAT = 3


def continues_exactly(state: dict) -> bool:
    """Whether this fastrsb can continue a saved train-loader position (one of the same format,
    or of format 2 with one pipeline: its batches were cut as now)."""
    fingerprint = state.get("fingerprint", {})
    return (fingerprint.get("format") == POSITION_FORMAT
            or (fingerprint.get("format") == 2 and fingerprint.get("pipelines") == 1))


def _check_format(state: dict | None) -> None:
    if state is not None and not continues_exactly(state):
        raise DatasetError("the saved loader position was written by an earlier fastrsb, whose loaders cut their "
                           "batches otherwise: it cannot be continued exactly; start the loader anew (`fastrsb "
                           "train --resume` does, at the same step)")


def _check_state(state: dict, fingerprint: dict) -> None:
    _check_format(state)
    saved = state.get("fingerprint", {})
    differ = [f"{key} {saved.get(key)} -> {value}" for key, value in fingerprint.items()
              if saved.get(key) != value and key not in ("format", "img_size")]
    # (the format: _check_format; the crop size shapes the pixels, not the position: a run with
    # progressive resizing resumes at the size of the epoch it continues)
    if differ:
        raise DatasetError(f"the saved loader position does not fit this loader ({'; '.join(differ)})")


def _resolve_device(device: str | torch.device) -> tuple[str, int | None]:
    """("cpu", None) or ("cuda", the GPU's index), for "cpu", "cuda" (the current GPU), "cuda:N"
    or a torch.device. Another GPU than the current one is refused: the loader's torch work (the
    hand-over's events and streams, the torch RandAugment form) runs on the current device."""
    name = str(device)
    if re.fullmatch(r"cpu(:[0-9]+)?", name):  # (Accelerate's CPU device is cpu:0)
        return "cpu", None
    if not re.fullmatch(r"cuda(:[0-9]+)?", name):
        raise ValueError(f"device must be 'cuda', 'cuda:N' or 'cpu', not {device!r}")
    if not torch.cuda.is_available():
        raise DatasetError(f"device={name!r} was asked for, but no CUDA GPU is visible (use device='cpu')")
    current, asked = torch.cuda.current_device(), torch.device(name).index
    if asked is not None and asked != current:
        raise DatasetError(f"device={name!r}, but this process's current GPU is {current}, where the loader's torch "
                           f"work runs: call torch.cuda.set_device({asked}) first (as a torchrun script does with "
                           "LOCAL_RANK)")
    return "cuda", current


def default_threads(local_processes: int | None = None) -> int:
    """This process's share of the cores, at most 8: under torchrun, the processes of one machine
    (local_processes; default LOCAL_WORLD_SIZE, else 1) split its cores instead of each starting a
    thread per core (8 GPUs on 16 cores: 2 threads each, not 16). On the H200, 3, 6 and 10 threads
    fed A3 alike (6,003 / 5,952 / 5,519 img/s at 915cdf8): more threads buy nothing there."""
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, len(os.sched_getaffinity(0)) // max(1, local_processes)))


AA_IMPLS = ("tree", "batch", "torch")


def default_aa_impl(device: str) -> str:
    """RandAugment's form unless told otherwise: the DALI tree, on both devices, by measurement.
    CPU (batch 256, 2 cores, at 5faea1b): tree ~1,060 img/s, batch-wide 643, torch 61. H200 (A3 at
    160 px, batch 256, at a70b3c8): in training, where it counts, tree 6,320 img/s, torch 5,560,
    batch-wide 4,296; the loader alone, torch 13,685, tree 8,870, batch-wide 3,529. The torch form
    feeds the loader alone fastest but launches its kernels from the trainer's thread, which the
    step needs (benchmarks/results/gpu-h200-a70b3c8*). Compiled and replayed as one graph, with the
    step a graph too (cuda_graphs, at c5b2a17): tree 7,329 img/s, torch 7,085, 7,502 on a stream of
    its own (augment_stream): within a few percent, both near the loader's pace and the step's taken
    one after the other (benchmarks/README.md); the tree stays the default, which needs no compile. (The
    torch form alone has timm's exact pixels: the DALI forms' bicubic warp is OpenCV's or CV-CUDA's
    cubic, not PIL's.)"""
    return "tree"


# CPU train loaders run this many single-threaded-or-more pipelines by default, whatever the core
# count, so that the augmentation stream is the same on every machine (it depends on the number
# of pipelines, not on their threads). Why several: one pipeline with 2 threads left ~20% of 2
# cores idle in its serial parts (the reader, every operator's per-batch start, RandAugment's many
# small nodes), while two of one thread each ran at twice one's speed: A3's train pipeline at
# batch 64 on a 2-core machine, 733 -> 916 img/s. Each makes whole batches: two that each made
# half of every batch paid every per-batch start twice (A3's RandAugment at batch 64, 2 cores:
# 481 img/s against 561 for whole batches in turns, 428 for one pipeline).
CPU_PIPELINES = 2


def _default_pipelines(device: str, shard_images: int, batch_images: int) -> int:
    """CPU: CPU_PIPELINES, or fewer where their parts would make fewer batches a reshuffle than
    one pipeline over the whole shard (a shard of 2k + 1 images, a batch that divides it: the
    odd image lies in one part's rest). The GPU pipeline is one per GPU: its threads feed one
    decoder and one CUDA stream."""
    if device != "cpu":
        return 1
    whole = shard_images // batch_images
    return max(count for count in range(1, CPU_PIPELINES + 1)
               if _reshuffle_batches(count, shard_images, batch_images) == whole)


def default_pixel_dtype(device: str) -> str:
    """The pixels a loader hands over unless told otherwise: float16 on the GPU (autocast takes it
    from there, half the bytes of float32), float32 on the CPU, where torch trains in float32 and
    DALI's CPU float16 conversion is scalar code (~135 us more per image at 160 px)."""
    return "float16" if device == "cuda" else "float32"


def train_loader(root: str | os.PathLike | ImageList, batch_size: int, img_size: int, *,
                 device: str | torch.device = "cuda", shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                 num_threads: int | None = None, dtype: str | None = None, repeats: int = 1, aa: str | None = None,
                 hw_decoder_load: float | None = None, prefetch_queue_depth: int = 2, pipelines: int | None = None,
                 aa_impl: str = "auto", stream_policy: str | None = None, concurrency: str | None = None,
                 exec_dynamic: bool = True, cuda_graphs: bool = False, compile_augment: bool = False,
                 augment_stream: bool = False, stream_handover: bool = False,
                 interpolation: str = "random", spread_views: bool = False, state: dict | None = None) -> DaliLoader:
    """Random-resized-crop + flip training loader over an ImageFolder tree or a file list.

    batch_size is per shard (per GPU). Every epoch is a full reshuffle, the same on every shard
    (shuffle seed = `seed`), so the shards stay disjoint; the augmentation seed differs per shard.
    repeats > 1 is repeated augmentation: each image decoded once and augmented `repeats` times,
    its views side by side in the batch; a batch holds ceil(batch_size / repeats) images, and where
    batch_size does not divide by repeats (A1/A2: 2048 and 3) the last image keeps fewer views.
    spread_views: with repeats > 1 over several shards, view k of each image goes to shard
    shard_id + k (mod num_shards) instead, as timm's RepeatAugSampler places views (decoded once
    all the same; spread_views.py); the shards must be torch.distributed's ranks.
    interpolation: how each random crop is resampled to img_size: "random" (bilinear or bicubic,
    drawn per image with equal odds: timm's default train interpolation, as in the RSB recipes),
    "bilinear" or "bicubic"; antialiased, as PIL resizes. RandAugment's geometric ops follow it as
    timm's do ("random": drawn per op). aa: timm's RandAugment string, e.g. "rand-m6-mstd0.5-inc1".
    aa_impl: how it runs: "tree" (DALI conditionals route each sample to its op; the fastest in
    training on the CPU and on the H200), "batch" (DALI, every op on the whole batch, neutral where
    a sample drew another: fewer, larger operators, yet the slowest on the H200) or "torch" (DALI
    draws, torch applies the ops on the batch's device after the hand-over, as PIL computes them:
    torch_augment.py). The same policy and law; pixels within one level of each other. "auto":
    the form a saved `state` was made with, else default_aa_impl(device).
    dtype: "float16" or "float32" pixels (default: float16 on the GPU, float32 on the CPU).
    hw_decoder_load: the JPEGs' share for the GPU's hardware decoders (default_hw_decoder_load).
    num_threads: DALI's threads for this shard, all pipelines together (default: this process's
    share of the cores under torchrun, at most 8).
    pipelines: DALI pipelines for this shard, each on its own part of it, making whole batches in
    turns (default: one on the GPU, CPU_PIPELINES = 2 on the CPU, or one where their parts would
    make a batch fewer a reshuffle: _default_pipelines). Like a DataLoader's workers, their
    number shapes the augmentation stream; the number of threads does not.
    stream_policy, concurrency: DALI's executor options by name (SINGLE / PER_BACKEND / PER_OPERATOR;
    NONE / BACKEND / FULL); None keeps DALI's defaults (PER_BACKEND, BACKEND). Speed only.
    exec_dynamic=False: DALI's earlier pipelined executor (not with stream_policy or concurrency),
    its batches copied into torch's memory on the consumer's stream, not handed over by DLPack, so
    DALI frees its buffers in its own stream order. The same batches. Speed only.
    cuda_graphs: on the GPU, the torch form of RandAugment replays as one CUDA graph a batch
    instead of ~900 torch calls from the consumer's thread (cuda_graphs.CapturedCall; the same
    pixels; nothing to capture in the DALI forms). Speed only.
    compile_augment: the torch form of RandAugment through torch.compile: its ~900 calls a batch
    fused into a handful of loops (the first batch waits for the compile: ~10 s on 2 CPU cores).
    The same pixels on the CPU; with cuda_graphs, the compiled form is what is captured; a compile
    that fails is said once and the form runs eagerly. Speed only.
    augment_stream: on the GPU, the torch form runs on a CUDA stream of the loader's own, beside the
    work a trainer still has queued (the last step's) rather than after it; the trainer's stream
    waits for the batch without a host sync (_OwnStream). The same pixels. Speed only.
    stream_handover: on the GPU, each batch handed over on the CUDA stream current where it is
    taken, which waits for DALI's work on the GPU, instead of after a host wait for it (DALI's
    default): the consumer's thread queues its next step without waiting. Needs exec_dynamic. The
    same batches. Off until a GPU run has measured it. Speed only.
    state: a `loader.state_dict()` to continue from (its pipelines kept; an earlier fastrsb's refused).
    """
    _check_sizes(batch_size, img_size, dtype, num_threads, prefetch_queue_depth)
    _check_seed(seed)
    device, device_id = _resolve_device(device)
    images = root if isinstance(root, ImageList) else list_images(root)
    _check_shard(shard_id, num_shards)
    _check_crops(repeats, batch_size, interpolation)
    _check_format(state)
    aa_impl = _resolve_aa(aa, aa_impl, state, device)
    shard_images, batch_images = len(images) // num_shards, images_per_batch(batch_size, repeats)
    if shard_images < batch_size:
        raise DatasetError(f"{len(images)} images over {num_shards} shard(s) do not fill one batch of {batch_size}")
    threads = num_threads or default_threads()
    pipelines = _pipeline_count(pipelines, state, device, shard_images, batch_images)
    aa_interpolation = interpolation if aa else None  # RandAugment's geometric ops as the crops, as timm's
    spread_views = views_to_spread(spread_views, repeats, shard_id, num_shards)
    fingerprint = dict(format=POSITION_FORMAT, images=len(images), batch_size=batch_size, img_size=img_size,
                       shard_id=shard_id, num_shards=num_shards, seed=seed, repeats=repeats, aa=aa, pipelines=pipelines,
                       aa_impl=aa_impl if aa else None, interpolation=interpolation, aa_interpolation=aa_interpolation,
                       spread_views=spread_views)
    if state is not None:
        _check_state(state, fingerprint)
    _check_gpu_options(device, device_id, aa, aa_impl, cuda_graphs, augment_stream, stream_handover, exec_dynamic)
    hw_decoder_load = _hw_decoder_load(hw_decoder_load, device_id)
    executor = _executor_options(stream_policy, concurrency, exec_dynamic)

    made_of = _TrainPipelines(
        images=images, device=device, device_id=device_id, shard_id=shard_id, num_shards=num_shards,
        pipelines=pipelines, seed=seed, threads=threads, batch_images=batch_images,
        pixels=dtype or default_pixel_dtype(device), hw_decoder_load=hw_decoder_load,
        prefetch_queue_depth=prefetch_queue_depth, executor=executor, repeats=repeats, aa=aa, aa_impl=aa_impl,
        interpolation=interpolation, aa_interpolation=aa_interpolation, compile_augment=compile_augment,
        cuda_graphs=cuda_graphs)
    build, augment = made_of.at_size(img_size)
    return DaliLoader(build, images, batch_size, train=True, repeats=repeats, fingerprint=fingerprint, state=state,
                      spread=(shard_id, num_shards) if spread_views else None,
                      settings={**_decoder_settings(device_id, hw_decoder_load, threads, prefetch_queue_depth),
                                "stream_policy": stream_policy, "concurrency": concurrency,
                                "exec_dynamic": exec_dynamic, "cuda_graphs": cuda_graphs,
                                "augment_stream": augment_stream, "stream_handover": stream_handover,
                                "compile_augment": compile_augment and augment is not None},
                      augment=augment, augment_stream=augment_stream, stream_handover=stream_handover,
                      remake=made_of.at_size)


@dataclass(frozen=True)
class _TrainPipelines:
    """What a train loader's DALI pipelines are made of (train_loader's options, resolved), at any
    crop size: the loader builds them at its size, and anew at another (DaliLoader.resize)."""
    images: ImageList
    device: str
    device_id: int | None
    shard_id: int
    num_shards: int
    pipelines: int
    seed: int
    threads: int
    batch_images: int
    pixels: str
    hw_decoder_load: float
    prefetch_queue_depth: int
    executor: dict
    repeats: int
    aa: str | None
    aa_impl: str
    interpolation: str
    aa_interpolation: str | None
    compile_augment: bool
    cuda_graphs: bool

    def at_size(self, size: int) -> tuple[Callable, Callable | None]:
        """(build, augment) cropping to `size`: build(DALI checkpoints or None) -> the pipelines;
        augment: the torch RandAugment form, where it runs, else None."""
        def build(checkpoints: list | None) -> list:
            # Pipeline k reads part k of this shard, shard shard_id * pipelines + k of num_shards * pipelines (DALI's
            # bounds are floor(size * id / count): the parts tile the shard), and makes whole batches.
            count = self.pipelines
            return [train_pipeline(
                files=self.images.files, labels=self.images.labels, img_size=size, device=self.device,
                shard_id=self.shard_id * count + part, num_shards=self.num_shards * count, shuffle_seed=self.seed,
                hw_decoder_load=self.hw_decoder_load, dtype=self.pixels, repeats=self.repeats, aa=self.aa,
                aa_impl=self.aa_impl, interpolation=self.interpolation, aa_interpolation=self.aa_interpolation,
                batch_size=self.batch_images, num_threads=max(1, self.threads // count), device_id=self.device_id,
                seed=self.seed * 1000 + self.shard_id * count + part, prefetch_queue_depth=self.prefetch_queue_depth,
                enable_checkpointing=True, checkpoint=checkpoints[part] if checkpoints else None, **self.executor)
                for part in range(count)]
        torch_form = self.aa and self.aa_impl == "torch"
        return build, (_torch_augment(self.aa, size, self.pixels, self.compile_augment, self.cuda_graphs,
                                      self.aa_interpolation) if torch_form else None)


def _pipeline_count(pipelines: int | None, state: dict | None, device: str, shard_images: int,
                    batch_images: int) -> int:
    """The pipelines asked for, else a saved state's, else the device's default; checked: their
    parts of the shard together must fill a batch (a reshuffle makes floor(pipelines x smallest
    part / batch) of them)."""
    if pipelines is None:
        pipelines = state["fingerprint"]["pipelines"] if state else _default_pipelines(device, shard_images,
                                                                                         batch_images)
    if isinstance(pipelines, bool) or not isinstance(pipelines, numbers.Integral) or pipelines < 1:
        raise DatasetError(f"pipelines must be a positive whole number, not {pipelines!r}")
    if _reshuffle_batches(pipelines, shard_images, batch_images) < 1:
        raise DatasetError(f"{shard_images} images a shard over {pipelines} pipelines make parts of "
                           f"{shard_images // pipelines}, which together do not fill a batch of {batch_images} "
                           "images: use fewer pipelines")
    return pipelines


def _reshuffle_batches(pipelines: int, shard_images: int, batch_images: int) -> int:
    """The batches a reshuffle of the shard makes (DaliLoader: each pipeline's whole batches of
    the smallest part, and the rests joined)."""
    return pipelines * (shard_images // pipelines) // batch_images


def _check_crops(repeats: int, batch_size: int, interpolation: str) -> None:
    if repeats < 1 or batch_size < repeats:
        raise DatasetError(f"repeated augmentation needs 1 <= repeats <= batch size, not {repeats} "
                           f"for a batch of {batch_size}")
    if interpolation not in INTERPOLATIONS:
        raise DatasetError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {interpolation!r}")


def _check_gpu_options(device: str, device_id: int | None, aa: str | None, aa_impl: str, cuda_graphs: bool,
                       augment_stream: bool, stream_handover: bool, exec_dynamic: bool) -> None:
    """GPU-only speed options are refused where they cannot apply, rather than silently ignored."""
    if cuda_graphs and device_id is None:
        raise DatasetError("cuda_graphs=True replays GPU work as CUDA graphs: it needs device='cuda'")
    if augment_stream and (device_id is None or not aa or aa_impl != "torch"):
        raise DatasetError("augment_stream=True runs the torch RandAugment form on a CUDA stream of its own: it "
                           f"needs device='cuda', an aa and aa_impl='torch' (here {device!r}, {aa!r}, {aa_impl!r})")
    if not isinstance(stream_handover, bool):
        raise DatasetError(f"stream_handover must be True or False, not {stream_handover!r}")
    if stream_handover and device_id is None:
        raise DatasetError("stream_handover=True hands GPU batches over on a CUDA stream: it needs device='cuda'")
    if stream_handover and not exec_dynamic:
        raise DatasetError("stream_handover=True needs DALI's dynamic executor: not with exec_dynamic=False "
                           "(whose batches are copied on the consumer's stream already)")


def _resolve_aa(aa: str | None, aa_impl: str, state: dict | None, device: str) -> str:
    """Checks timm's RandAugment string; returns the form: "auto" is the one a saved state was
    made with, else the device's default."""
    if aa:
        try:
            parse_rand_augment(aa)
        except ValueError as err:
            raise DatasetError(str(err)) from None
    if aa_impl == "auto":
        saved = state.get("fingerprint", {}).get("aa_impl") if state else None
        aa_impl = saved or default_aa_impl(device)
    if aa_impl not in AA_IMPLS:
        raise DatasetError(f"aa_impl must be auto or one of {', '.join(AA_IMPLS)}, not {aa_impl!r}")
    return aa_impl


def _torch_augment(aa: str, img_size: int, dtype: str, compiled: bool, cuda_graphs: bool,
                   interpolation: str) -> Callable:
    """The torch form of RandAugment as the loader applies it after the hand-over."""
    from .torch_augment import TorchRandAugment
    augment = TorchRandAugment(parse_rand_augment(aa), img_size, getattr(torch, dtype), compiled=compiled,
                               interpolation=interpolation)
    if cuda_graphs:  # ~900 torch calls a batch from the consumer's thread (eager): one graph launch instead
        return CapturedCall(augment, "RandAugment (torch form)")
    return augment


def val_loader(root: str | os.PathLike | ImageList, batch_size: int, img_size: int, crop_pct: float, *,
               device: str | torch.device = "cuda", shard_id: int = 0, num_shards: int = 1,
               num_threads: int | None = None, dtype: str | None = None,
               hw_decoder_load: float | None = None) -> DaliLoader:
    """Centre-crop evaluation loader: each image of the shard exactly once per epoch.
    dtype: "float16" or "float32" pixels (default: float16 on the GPU, float32 on the CPU)."""
    _check_sizes(batch_size, img_size, dtype, num_threads)
    if not 0 < crop_pct <= 1:
        raise DatasetError(f"crop_pct is the share of the resized image kept, in (0, 1], not {crop_pct}")
    images = root if isinstance(root, ImageList) else list_images(root)
    _check_shard(shard_id, num_shards)
    device, device_id = _resolve_device(device)
    hw_decoder_load = _hw_decoder_load(hw_decoder_load, device_id)
    threads = num_threads or default_threads()

    def build(checkpoints: None) -> list:
        return [val_pipeline(
            files=images.files, labels=images.labels, img_size=img_size, crop_pct=crop_pct,
            device=device, shard_id=shard_id, num_shards=num_shards, hw_decoder_load=hw_decoder_load,
            dtype=dtype or default_pixel_dtype(device), batch_size=batch_size,
            num_threads=threads, device_id=device_id, seed=0)]
    return DaliLoader(build, images, batch_size, train=False,
                      fingerprint=dict(images=len(images), batch_size=batch_size, img_size=img_size,
                                       shard_id=shard_id, num_shards=num_shards),
                      settings=_decoder_settings(device_id, hw_decoder_load, threads, 2))


MAX_THREADS = 1024  # above any machine's use; 100,000 made DALI abort the process (no Python error)


def _check_sizes(batch_size: int, img_size: int, dtype: str | None, num_threads: int | None,
                 prefetch_queue_depth: int = 1) -> None:
    """What DALI would otherwise refuse deep in a pipeline's build or first run, in its own words."""
    for name, value in (("batch_size", batch_size), ("img_size", img_size),
                        ("num_threads", 1 if num_threads is None else num_threads),
                        ("prefetch_queue_depth", prefetch_queue_depth)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise DatasetError(f"{name} must be a positive whole number, not {value!r}")
    if num_threads is not None and num_threads > MAX_THREADS:  # DALI's failure to start them aborts the process
        raise DatasetError(f"num_threads {num_threads!r}: more threads than a loader takes (at most {MAX_THREADS}; "
                           f"this machine has {os.cpu_count()} cores)")
    if dtype is not None and dtype not in PIXEL_DTYPES:
        raise DatasetError(f"dtype must be one of {', '.join(PIXEL_DTYPES)} (or None: the device's default), "
                           f"not {dtype!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        # DALI takes a negative seed as "draw one": the batches could not be drawn again.
        raise DatasetError(f"seed must be a whole number >= 0, not {seed!r}")


def _check_shard(shard_id: int, num_shards: int) -> None:
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise DatasetError(f"shard {shard_id} of {num_shards} does not exist: shard_id runs from 0 to num_shards - 1 "
                           "(rank and world size under torch.distributed)")


def default_hw_decoder_load(device_id: int) -> float:
    """The share of JPEGs a GPU loader sends to the hardware JPEG engines (NVJPG) unless told
    otherwise; the rest goes to nvJPEG's CUDA path (Huffman on CPU threads, then GPU kernels).
    Hopper and later (compute capability 9.0+; H100/H200 have 7 engines): 1.0. On the H200 at
    915cdf8 the loader gave 26,968 img/s at 1.0 (batch 512) and 26,488 at 0.9 (batch 256), with
    1.16 against 4.1 GiB: the CUDA path only takes SM time and memory from the model there.
    Compute capability 8.0 (A100, A30: one engine, ~5,000 img/s): 0.75, NVIDIA's best split on the
    A100 (~7,000 img/s with both paths). GPUs without engines decode everything on the CUDA path
    whatever the share."""
    major, minor = torch.cuda.get_device_capability(device_id)
    if (major, minor) == (8, 0):
        return 0.75
    return 1.0


def _hw_decoder_load(asked: float | None, device_id: int | None) -> float:
    if asked is not None and not 0.0 <= asked <= 1.0:
        raise DatasetError(f"hw_decoder_load is a share of the images, from 0 to 1, not {asked}")
    if asked is not None or device_id is None:  # the CPU decoders have no such share
        return asked if asked is not None else 0.0
    return default_hw_decoder_load(device_id)


def _decoder_settings(device_id: int | None, hw_decoder_load: float, threads: int, prefetch: int) -> dict:
    """What a loader reports of its decoding beyond the fingerprint (a saved position fits any of them)."""
    gpu = {"hw_decoder_load": hw_decoder_load} if device_id is not None else {}
    return {**gpu, "num_threads": threads, "prefetch_queue_depth": prefetch}


def _executor_options(stream_policy: str | None, concurrency: str | None, exec_dynamic: bool = True) -> dict:
    """DALI's executor options (Pipeline's exec_dynamic, and the dynamic executor's stream_policy and
    concurrency from their names)."""
    from nvidia.dali import OperatorConcurrency, StreamPolicy
    if not isinstance(exec_dynamic, bool):
        raise DatasetError(f"exec_dynamic must be True or False, not {exec_dynamic!r}")
    if not exec_dynamic:
        if stream_policy is not None or concurrency is not None:
            raise DatasetError("stream_policy and concurrency are options of DALI's dynamic executor: "
                               "not with exec_dynamic=False")
        return {"exec_dynamic": False}
    options = {}
    for key, value, kind in (("stream_policy", stream_policy, StreamPolicy), ("concurrency", concurrency, OperatorConcurrency)):
        if value is None:
            continue
        names = [name for name in kind.__members__ if name != "UNSPECIFIED"]
        if value.upper() not in names:
            raise DatasetError(f"{key} must be one of {', '.join(names)}, not {value!r}")
        options[key] = kind[value.upper()]
    return options
