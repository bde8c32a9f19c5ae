import json

import pytest

from conftest import assert_user_error, run_cli
from fastrsb.errors import UserError
from fastrsb.recipe import BUILTIN, RECIPE_SCHEMA, builtin_path, load_recipe

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


def test_overrides_are_typed():
    r = load_recipe("a3", ["epochs=10", "lr=0.01", "aa=none", "compile=false", "bce_target_thresh=none", "opt_betas=0.8,0.99"])
    assert (r["epochs"], r["lr"], r["aa"], r["compile"], r["bce_target_thresh"], r["opt_betas"]) == (10, 0.01, None, False, None, [0.8, 0.99])


@pytest.mark.parametrize("override,fragment", [
    ("epoch=3", "unknown key 'epoch' (did you mean 'epochs'?)"),
    ("epochs=3.5", "not a valid int"),
    ("lr=fast", "not a valid float"),
    ("compile=maybe", "not a valid bool"),
    ("epochs", "expected key=value"),
    ("opt=sgd", "'opt' must be one of lamb"),
    ("aa_impl=pil", "'aa_impl' must be one of auto, batch, torch, tree"),
    ("train_interpolation=nearest", "'train_interpolation' must be one of bicubic, bilinear, random"),
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
    (dict(drop="lr"), "missing key(s) lr"),
    (dict(add="learning_rate = 0.1"), "unknown key 'learning_rate'"),
    (dict(replace=("epochs", 'epochs = "ten"')), "'epochs' must be int"),
    (dict(add="this is not toml"), "does not parse"),
])
def test_bad_recipe_files(tmp_path, change, fragment):
    path = write_variant(tmp_path, **change)
    assert_user_error(run_cli("recipe", path, check=False), fragment)


def test_unknown_recipe_name_or_path(tmp_path):
    assert_user_error(run_cli("recipe", "a4", check=False), "no recipe 'a4'")
    assert_user_error(run_cli("recipe", "demoo", check=False), "no recipe 'demoo'", "did you mean 'demo'")
    # A path that does not exist is told so, not to give "a path to a .toml file".
    assert_user_error(run_cli("recipe", tmp_path / "mine.toml", check=False), "mine.toml does not exist")


def test_recipe_json_has_timm_keys():
    out = json.loads(run_cli("recipe", "a3", "--json", "--set", "epochs=50").stdout)
    assert set(TIMM_KEYS) <= set(out)
    assert out["epochs"] == 50 and out["batch_size"] == 2048 and out["bce_target_thresh"] == 0.2
