"""The randomness privacy rests on: Gaussian noise and Poisson sampling (docs/privacy.md §6).

Gaussian noise: OpenDP's Gaussian mechanism (``opendp.measurements.make_gaussian`` over
``vector_domain(atom_domain(T=float))`` with ``l2_distance``), applied to the float64 sum
itself. It adds an exact discrete Gaussian on the grid 2^-1074 (every float64 lies on it, so
the input is not rounded) and rounds the exact result once to the nearest float64, the
sampler of Canonne, Kamath, Steinke 2020, which closes the floating-point attacks on
textbook float Gaussians (Mironov 2012; Jin et al. 2022). Its random bits come from OpenSSL's
CSPRNG (AES-256 CTR-DRBG seeded from the OS), fresh at every call, and no Python, numpy or
torch seed reaches it. It needs only OpenDP's ``contrib`` feature (its proof is published
but not yet vetted by OpenDP's committee), never ``floating-point`` or
``honest-but-curious``.

Why OpenDP and not a numpy generator (measured, one 2-core CPU, OpenDP 0.16.0): about 0.1 ms
per coordinate (D = 768: 0.09 s; D = 2048: 0.23 s per release; 400 DP-SGD steps at D = 768:
about 35 s, small next to 400 steps of denoiser passes over every image), a 0.7 s import
paid at the first release only, and abi3 wheels for Python >= 3.10 on Linux (x86-64,
aarch64), macOS (x86-64, arm64) and Windows. torch's generators are never used: a
``torch.Generator`` keeps only 32 bits of its seed, so noise drawn through one is one of 2^32
vectors an adversary can search.

Poisson sampling: every bit comes straight from the OS CSPRNG (``secrets.token_bytes``), 64
fresh bits per image per round, compared exactly with the binary expansion of q, so an image
is kept with probability exactly q (a float64 uniform compared with q is off by up to 2^-53).
There is no seeded generator whose state could be searched.
"""

from __future__ import annotations

import math
import secrets
from fractions import Fraction

import numpy as np
import torch

from .errors import DpAdaptError, InvalidParameterError
from .validation import check_positive_int, check_sampling_rate

OPENDP_REQUIREMENT = "opendp==0.16.0"
_WORD_BITS = 64


def _opendp_gaussian(dimension: int, scale: float):
    try:
        from opendp.domains import atom_domain, vector_domain
        from opendp.measurements import make_gaussian
        from opendp.metrics import l2_distance
        from opendp.mod import enable_features
    except ImportError as error:
        raise DpAdaptError(
            "the DP noise needs the Python package opendp, which is not installed; install "
            f"the pack's requirements (pip install {OPENDP_REQUIREMENT})."
        ) from error
    # "contrib": OpenDP's Gaussian has a published proof not yet vetted by its committee.
    enable_features("contrib")
    domain = vector_domain(atom_domain(T=float, nan=False), size=dimension)
    return make_gaussian(domain, l2_distance(T=float), scale=scale)


class GaussianMechanism:
    """x -> x + N(0, scale^2 I_D) on a (D,) float64 vector, by OpenDP (see the module doc).

    Built before the release is recorded (the import and every check happen here), then
    called once per release; each call draws fresh randomness from OpenSSL. Returns (D,)
    float64 on the CPU.
    """

    __slots__ = ("_measurement", "dimension", "scale")

    def __init__(self, *, dimension: int, scale: float) -> None:
        self.dimension = check_positive_int("dimension", dimension)
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise InvalidParameterError(
                "the noise standard deviation z * C must be finite and > 0, got "
                f"scale={scale!r}; lower the noise multiplier or the clip norm."
            )
        self.scale = float(scale)
        self._measurement = _opendp_gaussian(self.dimension, self.scale)

    def __call__(self, total: torch.Tensor) -> torch.Tensor:
        if (
            not isinstance(total, torch.Tensor)
            or total.dtype != torch.float64
            or tuple(total.shape) != (self.dimension,)
        ):
            raise InvalidParameterError(
                f"the noised sum must be a float64 tensor of shape ({self.dimension},), got "
                f"{getattr(total, 'dtype', type(total).__name__)} "
                f"{tuple(getattr(total, 'shape', ()))}."
            )
        noisy = self._measurement(total.detach().cpu().tolist())
        return torch.tensor(noisy, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"GaussianMechanism(dimension={self.dimension}, scale={self.scale!r}, OpenDP)"


def _os_words(count: int) -> np.ndarray:
    """``count`` uniform 64-bit words straight from the OS CSPRNG."""
    return np.frombuffer(secrets.token_bytes(8 * count), dtype="<u8")


def bernoulli(count: int, probability: float) -> np.ndarray:
    """``count`` independent Bernoulli(q) draws, exactly, from OS entropy: (count,) bool.

    q = a / 2^b exactly (a float64); an image is kept iff a uniform U in [0, 1) is < q,
    decided 64 bits at a time: at the first word where U's bits differ from q's, U < q iff
    U's word is smaller. A tie on a word (probability 2^-64) draws the next word; U equal
    to q on all of q's bits means U >= q. So P(kept) = q with no rounding.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise InvalidParameterError(f"count must be an integer >= 0, got count={count!r}.")
    q = check_sampling_rate(probability)
    if q == 1:
        return np.ones(count, dtype=bool)
    exact = Fraction(q)
    bits = exact.denominator.bit_length() - 1
    words = -(-bits // _WORD_BITS)
    scaled = exact.numerator << (words * _WORD_BITS - bits)
    mask = (1 << _WORD_BITS) - 1
    keep = np.zeros(count, dtype=bool)
    undecided = np.arange(count)
    for j in range(words):
        if undecided.size == 0:
            break
        threshold = np.uint64((scaled >> ((words - 1 - j) * _WORD_BITS)) & mask)
        drawn = _os_words(undecided.size)
        keep[undecided[drawn < threshold]] = True
        undecided = undecided[drawn == threshold]
    return keep
