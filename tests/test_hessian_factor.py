"""The in-place factorisation GPTQ reads: equal to the textbook one, in H's own buffer, retries intact."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import lowbit.quantize.gptq as gptq
from lowbit.quantize.gptq import GPTQConfig, gptq_quantize
from lowbit.quantize import hessian_factor
from lowbit.quantize.hessian_factor import damped_inverse_factor_, permute_symmetric_


def hessian(k: int, rows: int | None = None, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(k, rows or 2 * k) + 0.5 * torch.randn(k, 1)  # correlated columns
    return 2 / x.shape[1] * x @ x.T


def textbook_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """cholesky(inverse(H + damp mean(diag) I), upper): the reference GPTQ's three K x K steps."""
    damped = H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)


@pytest.mark.parametrize("k, block", [(7, 3), (64, 16), (300, 128), (600, 256)])
def test_factor_equals_the_textbook_one_and_keeps_the_lower_triangle(k, block):
    H = hessian(k)
    work = H.clone()
    assert damped_inverse_factor_(work, 0.01, block) == 0.01
    expected = textbook_factor(H.double(), 0.01)
    torch.testing.assert_close(work.triu().double(), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert torch.equal(work.tril(-1), H.tril(-1))


def test_a_singular_hessian_is_retried_with_more_damping_from_the_untouched_triangle():
    H = hessian(50, rows=10)  # rank 10: not positive definite without damping
    work = H.clone()
    assert damped_inverse_factor_(work, 0.0, 16) == 0.01
    expected = textbook_factor(H.double(), 0.01)
    torch.testing.assert_close(work.triu().double(), expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_no_second_k_by_k_matrix_is_allocated():
    k = 1024
    H = hessian(k)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        damped_inverse_factor_(H, 0.01)
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    if not sizes:
        pytest.skip("this torch's profiler does not expose memory events")
    assert max(sizes) <= k * 256 * 4  # one [K, 256] panel at most, a quarter of one K x K matrix


@pytest.mark.parametrize("band_bytes", [2**21, 3 * 40 * 4])  # one band; bands of 3 rows, the last of 1
def test_permutation_in_place(monkeypatch, band_bytes):
    monkeypatch.setattr(hessian_factor, "PERMUTE_BAND_BYTES", band_bytes)
    H = hessian(40)
    perm = torch.randperm(40)
    work = H.clone()
    permute_symmetric_(work, perm)
    assert torch.equal(work, H[perm][:, perm])
    W = torch.randn(7, 40)
    moved = W.clone()
    hessian_factor.permute_columns_(moved, perm)
    assert torch.equal(moved, W[:, perm])


@pytest.mark.parametrize("act_order, static_groups", [(False, False), (True, False), (True, True)])
def test_gptq_codes_equal_those_of_the_textbook_factor(monkeypatch, act_order, static_groups):
    torch.manual_seed(1)
    W = torch.randn(48, 256)
    H = hessian(256, seed=2)
    config = GPTQConfig(bits=4, group_size=32, act_order=act_order, static_groups=static_groups)
    new, new_stats = gptq_quantize(W, H, config)

    def textbook_in_place(work, damp):
        work.copy_(textbook_factor(work.double(), damp).float())
        return damp

    monkeypatch.setattr(gptq, "damped_inverse_factor_", textbook_in_place)
    old, old_stats = gptq_quantize(W, H, config)
    assert (new.codes == old.codes).float().mean() > 0.999  # only float reordering may flip a rounding
    assert new_stats.loss == pytest.approx(old_stats.loss, rel=1e-3)


def test_error_from_the_sweep_equals_the_direct_output_error():
    torch.manual_seed(3)
    W = torch.randn(40, 128)
    H = hessian(128, seed=4)
    H[5], H[:, 5] = 0, 0  # a dead input
    consumed = H.clone()
    q, stats = gptq_quantize(W, consumed, GPTQConfig(bits=3, group_size=32, act_order=True), consume_hessian=True)
    delta = (W - q.dequantize()).double()
    delta[:, 5] = 0
    direct = torch.einsum("nk,kl,nl->", delta, H.double(), delta) / torch.einsum("nk,kl,nl->", W.double(), H.double(),
                                                                                    W.double())
    assert stats.error == pytest.approx(float(direct), rel=1e-3)
    assert not torch.equal(consumed, H)  # it really worked in the caller's buffer
