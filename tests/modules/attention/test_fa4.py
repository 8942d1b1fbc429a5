"""FlashAttention-4 as a kernel: the layout and window handed to it, when dense and local attention route to it, the
error without the package; on a GPU with the fa4 extra, FA4 itself against float64 attention."""

import math
import sys

import pytest
import torch

from mmtrain.errors import ConfigError
from mmtrain.modules.attention import LocalAttention, ScaledDotProduct
from mmtrain.modules.attention import core as core_module
from mmtrain.modules.attention import fa4 as fa4_module
from mmtrain.modules.attention import local as local_module
from mmtrain.modules.attention.sdpa_backend import fa4_preferred, sdpa_backend, sdpa_backend_order


def reference(q, k, v, keep=None, scale=None):
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v


def flash_band(s_q, s_k, left, right):
    """FlashAttention's window: query i sees key j when -left <= j - i - (s_k - s_q) <= right."""
    keep = torch.zeros(s_q, s_k, dtype=torch.bool)
    for i in range(s_q):
        for j in range(s_k):
            keep[i, j] = -left <= j - i - (s_k - s_q) <= right
    return keep


class FakeFA4:
    """flash_attn.cute.interface's forward and backward on (batch, seq, heads, dim) tensors, in float64; records the
    forward calls."""

    def __init__(self):
        self.calls = []
        self.backward_calls = 0

    @staticmethod
    def _keep(s_q, s_k, causal, left, right):
        if causal:
            left, right = s_k, 0
        return None if left is None else flash_band(s_q, s_k, left, right)

    @staticmethod
    def _probabilities(q, k, keep, scale):
        """(b, h, s, d) float64 in -> softmax probabilities (b, h, s_q, s_k) and their log-sum-exp (b, h, s_q)."""
        scores = q @ k.transpose(-1, -2) * scale
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0), torch.logsumexp(scores, dim=-1)

    def _flash_attn_fwd(self, q, k, v, softmax_scale=None, causal=False, window_size_left=None,
                        window_size_right=None, return_lse=False):
        assert q.ndim == 4 and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2]  # (b, s, h, d)
        assert all(x.stride(-1) == 1 for x in (q, k, v))  # FA4 takes other strides, not a strided head dim
        self.calls.append({"shape": tuple(q.shape), "v_shape": tuple(v.shape), "causal": causal,
                           "window_size": (window_size_left, window_size_right), "scale": softmax_scale,
                           "contiguous": all(x.is_contiguous() for x in (q, k, v)),
                           "storage": {x.untyped_storage().data_ptr() for x in (q, k, v)}})
        keep = self._keep(q.shape[1], k.shape[1], causal, window_size_left, window_size_right)
        q, k, v = (x.transpose(1, 2).double() for x in (q, k, v))
        p, lse = self._probabilities(q, k, keep, softmax_scale)
        out = (p @ v).transpose(1, 2)
        return out.to(v.dtype).contiguous(), lse.float(), None, None, None

    def _flash_attn_bwd(self, q, k, v, out, dout, lse, softmax_scale=None, causal=False, window_size_left=None,
                        window_size_right=None, dq=None, dk=None, dv=None):
        """Attention's gradients written out (custom ops run below autograd): dV = P^T dO, dP = dO V^T,
        dS = P * (dP - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q."""
        self.backward_calls += 1
        dq_out, dk_out, dv_out = dq, dk, dv
        dtype = q.dtype
        keep = self._keep(q.shape[1], k.shape[1], causal, window_size_left, window_size_right)
        q, k, v, out, dout = (x.transpose(1, 2).double() for x in (q, k, v, out, dout))
        p, _ = self._probabilities(q, k, keep, softmax_scale)
        dv = p.transpose(-1, -2) @ dout
        dp = dout @ v.transpose(-1, -2)
        ds = p * (dp - (dout * out).sum(-1, keepdim=True))
        dq = softmax_scale * ds @ k
        dk = softmax_scale * ds.transpose(-1, -2) @ q
        grads = [g.transpose(1, 2).to(dtype).contiguous() for g in (dq, dk, dv)]
        self.backward_outputs = [given is not None for given in (dq_out, dk_out, dv_out)]
        for i, given in enumerate((dq_out, dk_out, dv_out)):
            if given is not None:  # as FA4 does: written into the caller's (possibly strided) tensors
                given.copy_(grads[i])
                grads[i] = given
        return tuple(grads)


@pytest.fixture
def fake_fa4(monkeypatch):
    fake = FakeFA4()
    monkeypatch.setattr(fa4_module, "_module", fake)
    monkeypatch.setattr(fa4_module, "_probed", True)
    monkeypatch.setattr(fa4_module, "_import_error", None)
    return fake


def qkv(*lead, s_q, s_k=None, d=8):
    g = torch.Generator().manual_seed(0)
    s_k = s_q if s_k is None else s_k
    return (torch.randn(*lead, s_q, d, generator=g, dtype=torch.float64),
            torch.randn(*lead, s_k, d, generator=g, dtype=torch.float64),
            torch.randn(*lead, s_k, d, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("lead", [(2, 3), (6,), (2, 2, 3)])
def test_fa4_attention_hands_over_heads_as_bshd_and_returns_the_callers_layout(fake_fa4, lead):
    q, k, v = qkv(*lead, s_q=9)
    out = fa4_module.fa4_attention(q, k, v, window=(2, 2))
    assert out.shape == q.shape
    torch.testing.assert_close(out, reference(q, k, v, flash_band(9, 9, 2, 2)))
    heads = {(2, 3): 3, (6,): 1, (2, 2, 3): 3}[lead]
    # head dim 8 reaches FA4 zero-padded to 32, with the scale of the real head dim
    assert fake_fa4.calls[-1]["shape"][1:] == (9, heads, 32) and fake_fa4.calls[-1]["v_shape"][-1] == 32
    assert fake_fa4.calls[-1]["scale"] == pytest.approx(8 ** -0.5)
    assert fake_fa4.calls[-1]["window_size"] == (2, 2)
    assert fake_fa4.calls[-1]["contiguous"]  # padded: F.pad wrote a new (b, s, h, d) tensor


def test_fa4_reads_the_callers_heads_in_place_and_writes_gradients_in_their_layout(fake_fa4):
    """A (batch, heads, S, D) input whose head dim needs no padding reaches FA4 as its transposed view (no copy of
    q, k, v, and none kept for the backward); the gradients come back in the same layout, equal to a float64
    reference."""
    q, k, v = (t.requires_grad_() for t in qkv(2, 3, s_q=7, d=32))
    out = fa4_module.fa4_attention(q, k, v, window=(2, 1))
    call = fake_fa4.calls[-1]
    assert not call["contiguous"] and call["storage"] == {x.untyped_storage().data_ptr() for x in (q, k, v)}
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert fake_fa4.backward_outputs == [True, True, True]  # written into tensors the op allocated
    ref_q, ref_k, ref_v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    (reference(ref_q, ref_k, ref_v, flash_band(7, 7, 2, 1)) * weights).sum().backward()
    for got, want in ((q.grad, ref_q.grad), (k.grad, ref_k.grad), (v.grad, ref_v.grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("packed", [False, True])
def test_eager_calls_skip_the_custom_ops_and_compute_what_they_compute(fake_fa4, monkeypatch, packed):
    """Eager calls run FA4's kernels from an autograd Function, not through the dispatcher (whose Python cost
    exceeded the kernels' at short lengths); compiled code takes the custom ops. Outputs and gradients are the same
    either way."""
    torch.manual_seed(0)
    qkv_packed = torch.randn(2, 5, 3 * 2 * 8, dtype=torch.float64)
    q, k, v = qkv(2, 3, s_q=7, d=32)

    def run():
        if packed:
            leaf = qkv_packed.clone().requires_grad_()
            out = fa4_module.fa4_packed_attention(leaf, 2, window=(1, 1))
            leaves = (leaf,)
        else:
            leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
            out = fa4_module.fa4_attention(*leaves, window=(2, 1))
        weights = torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).cos()
        return out.detach(), torch.autograd.grad((out * weights).sum(), leaves)

    ops = ("_fa4_packed_forward", "_fa4_packed_backward") if packed else ("_fa4_forward", "_fa4_backward")
    originals = {name: getattr(fa4_module, name) for name in ops}
    used = []
    for name in ops:
        monkeypatch.setattr(fa4_module, name, lambda *a, _name=name: used.append(_name) or originals[_name](*a))
    eager_out, eager_grads = run()
    assert used == [] and fake_fa4.backward_calls == 1
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # what compiled code takes
    op_out, op_grads = run()
    assert used[0] == ops[0] and fake_fa4.backward_calls == 2
    assert torch.equal(eager_out, op_out)
    assert all(torch.equal(a, b) for a, b in zip(eager_grads, op_grads))


def test_fa4_head_dims_are_padded_to_the_multiple_and_gradients_flow_back(fake_fa4):
    assert [fa4_module._padded(d) for d in (32, 64, 80, 96, 100, 128)] == [32, 64, 96, 96, 128, 128]
    q, k, v = (t.requires_grad_() for t in qkv(2, 3, s_q=5, d=80))
    out = fa4_module.fa4_attention(q, k, v)
    assert fake_fa4.calls[-1]["shape"][-1] == 96 and out.shape == (2, 3, 5, 80)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = reference(*leaves)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn(out.shape, dtype=out.dtype)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(expected, leaves, grad_out)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("window", [None, (2, 1)])
def test_fa4_attention_traces_into_one_graph_with_its_backward(fake_fa4, window):
    """FA4's kernels are custom ops: torch.compile keeps a layer around them one graph (fullgraph raises on a
    break), and the compiled backward calls FA4's backward once."""
    q, k, v = (t.requires_grad_() for t in qkv(2, 3, s_q=6, d=80))

    def layer(q, k, v):
        return (fa4_module.fa4_attention(q * 2.0, k, v, window=window) + 1.0).sin()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    keep = None if window is None else flash_band(6, 6, *window)
    expected = (reference(leaves[0] * 2.0, *leaves[1:], keep) + 1.0).sin()
    torch.testing.assert_close(out, expected)
    assert fake_fa4.calls[-1]["shape"][-1] == 96 and fake_fa4.calls[-1]["window_size"] == (window or (None, None))
    grad_out = torch.randn(out.shape, dtype=out.dtype)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    assert fake_fa4.backward_calls == 1
    for g, want in zip(got, torch.autograd.grad(expected, leaves, grad_out)):
        torch.testing.assert_close(g, want)


def packed_projection(b=2, s=6, heads=2, d=8, bias=True):
    """float64 weights of a fused-QKV self-attention layer and an input."""
    g = torch.Generator().manual_seed(3)
    width = heads * d
    x = torch.randn(b, s, width, generator=g, dtype=torch.float64)
    weights = [torch.randn(width, width, generator=g, dtype=torch.float64) / math.sqrt(width) for _ in range(4)]
    biases = [torch.randn(width, generator=g, dtype=torch.float64) for _ in range(3)] if bias else [None] * 3
    return x, weights, biases


@pytest.mark.parametrize("causal", [False, True])
def test_fused_qkv_attention_reads_and_writes_the_packed_projection_in_place(fake_fa4, monkeypatch, causal):
    """With fused QKV on FA4, q, k, v reach the kernel as strided slices of one projection output (no copies), and
    the backward's dq, dk, dv are written into one packed gradient; values and gradients match float64 attention."""
    from mmtrain.modules.attention import MultiHeadAttention

    monkeypatch.setattr(core_module, "fa4_packed_supported", lambda qkv, num_heads: True)
    b, s, heads, d = 2, 6, 2, 8
    x, weights, biases = packed_projection(b, s, heads, d)
    mha = MultiHeadAttention(embed_dim=heads * d, num_heads=heads, bias=True, is_causal=causal,
                             fused_qkv=True).double()
    with torch.no_grad():
        for proj, w, bias in zip((mha.q_proj, mha.k_proj, mha.v_proj, mha.output_proj), weights, biases + [None]):
            proj.weight.copy_(w)
            proj.bias.copy_(bias if bias is not None else torch.zeros_like(proj.bias))
    x = x.requires_grad_()
    with sdpa_backend("fa4"):
        out = mha(x)
    call = fake_fa4.calls[-1]
    assert call["shape"] == (b, s, heads, d) and not call["contiguous"] and len(call["storage"]) == 1
    assert call["causal"] is causal

    leaves = [t.detach().clone().requires_grad_() for t in (x, *weights[:3], *biases)]
    x_ref, wq, wk, wv, bq, bk, bv = leaves
    split = [(x_ref @ w.T + bias).view(b, s, heads, d).transpose(1, 2) for w, bias in ((wq, bq), (wk, bk), (wv, bv))]
    keep = torch.ones(s, s, dtype=torch.bool).tril() if causal else None
    expected = reference(*split, keep=keep).transpose(1, 2).reshape(b, s, heads * d) @ weights[3].T
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(out, [x, mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight,
                                    mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias], grad_out)
    assert fake_fa4.backward_calls == 1 and fake_fa4.backward_outputs == [True, True, True]
    for g, want in zip(got, torch.autograd.grad(expected, leaves, grad_out)):
        torch.testing.assert_close(g, want)


def test_packed_attention_traces_into_one_graph(fake_fa4):
    x, weights, _ = packed_projection(bias=False)
    weight = torch.cat(weights[:3]).requires_grad_()

    def layer(x, weight):
        return fa4_module.fa4_packed_attention(x @ weight.T, 2, causal=True).sin()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x, weight)
    assert out.shape == (2, 6, 2, 8)
    (grad,) = torch.autograd.grad(out.sum(), weight)
    leaf = weight.detach().clone().requires_grad_()
    q, k, v = (x @ w.T for w in leaf.split(16))
    split = [t.view(2, 6, 2, 8).transpose(1, 2) for t in (q, k, v)]
    expected = reference(*split, keep=torch.ones(6, 6, dtype=torch.bool).tril()).transpose(1, 2).sin()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), leaf)[0])
    assert fake_fa4.backward_calls == 1


def test_packed_attention_is_only_taken_where_fa4_would_take_it(fake_fa4, monkeypatch):
    from mmtrain.modules.attention import MultiHeadAttention

    qkv_cpu = torch.randn(1, 4, 3 * 2 * 16, dtype=torch.bfloat16)
    assert not fa4_module.fa4_packed_supported(qkv_cpu, 2)  # not on CUDA
    with monkeypatch.context() as hopper:
        hopper.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        hopper.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        assert fa4_module.fa4_packed_supported(qkv_cpu, 2)
        assert not fa4_module.fa4_packed_supported(qkv_cpu, 5)  # 96 is not 3 * 5 heads wide
        head_dim_24 = torch.randn(1, 4, 3 * 2 * 24, dtype=torch.bfloat16)
        assert fa4_module.fa4_supported(*head_dim_24.view(1, 4, 3, 2, 24).unbind(2))  # unpacked: padded
        assert not fa4_module.fa4_packed_supported(head_dim_24, 2)  # the packed one would need padding in place
    mha = MultiHeadAttention(embed_dim=16, num_heads=2, fused_qkv=True).double()
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    assert mha.attention.packed_self_attention(torch.randn(1, 4, 48, dtype=torch.float64), 2) is None
    with sdpa_backend("fa4"):
        mha(x)  # on CPU FA4 declines: the split projections go through SDPA
    assert fake_fa4.calls == []


def test_sm90_backward_hands_the_dq_accumulator_helpers_the_kernels_rounding():
    """FA4 b40's SM90 kernel rounds head dims to 16 for its dQ accumulator, its helpers to 32: inside mmtrain's
    backward the helpers get 16 (64, for head dims above 128, already agrees), and afterwards they are restored."""
    import types

    seen = []
    module = types.ModuleType("fake_interface")

    def _bwd_preprocess(*args, hdim_multiple_of=32, **kwargs):
        assert "pre" in module._bwd_preprocess.compile_cache  # found through the module, as FA4's helpers do
        seen.append(("pre", hdim_multiple_of))

    def _bwd_postprocess_convert(*args, hdim_multiple_of=32, **kwargs):
        assert "post" in module._bwd_postprocess_convert.compile_cache
        seen.append(("post", hdim_multiple_of))

    _bwd_preprocess.compile_cache = {"pre": 1}
    _bwd_postprocess_convert.compile_cache = {"post": 1}
    module._bwd_preprocess, module._bwd_postprocess_convert = _bwd_preprocess, _bwd_postprocess_convert
    with fa4_module._sm90_dq_accumulator_rounding(module):
        module._bwd_preprocess(hdim_multiple_of=32)
        module._bwd_postprocess_convert(hdim_multiple_of=32)
        module._bwd_postprocess_convert(hdim_multiple_of=64)
    assert seen == [("pre", 16), ("post", 16), ("post", 64)]
    assert module._bwd_preprocess is _bwd_preprocess and module._bwd_postprocess_convert is _bwd_postprocess_convert


def test_flop_counting_sets_fa4_aside(fake_fa4, monkeypatch):
    from mmtrain.training.throughput import count_flops

    monkeypatch.setattr(core_module, "fa4_supported", fa4_module.fa4_supported)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    q, k, v = (t.bfloat16() for t in qkv(1, 2, s_q=16, d=32))
    with sdpa_backend("fa4"):
        count_flops(lambda: ScaledDotProduct()(q, k, v))
        assert fake_fa4.calls == []  # counted through torch's attention
        ScaledDotProduct()(q, k, v)
        assert len(fake_fa4.calls) == 1  # and FA4 again after the count


def test_dense_attention_routes_to_fa4_only_inside_the_fa4_context(fake_fa4, monkeypatch):
    monkeypatch.setattr(core_module, "fa4_supported", lambda q, k, v: True)
    attention = ScaledDotProduct()
    q, k, v = qkv(2, 3, s_q=7)
    out = attention(q, k, v)
    assert fake_fa4.calls == []  # outside the context: SDPA
    with sdpa_backend("fa4"):
        assert fa4_preferred()
        routed = attention(q, k, v)
        assert len(fake_fa4.calls) == 1 and fake_fa4.calls[0]["causal"] is False
        # a mask FA4 does not take, and dropout while training, stay with SDPA
        attention(q, k, v, att_mask=torch.ones(7, 7, dtype=torch.bool))
        dropping = ScaledDotProduct(dropout=0.1).train()
        dropping(q, k, v)
        assert len(fake_fa4.calls) == 1
    assert not fa4_preferred()
    torch.testing.assert_close(routed, reference(q, k, v))
    torch.testing.assert_close(out, routed)


def test_causal_decoding_routes_with_fa4s_bottom_right_band(fake_fa4, monkeypatch):
    monkeypatch.setattr(core_module, "fa4_supported", lambda q, k, v: True)
    q, k, v = qkv(2, 3, s_q=3, s_k=8)
    with sdpa_backend("fa4"):
        out = ScaledDotProduct(causal=True)(q, k, v)
        longer_queries = qkv(2, 3, s_q=8, s_k=3)
        ScaledDotProduct(causal=True)(*longer_queries)  # rows with no key: SDPA's explicit band, not FA4
    assert [call["causal"] for call in fake_fa4.calls] == [True]
    keep = torch.ones(3, 8, dtype=torch.bool).tril(diagonal=5)
    torch.testing.assert_close(out, reference(q, k, v, keep))


@pytest.mark.parametrize("causal", [False, True])
def test_local_attention_auto_takes_fa4_with_its_window(fake_fa4, monkeypatch, causal):
    monkeypatch.setattr(local_module, "fa4_supported", lambda q, k, v: True)
    attention = LocalAttention(window_size=5, causal=causal)
    q, k, v = qkv(2, 3, s_q=12)
    out = attention.unmasked_cuda_forward(q, k, v)
    assert attention.last_kernel == "fa4"
    assert fake_fa4.calls[-1]["window_size"] == ((5, 0) if causal else (2, 2))
    expected_keep = torch.zeros(12, 12, dtype=torch.bool)
    for i in range(12):
        for j in range(12):
            expected_keep[i, j] = (0 <= i - j <= 5) if causal else abs(i - j) <= 2
    torch.testing.assert_close(out, reference(q, k, v, expected_keep))
    attention.kernel = "flex"
    assert attention.unmasked_cuda_forward(q, k, v) is None


def test_naming_fa4_without_the_package_is_a_config_error(monkeypatch):
    monkeypatch.setattr(fa4_module, "_module", None)
    monkeypatch.setattr(fa4_module, "_probed", True)
    monkeypatch.setattr(fa4_module, "_import_error", "ModuleNotFoundError: No module named 'flash_attn'")
    with pytest.raises(ConfigError, match=r"fa4 needs FlashAttention-4.*No module named 'flash_attn'.*mmtrain\[fa4\]"):
        sdpa_backend_order("fa4")
    assert not fa4_module.fa4_supported(*qkv(1, s_q=4))
    with pytest.raises(RuntimeError, match="not available"):
        fa4_module.fa4_attention(*qkv(1, s_q=4))



def _fresh_probe(monkeypatch, installed):
    """fa4_module() probes again, with importlib reporting ``installed`` as flash-attn-4's version (None: absent)."""
    def version(name):
        if installed is None:
            raise fa4_module.importlib.metadata.PackageNotFoundError(name)
        assert name == "flash-attn-4"
        return installed

    monkeypatch.setattr(fa4_module, "_module", None)
    monkeypatch.setattr(fa4_module, "_probed", False)
    monkeypatch.setattr(fa4_module, "_import_error", None)
    monkeypatch.setattr(fa4_module.importlib.metadata, "version", version)
    monkeypatch.delenv(fa4_module.ANY_VERSION_ENV, raising=False)


def test_another_flash_attn_4_version_is_refused_with_the_pin_in_the_error(monkeypatch):
    _fresh_probe(monkeypatch, "4.0.0b41")
    assert fa4_module.fa4_module() is None
    error = fa4_module.fa4_import_error()
    assert error.startswith("flash-attn-4 4.0.0b41 is installed, but mmtrain calls private kernels of 4.0.0b40")
    assert "pip install 'flash-attn-4==4.0.0b40'" in error and "MMTRAIN_FA4_ANY_VERSION=1" in error
    with pytest.raises(ConfigError, match=r"fa4 needs FlashAttention-4.*4\.0\.0b41 is installed"):
        sdpa_backend_order("fa4")
    assert not fa4_module.fa4_supported(*qkv(1, s_q=4))


def test_the_pinned_version_or_an_opt_in_goes_on_to_the_import(monkeypatch):
    imported = []

    class Finder:  # stands in for the package: records that the import was reached, then fails it as on CPU
        def find_spec(self, name, path=None, target=None):
            if name == "flash_attn":
                imported.append(name)
                raise ImportError("no CUDA toolkit here")
            return None

    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    for installed, opt_in in (("4.0.0b40", None), ("4.0.0b41", "1"), (None, "1")):
        _fresh_probe(monkeypatch, installed)
        if opt_in:
            monkeypatch.setenv(fa4_module.ANY_VERSION_ENV, opt_in)
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
        assert fa4_module.fa4_module() is None
        assert fa4_module.fa4_import_error() == "ImportError: no CUDA toolkit here"
    assert imported == ["flash_attn"] * 3
    _fresh_probe(monkeypatch, None)
    assert fa4_module.fa4_module() is None and fa4_module.fa4_import_error() == "flash-attn-4 is not installed"
    assert imported == ["flash_attn"] * 3  # without the package nothing is imported

needs_fa4 = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
         and fa4_module.fa4_module() is not None),
    reason="needs a Hopper-or-later GPU and the fa4 extra")


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("case", ["dense_d80", "dense_d72", "causal", "local", "local_causal"])
def test_fa4_matches_float64_attention_with_gradients_on_gpu(case):
    g = torch.Generator(device="cuda").manual_seed(0)
    d = {"dense_d80": 80, "dense_d72": 72}.get(case, 64)
    b, h, s = 2, 3, 300
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    keep = None
    if case.startswith("dense"):
        with sdpa_backend("fa4"):
            out = ScaledDotProduct()(q, k, v)
    elif case == "causal":
        with sdpa_backend("fa4"):
            out = ScaledDotProduct(causal=True)(q, k, v)
        keep = torch.ones(s, s, dtype=torch.bool, device="cuda").tril()
    else:
        attention = LocalAttention(window_size=33 if case == "local" else 16, causal=case == "local_causal")
        out = attention(q, k, v)
        assert attention.last_kernel == "fa4"
        i = torch.arange(s, device="cuda")
        distance = i[:, None] - i[None, :]
        keep = distance.abs() <= 16 if case == "local" else (distance >= 0) & (distance <= 16)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference(*leaves, keep=keep)
    tolerance = {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(out.double(), expected, **tolerance)
    grad_out = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for name, got, want in zip("qkv", grads, torch.autograd.grad(expected, leaves, grad_out.double())):
        torch.testing.assert_close(got.double(), want, **tolerance, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("causal", [False, True])
def test_fused_qkv_on_fa4_matches_float64_attention_on_gpu(monkeypatch, causal):
    """Head dim 80 (the 11B vision encoder's) through the packed op: FA4 reads strided slices of the projection and
    writes dq, dk, dv into one packed gradient."""
    from mmtrain.modules.attention import MultiHeadAttention

    packed_calls = []
    kernel = fa4_module._packed_forward_kernel  # what the eager Function and the custom op both run
    monkeypatch.setattr(fa4_module, "_packed_forward_kernel", lambda *a: packed_calls.append(1) or kernel(*a))
    torch.manual_seed(0)
    b, s, heads, d = 2, 300, 4, 80
    mha = MultiHeadAttention(embed_dim=heads * d, num_heads=heads, bias=True, is_causal=causal, fused_qkv=True)
    mha = mha.to("cuda", torch.bfloat16)
    x = torch.randn(b, s, heads * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with sdpa_backend("fa4"):
        out = mha(x)
    assert packed_calls == [1]
    params = [mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight, mha.q_proj.bias, mha.k_proj.bias,
              mha.v_proj.bias]
    leaves = [t.detach().double().requires_grad_() for t in (x, *params)]
    x64, wq, wk, wv, bq, bk, bv = leaves
    split = [(x64 @ w.T + bias).view(b, s, heads, d).transpose(1, 2) for w, bias in ((wq, bq), (wk, bk), (wv, bv))]
    keep = torch.ones(s, s, dtype=torch.bool, device="cuda").tril() if causal else None
    attended = reference(*split, keep=keep).transpose(1, 2).reshape(b, s, heads * d)
    expected = attended @ mha.output_proj.weight.double().T + mha.output_proj.bias.double()
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)
    grad_out = torch.randn(out.shape, device="cuda", dtype=out.dtype)
    grads = dict(zip(["x", "q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "k_proj.bias",
                      "v_proj.bias"], torch.autograd.grad(out, [x, *params], grad_out)))
    wanted = dict(zip(grads, torch.autograd.grad(expected, leaves, grad_out.double())))
    for name in grads:
        if name == "k_proj.bias":
            continue
        relative = (grads[name].double() - wanted[name]).norm() / wanted[name].norm()
        assert relative < 2e-2, f"d{name}: relative error {relative:.3g}"
    # A shift shared by every key moves each query's scores by one constant, which softmax ignores: the key bias's
    # true gradient is 0, so bf16 rounding is all that is left of it.
    assert grads["k_proj.bias"].double().norm() < 2e-2 * wanted["v_proj.bias"].norm()
