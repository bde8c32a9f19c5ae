import json

import pytest

from conftest import assert_user_error, run_cli
from fastrsb.errors import UserError
from fastrsb.recipe import BUILTIN, RECIPE_SCHEMA, builtin_path, load_recipe, to_toml

TIMM_KEYS = ("model epochs batch_size img_size test_img_size crop_pct opt lr weight_decay sched warmup_epochs "
             "warmup_lr min_lr smoothing drop_path aug_repeats aa mixup cutmix mixup_prob mixup_switch_prob "
             "mixup_mode bce_loss bce_target_thresh").split()


def test_a3_is_the_papers_recipe():
    r = load_recipe("a3")
    assert (r["model"], r["epochs"], r["img_size"], r["test_img_size"], r["crop_pct"]) == ("resnet50", 100, 160, 224, 0.95)
    assert (r["batch_size"], r["opt"], r["opt_betas"], r["opt_eps"]) == (2048, "lamb", [0.9, 0.999], 1e-6)
    assert (r["lr"], r["weight_decay"], r["sched"], r["warmup_epochs"], r["warmup_lr"], r["min_lr"]) == \
        (8e-3, 0.02, "cosine", 5, 1e-4, 1e-6)
    assert (r["smoothing"], r["drop_path"], r["aug_repeats"], r["aa"]) == (0.0, 0.0, 0, "rand-m6-mstd0.5-inc1")
    assert (r["mixup"], r["cutmix"], r["mixup_prob"], r["mixup_switch_prob"], r["mixup_mode"]) == (0.1, 1.0, 1.0, 0.5, "batch")
    assert (r["bce_loss"], r["bce_target_thresh"], r["amp"]) == (True, 0.2, True)


@pytest.mark.parametrize("name,epochs,lr,wd,smoothing,mixup,aa", [
    ("a1", 600, 5e-3, 0.01, 0.1, 0.2, "rand-m7-mstd0.5-inc1"),
    ("a2", 300, 5e-3, 0.02, 0.0, 0.1, "rand-m7-mstd0.5-inc1"),
])
def test_a1_a2_values(name, epochs, lr, wd, smoothing, mixup, aa):
    r = load_recipe(name)
    assert (r["epochs"], r["lr"], r["weight_decay"], r["smoothing"], r["mixup"], r["aa"]) == (epochs, lr, wd, smoothing, mixup, aa)
    assert (r["img_size"], r["drop_path"], r["aug_repeats"], r["bce_target_thresh"]) == (224, 0.05, 3, None)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_is_complete(name):
    text = builtin_path(name).read_text()
    assert text.startswith("#") and "Source" in text  # each file cites its source
    assert set(load_recipe(name)) == set(RECIPE_SCHEMA) | {"name"}


def test_cuda_graphs_may_be_auto(tmp_path):
    """cuda_graphs takes true, false or auto (on where the step can be a graph: fastrsb.parts), from
    --set and from a file, and a whole file written with it reads back the same."""
    assert load_recipe("a3", ["cuda_graphs=AUTO"])["cuda_graphs"] == "auto"
    assert load_recipe("a3", ["cuda_graphs=on"])["cuda_graphs"] is True
    mine = tmp_path / "mine.toml"
    mine.write_text(to_toml(load_recipe("a3", ["cuda_graphs=auto"]), "test"))
    assert 'cuda_graphs = "auto"' in mine.read_text() and load_recipe(str(mine))["cuda_graphs"] == "auto"
    mine.write_text(mine.read_text().replace('cuda_graphs = "auto"', 'cuda_graphs = "yes"'))
    with pytest.raises(UserError, match="'cuda_graphs' must be bool or \"auto\", not 'yes'"):
        load_recipe(str(mine))


def test_overrides_are_typed():
    r = load_recipe("a3", ["epochs=10", "lr=0.01", "aa=none", "compile=false", "bce_target_thresh=none", "opt_betas=0.8,0.99"])
    assert (r["epochs"], r["lr"], r["aa"], r["compile"], r["bce_target_thresh"], r["opt_betas"]) == (10, 0.01, None, False, None, [0.8, 0.99])


@pytest.mark.parametrize("override,fragment", [
    ("epoch=3", "unknown key 'epoch' (did you mean 'epochs'?)"),
    ("epochs=3.5", "not a valid int"),
    ("lr=fast", "not a valid float"),
    ("compile=maybe", "not a valid bool"),
    ("compile=auto", "not a valid bool"),  # only cuda_graphs takes auto
    ("cuda_graphs=sometimes", "'sometimes' is not a valid bool (or auto)"),
    ("epochs", "expected key=value"),
    ("opt=sgd", "'opt' must be one of lamb"),
    ("aa_impl=pil", "'aa_impl' must be one of auto, batch, torch, tree"),
    ("train_interpolation=nearest", "'train_interpolation' must be one of bicubic, bilinear, random"),
    # values a run would take and then fail on (drop_path, seed: a traceback) or learn nothing from
    ("drop_path=1.5", "'drop_path' must lie in [0, 1), not 1.5"),
    ("seed=-1", "'seed' must lie in [0, 2**31), not -1"),
    ("seed=4294967295", "'seed' must lie in [0, 2**31)"),
    ("smoothing=1", "'smoothing' must lie in [0, 1), not 1.0"),
    ("bce_target_thresh=2", "'bce_target_thresh' must lie in [0, 1), not 2.0"),
    ("opt_betas=0.9,1", "'opt_betas' must lie in [0, 1), not [0.9, 1.0]"),
    ("opt_eps=0", "'opt_eps' must be positive, not 0.0"),
    ("min_lr=1", "'min_lr' (1.0) must not exceed 'lr' (0.008): the cosine would rise"),
])
def test_bad_overrides(override, fragment):
    with pytest.raises(UserError) as err:
        load_recipe("demo", [override])
    assert fragment in str(err.value)
    proc = run_cli("recipe", "demo", "--set", override, check=False)
    assert_user_error(proc, fragment)


def write_variant(tmp_path, drop=None, add=None, replace=None):
    lines = builtin_path("demo").read_text().splitlines()
    if drop:
        lines = [l for l in lines if not l.startswith(f"{drop} =")]
    if replace:
        lines = [replace[1] if l.startswith(f"{replace[0]} =") else l for l in lines]
    if add:
        lines.append(add)
    path = tmp_path / "variant.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("change,fragment", [
    (dict(drop="lr"), "missing key(s) lr (a recipe file holds every key: a whole one with this file's values in"),
    (dict(add="learning_rate = 0.1"), "unknown key 'learning_rate'"),
    (dict(replace=("epochs", 'epochs = "ten"')), "'epochs' must be int"),
    (dict(add="this is not toml"), "does not parse"),
])
def test_bad_recipe_files(tmp_path, change, fragment):
    path = write_variant(tmp_path, **change)
    assert_user_error(run_cli("recipe", path, check=False), fragment)


@pytest.mark.parametrize("name", BUILTIN)
def test_recipe_toml_is_a_whole_recipe_file_that_trains_as_the_recipe(name, tmp_path):
    """`fastrsb recipe NAME --toml` (--set values in) writes a recipe file of one's own that reads
    back to the same values, every key there with its meaning: none values, a float to its last
    bit, a path with quotes, backslashes and accents."""
    sets = ["epochs=7", "lr=0.1234567891234567", "warmup_epochs=2", "aa=none", "bce_target_thresh=none",
            'initial_checkpoint=w\\e "quoted" é.pth', "opt_betas=0.85,0.9999", "seed=2147483647"]
    for overrides in ([], sets):
        text = run_cli("recipe", name, "--toml", *(w for item in overrides for w in ("--set", item))).stdout
        assert text.startswith(f"# fastrsb recipe {name} --toml")
        (tmp_path / "mine.toml").write_text(text)
        wanted = {**load_recipe(name, overrides), "name": "mine"}
        assert load_recipe(str(tmp_path / "mine.toml")) == wanted
        assert json.loads(run_cli("recipe", tmp_path / "mine.toml", "--json").stdout) == wanted
        for key, (_, _, meaning) in RECIPE_SCHEMA.items():
            assert f"# {meaning.split()[0]}" in text.split(f"\n{key} = ")[0].rsplit("\n\n", 1)[1]
    assert 'initial_checkpoint = "w\\\\e \\"quoted\\" \\u00e9.pth"' in text


def test_a_recipe_file_missing_keys_is_told_the_command_that_completes_it(tmp_path):
    """A partial recipe (what a user writes first) is refused with the command that writes a whole
    one holding its values, into a new file beside it; that command, run, gives a recipe with them."""
    import shlex
    partial = tmp_path / "mine.toml"
    partial.write_text('epochs = 7\nopt_betas = [0.8, 0.99]\namp = false\naa = "none"\nmodel = "resnet18"\n')
    proc = run_cli("recipe", partial, check=False)
    assert_user_error(proc, f"recipe {partial}: missing key(s) batch_size")
    command = proc.stderr.split("`")[1]
    assert command.endswith("> mine.whole.toml") and command.startswith("fastrsb recipe a3 --toml --set epochs=7")
    words = shlex.split(command.split(" > ")[0])[1:]
    (tmp_path / "mine.whole.toml").write_text(run_cli(*words).stdout)
    assert load_recipe(str(tmp_path / "mine.whole.toml")) == {
        **load_recipe("a3"), "epochs": 7, "opt_betas": [0.8, 0.99], "amp": False, "aa": None, "model": "resnet18",
        "name": "mine.whole"}
    assert partial.read_text().startswith("epochs = 7")  # left as it was
    assert run_cli("recipe", "a3", "--toml", "--json", check=False).returncode == 2  # one form of output


def test_warmup_as_long_as_the_run_says_what_to_set():
    assert_user_error(run_cli("recipe", "demo", "--set", "epochs=1", check=False),
                      "warmup_epochs (1) must be fewer than epochs (1): --set warmup_epochs=0 (no warmup)")
    assert_user_error(run_cli("recipe", "a3", "--set", "epochs=5", check=False),
                      "warmup_epochs (5) must be fewer than epochs (5): --set warmup_epochs=4 or fewer")


def test_unknown_recipe_name_or_path(tmp_path):
    assert_user_error(run_cli("recipe", "a4", check=False), "no recipe 'a4'")
    assert_user_error(run_cli("recipe", "demoo", check=False), "no recipe 'demoo'", "did you mean 'demo'")
    # A path that does not exist is told so, not to give "a path to a .toml file".
    assert_user_error(run_cli("recipe", tmp_path / "mine.toml", check=False), "mine.toml does not exist")


def test_recipe_json_has_timm_keys():
    out = json.loads(run_cli("recipe", "a3", "--json", "--set", "epochs=50").stdout)
    assert set(TIMM_KEYS) <= set(out)
    assert out["epochs"] == 50 and out["batch_size"] == 2048 and out["bce_target_thresh"] == 0.2


def _flag(args: list[str], name: str, count: int = 1):
    """The value(s) after a flag in an argument list (None if absent)."""
    if name not in args:
        return None
    at = args.index(name)
    return args[at + 1] if count == 1 else args[at + 1:at + 1 + count]


@pytest.mark.parametrize("name", ["a1", "a2", "a3", "demo"])
def test_the_timm_command_runs_the_recipes_schedule(name):
    """`fastrsb recipe NAME --timm`: the flags that make timm's train.py run this recipe. Its
    schedule flags, given to timm's own scheduler factory as train.py gives them, produce the
    recipe's LR at every step, and the run lasts the recipe's epochs."""
    import math

    import torch
    from timm.scheduler import create_scheduler_v2

    from fastrsb.optim import lr_at
    from fastrsb.timm_command import timm_train_args
    recipe = load_recipe(name)
    args = timm_train_args(recipe, gpus=4)
    assert "--warmup-prefix" in args and "--sched-on-updates" in args and _flag(args, "--cooldown-epochs") == "0"
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=float(_flag(args, "--lr")))
    per_epoch = 3
    scheduler, total = create_scheduler_v2(
        optimizer, sched=_flag(args, "--sched"), num_epochs=int(_flag(args, "--epochs")),
        warmup_epochs=int(_flag(args, "--warmup-epochs")), warmup_lr=float(_flag(args, "--warmup-lr")),
        min_lr=float(_flag(args, "--min-lr")), cooldown_epochs=int(_flag(args, "--cooldown-epochs")),
        warmup_prefix=True, step_on_epochs=False, updates_per_epoch=per_epoch)
    assert total == recipe["epochs"]
    for step in range(0, total * per_epoch, 5):
        scheduler.step_update(step)
        ours = lr_at(step, per_epoch, recipe["epochs"], recipe["lr"], recipe["warmup_epochs"], recipe["warmup_lr"],
                     recipe["min_lr"])
        assert math.isclose(optimizer.param_groups[0]["lr"], ours, rel_tol=1e-12), step
    # What timm's defaults would change is set: smoothing (0.1), colour jitter without RandAugment (0.4).
    assert float(_flag(args, "--smoothing")) == recipe["smoothing"] and _flag(args, "--color-jitter") == "0"
    assert int(_flag(args, "-b")) * 4 == recipe["batch_size"]  # timm's batch is per GPU
    assert _flag(args, "--aa") == recipe["aa"] and [float(b) for b in _flag(args, "--opt-betas", 2)] == recipe["opt_betas"]
    assert ("--bce-loss" in args) == recipe["bce_loss"] and int(_flag(args, "--aug-repeats")) == recipe["aug_repeats"]


def test_recipe_timm_prints_both_commands_and_the_differences():
    out = run_cli("recipe", "a1", "--timm", "--gpus", "8").stdout
    lines = out.splitlines()
    assert lines[1].startswith("torchrun --nproc_per_node=8 train.py /data/imagenet --model resnet50 --img-size 224")
    assert " -b 256 --epochs 595 --warmup-epochs 5 --warmup-prefix " in lines[1] and " --smoothing 0.1 " in lines[1]
    assert lines[3].startswith("python validate.py /data/imagenet/val --model resnet50 --checkpoint ")
    assert "--img-size 224 --crop-pct 0.95 --interpolation bicubic" in lines[3]
    assert lines[5:8] == ["fastrsb eval output/train/RUN/model_best.pth.tar --data /data/imagenet --img-size 224 "
                          "--crop-pct 0.95", "fastrsb plot runs/RUN output/train/RUN", "fastrsb runs runs output/train"]
    assert "both place an image's 3 views on different ranks; timm's RepeatAugSampler decodes the image on each" in out
    kept = run_cli("recipe", "a1", "--timm", "--gpus", "8", "--set", "aug_repeats_across_ranks=false").stdout
    assert "RepeatAugSampler sends an image's 3 views to different ranks; fastrsb keeps them in one" in kept
    single = run_cli("recipe", "demo", "--timm").stdout.splitlines()[1]
    assert single.startswith("python train.py /data/imagenet --model resnet10t") and "--aa" not in single
    assert_user_error(run_cli("recipe", "a3", "--timm", "--gpus", "3", check=False),
                      "global batch of 2048 does not split evenly over 3 GPU(s)")
    assert_user_error(run_cli("recipe", "a2", "--timm", check=False),  # timm's create_loader asserts it
                      "timm runs repeated augmentation (aug_repeats 3) only across several processes")


def _timm_flags(args: list[str]) -> dict[str, list[str]]:
    """train.py's arguments as {flag: its values} (a switch: [])."""
    flags, flag = {}, None
    for arg in args:
        if arg.startswith("--") or arg == "-b":
            flag = arg
            flags[flag] = []
        else:
            flags[flag].append(arg)
    return flags


@pytest.mark.parametrize("name,overrides", [
    ("a1", []), ("a2", []), ("a3", []), ("demo", []),
    ("a3", ["model_ema=true", "model_ema_decay=0.9998", "compile=false", "amp=false", "bce_target_thresh=none",
            "train_interpolation=bicubic", "seed=7"])])
def test_every_key_timm_reads_is_in_its_command_as_the_recipe_says(name, overrides):
    """Each of the recipe's keys that timm's train.py has a flag for is in the command with the
    recipe's value (a switch where the recipe turns it on, absent where off); the defaults of timm's
    that the recipes do not share are set off."""
    from fastrsb.timm_command import timm_train_args
    recipe = load_recipe(name, overrides)
    flags = _timm_flags(timm_train_args(recipe, gpus=4))
    numbers = {"--crop-pct": "crop_pct", "--lr": "lr", "--warmup-lr": "warmup_lr", "--min-lr": "min_lr",
               "--opt-eps": "opt_eps", "--weight-decay": "weight_decay", "--smoothing": "smoothing",
               "--drop-path": "drop_path", "--mixup": "mixup", "--cutmix": "cutmix", "--mixup-prob": "mixup_prob",
               "--mixup-switch-prob": "mixup_switch_prob", "--img-size": "img_size", "--seed": "seed"}
    for flag, key in numbers.items():
        assert [float(value) for value in flags[flag]] == [float(recipe[key])], flag
    words = {"--model": "model", "--sched": "sched", "--opt": "opt", "--train-interpolation": "train_interpolation",
             "--mixup-mode": "mixup_mode"}
    for flag, key in words.items():
        assert flags[flag] == [recipe[key]], flag
    assert flags["--color-jitter"] == ["0"] and flags["--reprob"] == ["0"] and flags["--channels-last"] == []
    assert flags.get("--bce-target-thresh") == ([repr(recipe["bce_target_thresh"])]
                                                if recipe["bce_target_thresh"] is not None else None)
    assert flags.get("--model-ema") == ([] if recipe["model_ema"] else None)
    assert flags.get("--model-ema-decay") == ([repr(recipe["model_ema_decay"])] if recipe["model_ema"] else None)
    assert flags.get("--amp-dtype") == (["bfloat16"] if recipe["amp"] else None) and \
        ("--amp" in flags) == recipe["amp"] and ("--torchcompile" in flags) == recipe["compile"]


def test_recipe_timm_validates_at_the_test_size_and_names_what_differs():
    out = run_cli("recipe", "a3", "--timm", "--gpus", "4").stdout
    lines = out.splitlines()
    assert "--img-size 224 --crop-pct 0.95 --interpolation bicubic" in lines[3]  # trained at 160, tested at 224
    assert "timm validates at --img-size (160 px) while it trains; fastrsb at the test size (224 px" in out
    assert "timm's RandAugment runs in PIL; fastrsb's draws the same law" in out
    assert "RandAugment runs in PIL" not in run_cli("recipe", "demo", "--timm").stdout  # no RandAugment in it
    started = run_cli("recipe", "a3", "--timm", "--gpus", "4", "--set", "initial_checkpoint=runs/x/last.pt").stdout
    assert "--initial-checkpoint EXPORTED_FOLDER/model.safetensors" in started and (
        "timm's --initial-checkpoint loads every weight, the classifier too (with other classes, its shape refuses "
        "it); fastrsb starts the classifier anew where the classes differ; a fastrsb checkpoint is read by timm "
        "once `fastrsb export`ed (EXPORTED_FOLDER)") in started
    assert "initial-checkpoint" not in out
