"""The numpy kernels the probes fit and predict with: PCA by Gram eigendecomposition and the RBF Gram matrix
(:mod:`safetyneurons.probes.probe`)."""

from __future__ import annotations

import numpy as np

from safetyneurons.errors import UserError


def pca_fit(Z: np.ndarray, variance: float) -> tuple[np.ndarray, np.ndarray]:
    """PCA keeping the fewest components whose explained variance share reaches ``variance`` (as
    scikit-learn's ``PCA(n_components=variance)``); returns (mean, components [k, d]).

    With fewer samples than features (the usual case: thousands of prompts, tens of thousands of neurons)
    it eigendecomposes the n x n Gram matrix instead of running an SVD of the n x d data, which is the
    same decomposition at a fraction of the cost. Component signs follow scikit-learn's ``svd_flip`` rule
    (largest absolute loading positive).
    """
    from scipy.linalg import eigh

    mean = Z.mean(0)
    Zc = Z - mean
    n, d = Zc.shape
    if n <= d:
        lam, U = eigh(Zc @ Zc.T)
        lam, U = lam[::-1], U[:, ::-1]
        keep = lam > lam[0] * 1e-12 if lam[0] > 0 else np.zeros(len(lam), dtype=bool)
        lam, U = lam[keep], U[:, keep]
        comps = (U.T @ Zc) / np.sqrt(lam)[:, None]
    else:
        lam, V = eigh(Zc.T @ Zc)
        lam, V = lam[::-1], V[:, ::-1]
        keep = lam > lam[0] * 1e-12 if lam[0] > 0 else np.zeros(len(lam), dtype=bool)
        lam, comps = lam[keep], V[:, keep].T
    if len(lam) == 0:
        raise UserError("PCA: the features have no variance at all.")
    k = len(lam) if variance >= 1 else int(np.searchsorted(np.cumsum(lam) / lam.sum(), variance, side="right") + 1)
    comps = comps[: min(k, len(lam))]
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])
    signs[signs == 0] = 1
    return mean.astype(np.float64), np.ascontiguousarray(comps * signs[:, None], dtype=np.float64)


def rbf(A: np.ndarray, B: np.ndarray, gamma: float) -> np.ndarray:
    """RBF kernel matrix exp(-gamma * ||a - b||^2), float64, via one BLAS matrix product."""
    d2 = np.einsum("ij,ij->i", A, A)[:, None] + np.einsum("ij,ij->i", B, B)[None, :] - 2.0 * (A @ B.T)
    np.maximum(d2, 0.0, out=d2)
    np.multiply(d2, -gamma, out=d2)
    return np.exp(d2, out=d2)
