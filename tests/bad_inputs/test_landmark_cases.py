"""More landmarks than tokens, through the CLI on align_tiny (its text tower sees 16 tokens:
tokenizer.max_length).

- ``nystrom``: xFormers' rule, as many landmarks as tokens or more is exact softmax attention, so the run goes on and
  matches the default scaled-dot-product run.
- ``orthoformer``: landmarks are picked among the tokens, so more landmarks than tokens cannot work: exit status 2,
  one line naming the mechanism and the argument, no traceback. Its built-in config (32 landmarks) is such a case
  for align_tiny.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def _losses(output_dir) -> dict[int, float]:
    events = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return {e["step"]: e["loss"] for e in events if "loss" in e and "step" in e}


def test_nystrom_with_more_landmarks_than_tokens_is_exact_attention(contrastive, tmp_path):
    dense = contrastive()
    assert dense.status == 0, dense.err
    expected = _losses(contrastive.out)

    nystrom = contrastive("model/attention=nystrom", "model.attention.num_landmarks=1000",
                          f"output_dir={tmp_path / 'nystrom'}")  # the later output_dir wins
    assert nystrom.status == 0, nystrom.err
    assert "Traceback" not in nystrom.err
    got = _losses(tmp_path / "nystrom")
    assert sorted(got) == sorted(expected) == [1, 2]
    for step, loss in expected.items():
        # 4 landmarks (approximate) differ by ~2e-5 relative here; exact attention agrees to float32 rounding
        assert math.isclose(got[step], loss, rel_tol=1e-6), (step, got[step], loss)


@pytest.mark.parametrize("overrides, landmarks", [
    pytest.param(["model.attention.num_landmarks=1000"], 1000, id="1000-landmarks"),
    pytest.param([], 32, id="built-in-orthoformer-config-32-landmarks"),
])
def test_orthoformer_with_more_landmarks_than_tokens_is_one_line(contrastive, one_line, overrides, landmarks):
    result = contrastive("model/attention=orthoformer", *overrides)
    one_line(result, "orthoformer", f"num_landmarks={landmarks}", "16 tokens")
