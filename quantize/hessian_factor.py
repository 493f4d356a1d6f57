"""GPTQ's one K x K matrix: the upper Cholesky factor of the damped inverse Hessian, made in H's own buffer.

GPTQ reads U, the upper-triangular matrix with (H + lambda I)^-1 = U^T U. With
H = R R^T for an upper-triangular R (a Cholesky factorisation taken from the
bottom-right corner up), U = R^-1. Both steps run block by block in the upper
triangle of H itself, so no second K x K matrix is ever allocated: the
temporaries are a few [K, block] panels.

The strict lower triangle is never written. It keeps H's off-diagonal entries,
so a factorisation that fails (H not positive definite enough) is undone from
it and the saved diagonal, and retried with more damping.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from lowbit.errors import CorruptInputError

log = logging.getLogger("lowbit")

DAMP_RETRIES = 4  # each retry multiplies the damping by 10
BLOCK = 256


def damped_inverse_factor_(H: Tensor, damp: float, block: int = BLOCK) -> float:
    """Turn H [K, K] (symmetric, float32) into U in place: its upper triangle, diagonal included.

    Damping adds damp * mean(diag H) to the diagonal. Returns the damping finally used.
    Only the upper triangle of the result means anything; the strict lower one still holds H.
    """
    diagonal = H.diagonal().clone()
    mean_diag = diagonal.mean()
    for attempt in range(DAMP_RETRIES + 1):
        H.diagonal().copy_(diagonal + damp * mean_diag)
        if _reverse_cholesky_(H, block):
            _invert_upper_(H, block)
            return damp
        _restore_upper_(H, block)
        if attempt < DAMP_RETRIES:
            new_damp = damp * 10 if damp > 0 else 0.01
            log.warning("Hessian not positive definite with damp %g; retrying with damp %g", damp, new_damp)
            damp = new_damp
    raise CorruptInputError(f"Hessian is not positive definite even with damp {damp:g}")


def _blocks(n: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, n)) for start in range(0, n, block)]


def _set_upper(square: Tensor, upper: Tensor) -> None:
    """Write upper's upper triangle into the square view, leaving its strict lower triangle as it is."""
    square.copy_(upper.triu() + square.tril(-1))


def _reverse_cholesky_(H: Tensor, block: int) -> bool:
    """H = R R^T with R upper-triangular, R written over H's upper triangle; False if H is not positive definite.

    Bottom-right block first: its R is the flipped lower Cholesky factor of the flipped block; the panel above
    it is solved against it; the top-left rest is updated by the panel's outer product, upper triangle only.
    """
    for k, e in reversed(_blocks(H.shape[0], block)):
        corner = H[k:e, k:e]
        symmetric = corner.triu() + corner.triu(1).T
        lower, info = torch.linalg.cholesky_ex(symmetric.flip(0, 1))
        if info.item() != 0:
            return False
        R22 = lower.flip(0, 1)
        _set_upper(corner, R22)
        if k == 0:
            break
        panel = torch.linalg.solve_triangular(R22.T, H[:k, k:e], upper=False, left=False)  # panel R22^T = H[:k, k:e]
        H[:k, k:e] = panel
        for j, je in _blocks(k, block):  # H[:k, :k] -= panel panel^T, upper triangle only
            if j > 0:
                H[:j, j:je].addmm_(panel[:j], panel[j:je].T, alpha=-1)
            diagonal_block = H[j:je, j:je]
            _set_upper(diagonal_block, diagonal_block - panel[j:je] @ panel[j:je].T)
    return True


def _invert_upper_(H: Tensor, block: int) -> None:
    """Replace the upper-triangular R in H's upper triangle by R^-1, right-most block column first.

    With R = [[R11, R12], [0, R22]] and R22^-1 already in place: R^-1 = [[R11^-1, -R11^-1 R12 R22^-1], [0, R22^-1]].
    """
    n = H.shape[0]
    for k, e in reversed(_blocks(n, block)):
        corner = H[k:e, k:e]
        eye = torch.eye(e - k, dtype=H.dtype, device=H.device)
        U11 = torch.linalg.solve_triangular(corner.triu(), eye, upper=True)
        if e < n:
            R12 = H[k:e, e:]
            product = torch.zeros_like(R12)  # R12 @ R22^-1, read block by block from the upper triangle
            for j, je in _blocks(n - e, block):
                j, je = j + e, je + e
                if j > e:
                    product[:, j - e : je - e] += R12[:, : j - e] @ H[e:j, j:je]
                product[:, j - e : je - e] += R12[:, j - e : je - e] @ H[j:je, j:je].triu()
            H[k:e, e:] = -(U11 @ product)
        _set_upper(corner, U11)


def _restore_upper_(H: Tensor, block: int) -> None:
    """Copy the untouched strict lower triangle back over the upper one (the diagonal is the caller's)."""
    for k, e in _blocks(H.shape[0], block):
        H[:k, k:e] = H[k:e, :k].T
        corner = H[k:e, k:e]
        corner.copy_(corner.tril() + corner.tril(-1).T)


def permute_symmetric_(H: Tensor, perm: Tensor) -> None:
    """H <- H[perm][:, perm], in place: rows moved along the permutation's cycles, then columns a band at a time."""
    permute_along_(H, perm.tolist(), 0)
    permute_columns_(H, perm)


PERMUTE_BAND_BYTES = 2**21  # one band's gathered copy: far below the solver's [rows, K] temporaries


def permute_columns_(M: Tensor, perm: Tensor) -> None:
    """M <- M[:, perm], in place, a band of rows at a time (2.6x faster than moving strided columns one by one)."""
    rows = max(1, PERMUTE_BAND_BYTES // (M.shape[1] * M.element_size()))
    for start in range(0, M.shape[0], rows):
        band = M[start : start + rows]
        band.copy_(band.index_select(1, perm))


def permute_along_(H: Tensor, perm: list[int], dim: int) -> None:
    """Slice i of H along dim becomes the old slice perm[i], one slice held aside per cycle."""
    line = (lambda i: H[i]) if dim == 0 else (lambda i: H[:, i])
    seen = [False] * len(perm)
    for start in range(len(perm)):
        if seen[start] or perm[start] == start:
            seen[start] = True
            continue
        held = line(start).clone()
        i = start
        while True:
            seen[i] = True
            source = perm[i]
            if source == start:
                line(i).copy_(held)
                break
            line(i).copy_(line(source))
            i = source
