"""Files that are not checkpoints, given where one is expected: a clear error, never a traceback."""
import io
import pickle

import pytest
import torch
from PIL import Image

from fastrsb.checkpoint import load_checkpoint
from fastrsb.errors import UserError


def _saved(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    return buffer.getvalue()


class Unlisted:  # a class torch's weights-only unpickler does not allow
    pass


CHECKPOINT = _saved({"model": {"fc.weight": torch.zeros(10, 64)}, "recipe": {"name": "tiny"}})

ODD_FILES = {
    # torch.load raised IndexError and KeyError on these two (a traceback from `fastrsb eval`)
    "passwd": (b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n",
               "not written by torch.save"),
    "text": (b"hello world\n" * 10, "not written by torch.save"),
    "empty": (b"", "the file is empty"),
    "jpeg": (_jpeg(), "not written by torch.save"),
    "pickle": (pickle.dumps([1, 2, 3], protocol=2), "not written by torch.save"),
    "cut in half": (CHECKPOINT[:len(CHECKPOINT) // 2], "truncated or damaged"),
    "cut short": (CHECKPOINT[:100], "truncated or damaged"),
    "objects": (_saved({"model": Unlisted(), "recipe": {}}), "never runs code from a checkpoint"),
    "no recipe": (_saved({"state_dict": {}, "epoch": 3}), "its entries: state_dict, epoch"),
    "a list": (_saved([1, 2]), "a list"),
}


@pytest.mark.parametrize("name", ODD_FILES)
def test_a_file_that_is_no_checkpoint_is_named_and_said_why(name, tmp_path):
    content, why = ODD_FILES[name]
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value) and why in str(caught.value), caught.value
    assert "\n" not in str(caught.value)


def test_a_checkpoint_loads(tmp_path):
    (tmp_path / "last.pt").write_bytes(CHECKPOINT)
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["model"]["fc.weight"], torch.zeros(10, 64))
