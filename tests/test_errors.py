"""Bad input: each gives one clear line naming the problem, exit code 2, no traceback, no hang."""
import shutil

import pytest
import torch

from conftest import assert_user_error, run_cli


def train(data, *extra):
    return run_cli("train", "tiny", "--data", data, "--device", "cpu", *extra, check=False)


@pytest.fixture
def copy_of(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    return root


def test_missing_data_folder(tmp_path):
    assert_user_error(train(tmp_path / "nowhere"), "does not exist")


def test_folder_without_splits(tmp_path):
    (tmp_path / "train").mkdir()
    assert_user_error(train(tmp_path), "no class folders")
    shutil.rmtree(tmp_path / "train")
    assert_user_error(train(tmp_path), "has no 'train' folder")


def test_missing_val(copy_of):
    shutil.rmtree(copy_of / "val")
    assert_user_error(train(copy_of), "has no 'val' folder")


def test_empty_class(copy_of):
    for image in (copy_of / "train" / "n01_vstripes").iterdir():
        image.unlink()
    assert_user_error(train(copy_of), "n01_vstripes holds no images")


def test_classes_differ(copy_of):
    shutil.rmtree(copy_of / "val" / "n03_dots")
    assert_user_error(train(copy_of), "train and val classes differ", "n03_dots")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_undecodable_file_is_named(copy_of, damage):
    victim = sorted((copy_of / "train" / "n02_checks").glob("*.JPEG"))[6]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"this is not an image" * 20)
    assert_user_error(train(copy_of), "cannot decode", victim.name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(tiny_data):
    proc = run_cli("train", "tiny", "--data", tiny_data, "--device", "cuda", check=False)
    assert_user_error(proc, "--device cuda", "no CUDA GPU")


def test_recipe_that_does_not_parse(tmp_path, tiny_data):
    (tmp_path / "r.toml").write_text("model = \n")
    assert_user_error(run_cli("train", tmp_path / "r.toml", "--data", tiny_data, check=False), "does not parse")


def test_randaugment_string_timm_would_not_take(tiny_data):
    proc = run_cli("train", "tiny", "--data", tiny_data, "--set", "aa=rand-m6-x3", check=False)
    assert_user_error(proc, "'aa'", "unsupported section 'x3'")
    proc = run_cli("train", "tiny", "--data", tiny_data, "--set", "aa=augmix-m5", check=False)
    assert_user_error(proc, "not a RandAugment string")


def test_unknown_model(tiny_data, tmp_path):
    proc = run_cli("train", "tiny", "--data", tiny_data, "--out", tmp_path / "o", "--set", "model=resnet5000", check=False)
    assert_user_error(proc, "unknown timm model 'resnet5000'")
