"""Dense LAPACK calls of the K×K solvers, run by torch (NumPy arrays in and out, float64).

Why not ``np.linalg``: NumPy's BLAS (OpenBLAS in the wheels) keeps a thread pool of its own,
one thread per core, that :func:`torch.set_num_threads` does not govern. From K ≈ 60 its
K×K factorizations split across that pool, next to torch's own threads; on a machine whose
cores are busy (the training itself, other processes) a call then waits for its helper
threads to be scheduled: a 100×100 ``np.linalg.svd`` measured 1.4 ms on one thread and
90-400 ms with the two-thread pool on a loaded 2-core machine (``np.linalg.solve`` of a
101×101 system: 0.07 ms vs 93 ms). The factorizations here are a few MFLOP at K = 100,
too small to gain from threads, so they run through ``torch.linalg`` on the CPU, in the one
thread pool the user controls (``torch.set_num_threads``). The arrays are shared with
torch (:func:`torch.from_numpy`), not copied.
"""

from __future__ import annotations

import numpy as np
import torch


def _tensor(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a, dtype=np.float64)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _failed(info: torch.Tensor) -> bool:
    return info.numel() > 0 and int(info.max()) != 0


def _finite(a: np.ndarray) -> torch.Tensor:
    """``a`` as a tensor; ``np.linalg.LinAlgError`` if it holds NaN or inf (as NumPy's
    eigensolvers and SVD raise; torch's would return NaN or garbage)."""
    if not np.isfinite(a).all():
        raise np.linalg.LinAlgError("eigendecomposition of a matrix with NaN or inf entries")
    return _tensor(a)


def eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors (columns) of the symmetric matrix ``a``."""
    values, vectors = torch.linalg.eigh(_finite(a))
    return values.numpy(), vectors.numpy()


def eigvalsh(a: np.ndarray) -> np.ndarray:
    """Eigenvalues (ascending) of the symmetric matrix ``a``."""
    return torch.linalg.eigvalsh(_finite(a)).numpy()


def is_positive_definite(a: np.ndarray) -> bool:
    """Whether the Cholesky factorization of the symmetric matrix ``a`` succeeds."""
    return not _failed(torch.linalg.cholesky_ex(_tensor(a)).info)


def solve(m: np.ndarray, rhs: np.ndarray) -> np.ndarray | None:
    """``m z = rhs`` (LU, batched over leading axes); ``None`` where some ``m`` is singular.

    ``m`` is ``(..., n, n)`` and ``rhs`` ``(..., n)``; ``None`` when LU meets an exact zero
    pivot (``np.linalg.solve`` raises ``LinAlgError`` there) in any matrix of the batch.
    """
    z, info = torch.linalg.solve_ex(_tensor(m), _tensor(rhs).unsqueeze(-1))
    if _failed(info):
        return None
    return z[..., 0].numpy()


def lstsq(m: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Minimum-norm least-squares ``z`` of ``m z ≈ rhs`` (batched over leading axes).

    SVD-based (LAPACK ``gelsd``) with singular values below ``eps · max(n, n') · σ_max``
    treated as zero: ``np.linalg.lstsq(m, rhs, rcond=None)``.
    """
    return torch.linalg.lstsq(_tensor(m), _tensor(rhs).unsqueeze(-1), driver="gelsd")[0][
        ..., 0
    ].numpy()
