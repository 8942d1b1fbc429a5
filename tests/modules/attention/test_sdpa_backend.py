"""sdpa_backend: the named kernel first, every other one still enabled, flags restored, bad names refused."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from mmtrain.errors import ConfigError
from mmtrain.modules.attention.sdpa_backend import sdpa_backend, sdpa_backend_order


def test_order_puts_the_named_backend_first_and_keeps_the_rest():
    assert sdpa_backend_order("auto") is None and sdpa_backend_order(None) is None
    order = sdpa_backend_order("cudnn")
    assert order[0] == SDPBackend.CUDNN_ATTENTION and len(order) == 4 and len(set(order)) == 4
    assert sdpa_backend_order("math")[0] == SDPBackend.MATH
    with pytest.raises(ConfigError, match="unknown 'fa3'.*cudnn"):
        sdpa_backend_order("fa3")


@pytest.mark.parametrize("name", ["auto", "cudnn", "flash", "efficient", "math"])
def test_attention_is_unchanged_under_every_choice_on_cpu(name):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64) for _ in range(3))
    reference = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    with sdpa_backend(name):
        out = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, reference)


def test_flags_are_restored_after_the_context():
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
              torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    with sdpa_backend("cudnn"):
        # set_priority keeps all four enabled: only the order changes
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cuda.cudnn_sdp_enabled()
    after = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    assert before == after
