"""The torch form of RandAugment (aa_impl="torch"): DALI draws, torch applies, exactly as timm's
PIL ops compute."""
import glob
import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
import torch
from nvidia.dali import fn, pipeline_def
from PIL import Image

from fastrsb.pipelines import DatasetError, parse_rand_augment, train_loader
from fastrsb.pipelines.graphs import _normalize
from fastrsb.pipelines.loader import _check_gpu_options
from fastrsb.pipelines.randaugment import FILL, GEOMETRIC, _policy, draws_per_layer, rand_augment_draws
from fastrsb.pipelines.torch_augment import WARP_TAIL, TorchRandAugment, warp_capacity

SIZE = 48


@pytest.fixture(scope="module")
def photos(tiny_data):
    files = sorted(glob.glob(str(tiny_data / "train" / "*" / "*.JPEG")))[::5][:8]
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)) for f in files])


def _timm(name, image, level, sign, monkeypatch, resample=Image.BILINEAR):
    monkeypatch.setattr(timm_aa, "_randomly_negate", (lambda v: v) if sign > 0 else (lambda v: -v))
    level_fn = timm_aa.LEVEL_TO_ARG[name]
    args = level_fn(level, {"translate_pct": 0.45}) if level_fn else ()
    return np.asarray(timm_aa.NAME_TO_OP[name](Image.fromarray(image), *args, fillcolor=FILL, resample=resample))


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5", "rand-m9-mstd0.5-inc1"])
def test_every_op_is_timms_to_the_pixel(photos, config, monkeypatch):
    """Each of the 15 ops on the whole batch, at three levels and both signs, against timm's PIL
    call on each image with the same (float32, as DALI draws it) level: every pixel equal."""
    spec = parse_rand_augment(config)
    augment = TorchRandAugment(spec, SIZE, torch.float32)
    batch = torch.from_numpy(photos).permute(0, 3, 1, 2)
    for position, name in enumerate(_policy(spec)[0]):
        for level in (3.3, 7.5, 9.5):
            for sign in (1.0, -1.0):
                signed = torch.full((len(photos),), level * sign, dtype=torch.float32)
                ours = augment.layer(batch, torch.full((len(photos),), position), signed).permute(0, 2, 3, 1).numpy()
                for image, mine in zip(photos, ours):
                    theirs = _timm(name, image, float(signed[0].abs()), sign, monkeypatch)
                    assert np.array_equal(mine, theirs), (name, level, sign)


def test_geometric_ops_resample_as_each_sample_drew_to_the_pixel(photos, monkeypatch):
    """The geometric ops with PIL's bicubic filter, for the whole batch (cubic=True) and per
    sample (a (N,) bool: bicubic on the even samples, bilinear on the odd), against timm's PIL
    call with resample=BICUBIC or BILINEAR: every pixel equal. (timm draws one of the two for
    each op call under its default train interpolation.)"""
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    augment = TorchRandAugment(spec, SIZE, torch.float32)
    batch = torch.from_numpy(photos).permute(0, 3, 1, 2)
    alternate = torch.arange(len(photos)) % 2 == 0
    for name in GEOMETRIC:
        position = _policy(spec)[0].index(name)
        for level, sign in ((3.3, 1.0), (9.5, -1.0)):
            signed = torch.full((len(photos),), level * sign, dtype=torch.float32)
            index = torch.full((len(photos),), position)
            for cubic in (True, alternate):
                ours = augment.layer(batch, index, signed, cubic).permute(0, 2, 3, 1).numpy()
                for j, (image, mine) in enumerate(zip(photos, ours)):
                    bicubic = cubic is True or bool(cubic[j])
                    theirs = _timm(name, image, float(signed[0].abs()), sign, monkeypatch,
                                   Image.BICUBIC if bicubic else Image.BILINEAR)
                    assert np.array_equal(mine, theirs), (name, level, sign, j)


def test_samples_keep_their_own_op_and_the_rest_stay(photos):
    """One batch, sample j drawing op j (the last: none): each comes out as that op alone on the
    whole batch makes it, and the no-op sample is untouched."""
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    augment = TorchRandAugment(spec, SIZE, torch.float32)
    count = len(_policy(spec)[0]) + 1
    batch = torch.from_numpy(photos[np.arange(count) % len(photos)]).permute(0, 3, 1, 2)
    signed = torch.tensor([7.5 * (-1) ** j for j in range(count)], dtype=torch.float32)
    mixed = augment.layer(batch, torch.arange(count), signed)
    for j in range(count - 1):
        alone = augment.layer(batch, torch.full((count,), j), signed)
        assert torch.equal(mixed[j], alone[j]), j
    assert torch.equal(mixed[-1], batch[-1])


def _binomial_above(samples, share, count):
    """P(Binomial(samples, share) > count), in exact fractions (share as the float it is)."""
    share = Fraction(share)
    return sum(math.comb(samples, k) * share ** k * (1 - share) ** (samples - k) for k in range(count + 1, samples + 1))


def test_warp_capacity_is_the_smallest_that_holds_the_geometric_draws_but_with_the_tail():
    """warp_capacity(n, share, tail): the smallest c with P(more than c of n samples draw a
    geometric op) <= tail, checked in exact fractions; A3's figures as the form's comments give
    them; every sample where tail is 0, none where no op is geometric."""
    for samples, share, tail in ((64, 1 / 6, WARP_TAIL), (256, 1 / 6, WARP_TAIL), (32, 1 / 6, 1e-3), (40, 0.3, 1e-6),
                                 (6, 1 / 6, 1e-4), (16, 1 / 6, WARP_TAIL)):
        capacity = warp_capacity(samples, share, tail)
        assert _binomial_above(samples, share, capacity) <= tail, (samples, share, tail)
        assert capacity == 0 or _binomial_above(samples, share, capacity - 1) > tail, (samples, share, tail)
    a3 = parse_rand_augment("rand-m6-mstd0.5-inc1")
    share = TorchRandAugment(a3, SIZE, torch.float32).geometric_share
    assert share == a3.prob * len(GEOMETRIC) / len(_policy(a3)[0]) == pytest.approx(1 / 6)
    assert [warp_capacity(n, share) for n in (16, 64, 256, 2048)] == [16, 39, 96, 482]
    assert warp_capacity(64, share, 0.0) == 64 and warp_capacity(64, 0.0) == 0
    for wrong in (-0.1, 1.0):  # 1 would warp no sample at all
        with pytest.raises(ValueError, match="warp_tail is a probability"):
            TorchRandAugment(a3, SIZE, torch.float32, warp_tail=wrong)


def test_the_warp_takes_the_samples_that_drew_a_geometric_op_first(photos):
    """With fewer samples warped than the batch holds (warp_capacity), the layer gives the pixels
    it gives with every sample warped, whichever samples drew a geometric op; and in a batch where
    more drew one than the warp takes (forced here; by the law, with a probability below the tail),
    the first of them in the batch are warped and the rest keep their pixels for that op."""
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    every = TorchRandAugment(spec, SIZE, torch.float32, warp_tail=0.0)
    fewer = TorchRandAugment(spec, SIZE, torch.float32, warp_tail=1e-3)
    capacity = warp_capacity(32, fewer.geometric_share, 1e-3)
    assert capacity < 32
    batch = torch.from_numpy(photos[np.arange(32) % len(photos)]).permute(0, 3, 1, 2)
    generator = torch.Generator().manual_seed(2)
    geometric = [_policy(spec)[0].index(name) for name in GEOMETRIC]
    for drawn in (capacity, capacity // 2):  # as many samples drew a geometric op as are warped, and fewer
        index = torch.randint(0, len(_policy(spec)[0]) - len(GEOMETRIC), (32,), generator=generator)
        where = torch.randperm(32, generator=generator)[:drawn]
        index[where] = torch.tensor(geometric)[torch.randint(0, len(geometric), (drawn,), generator=generator)]
        signed = torch.rand(32, generator=generator) * 20 - 10
        cubic = torch.rand(32, generator=generator) > 0.5
        assert torch.equal(fewer.layer(batch, index, signed, cubic), every.layer(batch, index, signed, cubic))
    rotate = torch.full((32,), _policy(spec)[0].index("Rotate"))
    signed = torch.full((32,), 9.0)
    got, want = fewer.layer(batch, rotate, signed), every.layer(batch, rotate, signed)
    assert torch.equal(got[:capacity], want[:capacity]) and torch.equal(got[capacity:], batch[capacity:])


def _draws(config, count, seed=3, interpolation="random"):
    spec = parse_rand_augment(config)

    @pipeline_def(batch_size=count, num_threads=1, device_id=None, seed=seed)
    def draws():
        return rand_augment_draws(spec, interpolation)
    return torch.from_numpy(np.stack([np.asarray(d) for d in draws().run()[0]])), spec


def test_draws_follow_timms_law():
    """Per sample: a fair flip, then per layer an op uniform over the set with probability p
    (the last index: none, 1 - p), a signed magnitude of either sign and, under the "random"
    interpolation, a fair bicubic-or-bilinear draw; a fixed interpolation draws none."""
    draws, spec = _draws("rand-m9-n3-p0.7-mstd0.5-inc1", 6000)
    assert draws.shape == (6000, 1 + 3 * 3) and draws_per_layer("random") == 3
    assert abs(draws[:, 0].mean().item() - 0.5) < 0.03
    ops = len(_policy(spec)[0])
    for layer in range(3):
        index, signed, cubic = draws[:, 1 + 3 * layer], draws[:, 2 + 3 * layer], draws[:, 3 + 3 * layer]
        assert abs((index == ops).float().mean().item() - 0.3) < 0.03
        counts = torch.bincount(index.long(), minlength=ops + 1)[:ops].float() / len(index)
        assert (counts - 0.7 / ops).abs().max() < 0.02
        assert abs((signed > 0).float().mean().item() - 0.5) < 0.03 and signed.abs().max() <= 10
        assert set(cubic.tolist()) == {0.0, 1.0} and abs(cubic.mean().item() - 0.5) < 0.03
    for fixed in ("bilinear", "bicubic"):
        assert _draws("rand-m9-n3", 8, interpolation=fixed)[0].shape == (8, 1 + 2 * 3)


def test_a_quarter_of_the_images_stay_as_they_are(photos):
    """Two layers at p 0.5: a quarter untouched (colour photos squeezed to levels 40-200, so
    that at magnitude 9 every op changes every image; at half size, since the eager bicubic
    filter is costly on the CPU)."""
    colour = [p[::2, ::2] for p in photos if np.ptp(p.astype(int), axis=2).max() > 10]
    images = torch.from_numpy(np.stack([(colour[i % len(colour)] * 0.625 + 40).astype(np.uint8) for i in range(800)]))
    draws, spec = _draws("rand-m9-mstd0.5-inc1", 800)
    augment = TorchRandAugment(spec, SIZE // 2, torch.float32)
    x = images.permute(0, 3, 1, 2)
    for layer in range(2):
        x = augment.layer(x, draws[:, 1 + 3 * layer].long(), draws[:, 2 + 3 * layer], draws[:, 3 + 3 * layer] > 0.5)
    same = (x == images.permute(0, 3, 1, 2)).flatten(1).all(1).float().mean().item()
    assert abs(same - 0.25) < 0.06


def test_flip_and_normalization_are_the_dali_pipelines(photos):
    """Without ops, the torch form's flip and ImageNet normalization give what DALI's
    crop_mirror_normalize gives the same images (float32, within rounding)."""
    flips = [j % 2 for j in range(len(photos))]

    @pipeline_def(batch_size=len(photos), num_threads=1, device_id=None)
    def dali():
        x = fn.external_source(source=[list(photos)], layout="HWC")
        mirror = fn.external_source(source=[[np.int32(f) for f in flips]])
        return _normalize(x, "float32", mirror)
    want = torch.from_numpy(np.stack([np.asarray(v) for v in dali().run()[0]])).permute(0, 3, 1, 2)
    spec = parse_rand_augment("rand-m9-n1-p0.0")  # one layer that never applies
    draws = torch.tensor([[float(f), len(_policy(spec)[0]), 0.0, 1.0] for f in flips])  # index: none
    got = TorchRandAugment(spec, SIZE, torch.float32)(torch.from_numpy(photos), draws)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5)


def test_loader_with_the_torch_form(tiny_data):
    """The loader hands over what the other forms do (shape, dtype, channels-last), repeated
    views included, continues exactly from a saved position, and refuses an unknown form."""
    for repeats in (1, 3):
        loader = train_loader(tiny_data / "train", 8, 32, device="cpu", seed=5, aa="rand-m9-mstd0.5-inc1",
                              aa_impl="torch", repeats=repeats)
        images, labels = next(iter(loader))
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and labels.shape == (8,)
        assert images.is_contiguous(memory_format=torch.channels_last) and loader.settings["aa_impl"] == "torch"
        state = loader.state_dict()
        after = next(iter(loader))
        loader.load_state_dict(state)
        again = next(iter(loader))
        assert torch.equal(after[0], again[0]) and torch.equal(after[1], again[1])
    with pytest.raises(DatasetError, match="aa_impl must be auto or one of tree, batch, torch"):
        train_loader(tiny_data / "train", 8, 32, device="cpu", aa="rand-m9", aa_impl="pil")


def test_compiled_form_is_the_eager_one_and_compiles_once(photos):
    """compiled=True (torch.compile, one graph): the eager form's pixels with every op and "none"
    drawn in both layers, bilinear and bicubic, flips and normalization included, and a batch with other draws runs
    the code compiled for the first (a recompile would cost seconds a batch). Compiled in chunks
    of 6 images (the last of 4), against the eager form on the whole batch; the compiled warp
    takes 5 samples of a chunk of 6 (warp_tail 1e-4), as a GPU's chunks of 64 take 39, and
    every chunk here has 5 or fewer that drew a geometric op."""
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    eager = TorchRandAugment(spec, SIZE, torch.float32, chunk_pixels=None)
    compiled = TorchRandAugment(spec, SIZE, torch.float32, compiled=True, chunk_pixels=6 * SIZE * SIZE, warp_tail=1e-4)
    assert (warp_capacity(6, compiled.geometric_share, 1e-4), warp_capacity(16, eager.geometric_share)) == (5, 16)
    choices = len(_policy(spec)[0]) + 1
    batch = torch.from_numpy(photos[np.arange(choices) % len(photos)])
    generator = torch.Generator().manual_seed(0)
    for k in range(3):
        index = ((torch.arange(choices) + k) % choices).float()
        signed = torch.rand(choices, generator=generator) * 20 - 10
        cubic = (torch.arange(choices) // 2 + k) % 2  # bicubic or bilinear in either layer
        draws = torch.stack([(torch.arange(choices) + k) % 2, index, signed, cubic, index.flip(0), -signed, 1 - cubic],
                            1).float()
        with torch._dynamo.config.patch(error_on_recompile=k > 0):
            got = compiled(batch, draws)
        assert torch.equal(got, eager(batch, draws)), k


def test_chunks_change_no_pixel_and_bound_the_memory(photos):
    """The batch augmented a chunk at a time (CHUNK_PIXELS by default) gives the whole batch's
    pixels, channels-last, a partial last chunk included; torch's peak memory in a call then
    follows the chunk, not the batch (the warp's float64 rows above all). Eager on a GPU the batch
    stays whole (chunks would multiply its launches), but its warp still goes a chunk at a time."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import augment_memory  # its peak_mb: torch's allocations through the profiler's memory events
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    images = torch.from_numpy(photos[np.arange(40) % len(photos)])
    generator = torch.Generator().manual_seed(1)
    index = torch.randint(0, len(_policy(spec)[0]) + 1, (40, 2), generator=generator).float()
    signed = torch.rand(40, 2, generator=generator) * 20 - 10
    cubic = torch.rand(40, 2, generator=generator).round()
    draws = torch.stack([torch.rand(40, generator=generator).round(), index[:, 0], signed[:, 0], cubic[:, 0],
                         index[:, 1], signed[:, 1], cubic[:, 1]], 1)
    assert TorchRandAugment(spec, 160, torch.float32).chunk_images == 64  # the default, at A3's size
    assert TorchRandAugment(spec, 224, torch.float32).chunk_images == 32
    # Every sample warped (warp_tail 0): the chunks' memory alone, not the warp's fewer samples.
    whole = TorchRandAugment(spec, SIZE, torch.float32, chunk_pixels=None, warp_tail=0.0)
    chunked = TorchRandAugment(spec, SIZE, torch.float32, chunk_pixels=8 * SIZE * SIZE + 100, warp_tail=0.0)
    assert (whole.chunk_images, chunked.chunk_images) == (None, 8)
    assert chunked.chunk_size(images) == 8 and chunked.chunk_size(images[:5]) == 5 and whole.chunk_size(images) == 40
    # Off the CPU ("meta" stands in for a GPU) only the compiled form chunks the batch.
    on_a_gpu = torch.empty((40, SIZE, SIZE, 3), dtype=torch.uint8, device="meta")
    compiled = TorchRandAugment(spec, SIZE, torch.float32, compiled=True, chunk_pixels=8 * SIZE * SIZE)
    assert (chunked.chunk_size(on_a_gpu), compiled.chunk_size(on_a_gpu)) == (40, 8)
    warp_only = TorchRandAugment(spec, SIZE, torch.float32, chunk_pixels=8 * SIZE * SIZE, warp_tail=0.0)
    warp_only.chunk_size = lambda batch: batch.shape[0]  # that eager GPU path, taken here
    want = whole(images[:36], draws[:36])
    for form in (chunked, warp_only):  # chunks of 8, the last of 4
        got = form(images[:36], draws[:36])
        assert torch.equal(got, want) and got.is_contiguous(memory_format=torch.channels_last)
    whole_peak, chunked_peak, warp_only_peak = (augment_memory.peak_mb(lambda: form(images, draws), "cpu")
                                                for form in (whole, chunked, warp_only))
    output = images.numel() * 4 / 1e6  # float32
    # Beyond the output, the chunked call holds about a fifth of what the whole batch's does; the
    # warp alone in chunks, under half (the warp's temporaries are most of it).
    assert chunked_peak - output < 0.3 * (whole_peak - output), (whole_peak, chunked_peak)
    assert warp_only_peak < 0.5 * whole_peak, (whole_peak, warp_only_peak)


def _compiler_gives_up(images, draws):
    raise RuntimeError("BackendCompilerFailed: no lowering for this op\nmore detail")


def test_loader_with_the_compiled_torch_form(tiny_data, capsys):
    """compile_augment=True: the loader's batches are the eager form's, and it says so; and says
    so no more once the compile has failed (the form then runs eagerly)."""
    def loader(compiled):
        return train_loader(tiny_data / "train", 8, 32, device="cpu", seed=5, aa="rand-m9-mstd0.5-inc1",
                            aa_impl="torch", compile_augment=compiled)
    compiled, eager = loader(True), loader(False)
    assert compiled.settings["compile_augment"] and not eager.settings["compile_augment"]
    for (images, labels), (want_images, want_labels), _ in zip(compiled, eager, range(2)):
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    tree = train_loader(tiny_data / "train", 8, 32, device="cpu", aa="rand-m9-mstd0.5-inc1", aa_impl="tree",
                        compile_augment=True)
    assert not tree.settings["compile_augment"]  # nothing in torch to compile
    failing = loader(True)
    failing._augment._apply = _compiler_gives_up  # at the first batch
    next(iter(failing))
    assert not failing.settings["compile_augment"] and "could not be compiled" in capsys.readouterr().out


def test_gpu_options_where_they_cannot_apply(tiny_data):
    """cuda_graphs and augment_stream (the torch form on a CUDA stream of its own) are refused, not
    ignored, where there is no GPU, or no torch form to put on the stream."""
    with pytest.raises(DatasetError, match="cuda_graphs=True replays GPU work as CUDA graphs: it needs device='cuda'"):
        train_loader(tiny_data / "train", 8, 32, device="cpu", aa="rand-m9-mstd0.5-inc1", aa_impl="torch",
                     cuda_graphs=True)
    for settings in (dict(device="cpu", aa="rand-m9-mstd0.5-inc1", aa_impl="torch"),
                     dict(device="cpu", aa="rand-m9-mstd0.5-inc1", aa_impl="tree"), dict(device="cpu", aa=None)):
        with pytest.raises(DatasetError, match="augment_stream=True runs the torch RandAugment form on a CUDA "
                                               "stream of its own: it needs device='cuda', an aa and aa_impl='torch'"):
            train_loader(tiny_data / "train", 8, 32, augment_stream=True, **settings)
    assert not train_loader(tiny_data / "train", 8, 32, device="cpu", aa="rand-m9-mstd0.5-inc1",
                            aa_impl="torch").settings["augment_stream"]


def test_stream_handover_where_it_cannot_apply(tiny_data):
    """stream_handover (each GPU batch bound to the consumer's CUDA stream) is refused on the CPU,
    with DALI's earlier executor (which copies its batches on the consumer's stream already) and as
    anything but a bool; off, the CPU loader says so in its settings."""
    with pytest.raises(DatasetError, match="stream_handover=True hands GPU batches over on a CUDA stream: it "
                                           "needs device='cuda'"):
        train_loader(tiny_data / "train", 8, 32, device="cpu", stream_handover=True)
    with pytest.raises(DatasetError, match="stream_handover must be True or False, not 'yes'"):
        train_loader(tiny_data / "train", 8, 32, device="cpu", stream_handover="yes")
    with pytest.raises(DatasetError, match="stream_handover=True needs DALI's dynamic executor: not with "
                                           "exec_dynamic=False"):
        _check_gpu_options("cuda", 0, None, "tree", False, False, stream_handover=True, exec_dynamic=False)
    _check_gpu_options("cuda", 0, None, "tree", False, False, stream_handover=True, exec_dynamic=True)
    assert train_loader(tiny_data / "train", 8, 32, device="cpu").settings["stream_handover"] is False


def test_a_form_that_does_not_compile_runs_eagerly_and_says_so(photos, capsys):
    """A compiler failure (an op this torch's inductor cannot lower, say) costs speed, not the run:
    said once, then the eager form's pixels."""
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    augment = TorchRandAugment(spec, SIZE, torch.float32, compiled=True)
    augment._apply = _compiler_gives_up
    images = torch.from_numpy(photos)
    draws = torch.tensor([[1.0, 3.0, 7.5, 0.0, 12.0, -4.0, 1.0]] * len(photos))
    assert torch.equal(augment(images, draws), TorchRandAugment(spec, SIZE, torch.float32)(images, draws))
    assert not augment.compiled
    assert ("could not be compiled (BackendCompilerFailed: no lowering for this op); running on without compiling"
            in capsys.readouterr().out)
    augment(images, draws)
    assert "could not be compiled" not in capsys.readouterr().out


def test_the_loader_marks_its_torch_work_for_the_profiler(tiny_data):
    """The torch form's ops run inside the loader's profiler range (AUGMENT_RANGE), so that a
    profile counts their kernels as the loader's, not the model's (benchmarks/profile_summary.py)."""
    from torch.profiler import ProfilerActivity, profile
    from fastrsb.pipelines.loader import AUGMENT_RANGE
    batches = iter(train_loader(tiny_data / "train", 8, 32, device="cpu", aa="rand-m9-mstd0.5-inc1", aa_impl="torch"))
    next(batches)
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        next(batches)
    (marked,) = [e for e in trace.events() if e.name == AUGMENT_RANGE]
    inside = {e.name for e in trace.events() if e.cpu_parent is marked}
    assert {"aten::where", "aten::index"} <= inside
