import math

import pytest
import torch

from jitfast.network.attention import attention, attention_backend


def explicit_attention(q, k, v):
    weights = (q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
    return weights @ v.double()


def test_backends_agree_with_the_explicit_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 8, generator=g) for _ in range(3))
    expected = explicit_attention(q, k, v)
    for scores_fp32 in (False, True):
        out = attention(q, k, v, scores_fp32=scores_fp32)
        assert out.shape == (3, 2, 7, 8) and out.dtype == torch.float32
        assert torch.allclose(out.double(), expected, atol=1e-6)


def test_fp32_scores_accept_bf16_inputs():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g).bfloat16() * 3 for _ in range(3))
    expected = explicit_attention(q, k, v)
    out = attention(q, k, v, scores_fp32=True)
    assert out.dtype == torch.bfloat16
    assert (out.double() - expected).abs().max() < 0.05


def test_cpu_attention_takes_float32_where_gradients_flow(monkeypatch):
    """On the CPU, bf16 q, k, v that need gradients (a bf16 training step) go to SDPA in float32
    (its bf16 backward is the slower one there), the output back in bf16 with its gradients;
    without gradients (sampling), SDPA takes the bf16 inputs as they are."""
    import torch.nn.functional as F
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, **options):
        seen.append(q.dtype)
        return sdpa(q, k, v, **options)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 11, 16, generator=g).bfloat16().requires_grad_()
               for _ in range(3))
    with torch.autocast("cpu", torch.bfloat16):
        out = attention(q, k, v)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    assert (out.double() - explicit_attention(q, k, v)).abs().max() < 0.02
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))
    with torch.no_grad():
        attention(q, k, v)
    assert seen == [torch.float32, torch.bfloat16]


def test_backend_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_backend(cpu, torch.float32) == "sdpa"  # SDPA's CPU dispatch, not pinned
    assert attention_backend(cpu, torch.bfloat16, scores_fp32=True) == "fp32"
    assert attention_backend(cuda, torch.float32) == "sdpa-pinned"  # flash-attn needs fp16/bf16


def test_dropout_is_applied_only_when_asked():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 5, 4) for _ in range(3))
    assert torch.equal(attention(q, k, v), attention(q, k, v))
    assert not torch.allclose(attention(q, k, v, dropout_p=0.5), attention(q, k, v))


def test_backend_choice_compiles_without_lru_cache_warning(caplog):
    """The choice is traced inside every compiled forward; a functools.lru_cache there made
    Dynamo warn on each compile (as it did on CUDA)."""
    cuda = torch.device("cuda")

    @torch.compile(backend="eager", fullgraph=True)
    def pick(x):
        return x + len(attention_backend(cuda, torch.bfloat16))

    torch._dynamo.reset()
    with caplog.at_level("WARNING"):
        assert pick(torch.zeros(2)).tolist() == [len(attention_backend(cuda, torch.bfloat16))] * 2
    assert "lru_cache" not in caplog.text


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
def test_cuda_backends_take_v_as_a_view_of_qkv(backend):
    """On CUDA: each SDPA backend that the model's attention may pick (all three run these bf16,
    hd-64 inputs on Hopper: a refusal fails) reads the q/k op's v, a view of qkv with rows 3·D
    apart (nanoGPT's layout), as it reads a contiguous copy (output and every grad), and hands
    v's grad back in the (B, N, H, hd) layout the q/k backward takes without a copy
    (benchmarks/NOTES.md: the cut is undone if a backend copies)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from jitfast import kernels
    torch.manual_seed(0)
    B, N, H, hd = 2, 288, 12, 64
    qkv = torch.randn(B, N, 3 * H * hd, device="cuda", dtype=torch.bfloat16)
    tables = (torch.randn(N, hd, device="cuda") for _ in range(2))
    q, k, v = kernels.qk_norm_rope(qkv, H, *(torch.ones(hd, device="cuda") for _ in range(2)),
                                   *tables)
    assert v.data_ptr() == qkv.data_ptr() + 2 * H * hd * qkv.element_size()
    dout = torch.randn(B, H, N, hd, device="cuda", dtype=torch.bfloat16)
    results, v_grads = [], []
    for value in (v, v.contiguous()):
        inputs = [t.detach().requires_grad_() for t in (q, k, value)]
        inputs[2].register_hook(v_grads.append)
        with sdpa_kernel([getattr(SDPBackend, backend)]):  # each takes bf16, hd 64 on Hopper
            out = torch.nn.functional.scaled_dot_product_attention(*inputs)
            out.backward(dout)
        results.append([out, *(t.grad for t in inputs)])
    for got, want in zip(*results):
        assert (got.float() - want.float()).abs().max() <= 1e-2 * want.float().abs().max()
    assert v_grads[0].transpose(1, 2).is_contiguous(), v_grads[0].stride()
