"""--precision bf16 and --channels-last: the same recipe reaches the same accuracy as fp32 on digits, within a
stated tolerance, through real (tiny) runs."""
from __future__ import annotations

import json

import torch

from training.config import make_config
from training.train_ast import run

# bf16 keeps 8 bits of mantissa in the forward pass: on digits (360 test images) the two runs' test accuracies
# differ by a few images at most. Two points of accuracy is 7 images.
TOLERANCE = 0.02


def test_bf16_and_channels_last_reach_fp32s_accuracy_on_digits(tmp_path):
    # An AST run trains its base model first: both stages run in the precision asked for.
    common = dict(dataset="digits", teacher="ast", epochs=6, pgd_steps=3, seed=0)
    fp32 = run(make_config("digits", **common), tmp_path / "fp32", device="cpu", progress=False, export=False)
    fast = run(make_config("digits", **common, precision="bf16", channels_last=True), tmp_path / "bf16",
               device="cpu", progress=False, export=False)
    assert fp32["test_accuracy"] > 0.9
    assert abs(fast["test_accuracy"] - fp32["test_accuracy"]) <= TOLERANCE, (fast["test_accuracy"],
                                                                              fp32["test_accuracy"])
    # ...and bf16 really ran: the same seed and batches, but not the same arithmetic.
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name).rglob("log.jsonl").__next__()
                     .read_text().splitlines()] for name in ("fp32", "bf16")}
    assert losses["fp32"] != losses["bf16"]
    # The weights stay float32 (only the arithmetic is bf16): the exported model is the usual one.
    for checkpoint in (tmp_path / "bf16").rglob("checkpoint.pt"):  # the base's and (for ast) the teacher's
        state = torch.load(checkpoint, weights_only=False)["model"]
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
