import os
import subprocess
import sys

import pytest

from fastrsb.demo_data import write_demo

# 4 classes x 12 train / 5 val images: 20 val images do not divide into batches of 8, so the
# partial last batch is exercised; each class holds the odd files (gray, CMYK, progressive, PNG).
TINY = dict(train_per_class=12, val_per_class=5, num_classes=4)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return write_demo(tmp_path_factory.mktemp("data") / "tiny", seed=1, **TINY)


def run_cli(*args, check=True):
    """Run `python -m fastrsb ARGS` as a user would; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "fastrsb", *map(str, args)], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"fastrsb {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def assert_user_error(proc, *fragments):
    """A clear one-line error: exit 2, 'fastrsb: error: ...' naming what is wrong, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fastrsb: error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
