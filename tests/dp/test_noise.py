"""The randomness privacy rests on (docs/privacy.md §6): OpenDP's Gaussian, OS-entropy sampling.

Statistical assertions use a normal tail of 5.33 standard deviations (probability 1e-7 each)
and a KS p-value floor of 1e-7, so the file fails by chance with probability below 1e-6.
"""

from __future__ import annotations

import math
import os
import random
import secrets
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

from comfyui_dp_adapt.dp import noise
from comfyui_dp_adapt.dp.errors import InvalidParameterError
from comfyui_dp_adapt.dp.noise import GaussianMechanism, bernoulli

Z_TAIL = 5.33
KS_FLOOR = 1e-7

# torch's random functions and the methods that fill a tensor in place: a privacy draw must
# use none of them (a torch generator keeps 32 bits of its seed, on every device).
TORCH_RANDOM = ("rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial")
TORCH_RANDOM += ("rand_like", "randn_like", "randint_like", "poisson", "manual_seed", "Generator")
TENSOR_RANDOM = ("normal_", "uniform_", "bernoulli_", "random_", "exponential_", "geometric_")
TENSOR_RANDOM += ("cauchy_", "log_normal_")


def forbid_torch_randomness(monkeypatch) -> None:
    """Make every torch random draw (CPU or CUDA) raise while the test runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("a privacy draw used torch's RNG")

    for name in TORCH_RANDOM:
        monkeypatch.setattr(torch, name, refuse)
    for name in TENSOR_RANDOM:
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch.cuda, "manual_seed", refuse)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", refuse)


def pin_python_entropy(monkeypatch) -> None:
    """Every Python-side source of entropy returns constants; workflow seeds are fixed."""
    monkeypatch.setattr(secrets, "token_bytes", lambda n=32: b"\x07" * n)
    monkeypatch.setattr(secrets, "randbits", lambda k: ((1 << k) - 1) // 3)
    monkeypatch.setattr(os, "urandom", lambda n: b"\x07" * n)
    monkeypatch.setattr(random, "_urandom", lambda n: b"\x07" * n)
    torch.manual_seed(1234)
    np.random.seed(1234)


def agree_in_low_64_bits(monkeypatch) -> None:
    """Python entropy whose low 64 bits are the same constant at every call, higher bits fresh.

    ``secrets.randbits(k)`` and ``secrets.token_bytes(n)`` (read little-endian, as ``noise``
    does) keep their requested size, so a sampler keyed with at most 64 bits of them would
    draw the same thing twice.
    """
    real_urandom = os.urandom
    low = 0x0123_4567_89AB_CDEF

    def randbits(k):
        fresh = int.from_bytes(real_urandom(k // 8 + 9), "little")
        return ((fresh << 64) | low) & ((1 << k) - 1)

    def token_bytes(n=32):
        return (low.to_bytes(8, "little") + real_urandom(max(n - 8, 0)))[:n]

    monkeypatch.setattr(secrets, "randbits", randbits)
    monkeypatch.setattr(secrets, "token_bytes", token_bytes)


# --- the Gaussian ---------------------------------------------------------------------------


def test_gaussian_noise_has_mean_zero_std_scale_and_a_normal_distribution():
    """20 000 draws around a non-zero float64 input, standardised: mean 0, variance 1, and
    a KS test against N(0, 1)."""
    dimension, calls, scale = 2_000, 10, 0.37
    total = torch.linspace(-5, 5, dimension, dtype=torch.float64)
    mechanism = GaussianMechanism(dimension=dimension, scale=scale)
    draws = torch.cat([(mechanism(total) - total) / scale for _ in range(calls)]).numpy()
    count = draws.size
    assert abs(draws.mean()) < Z_TAIL / math.sqrt(count)
    assert abs(draws.var(ddof=1) - 1) < Z_TAIL * math.sqrt(2 / (count - 1))
    assert stats.kstest(draws, "norm").pvalue > KS_FLOOR


@pytest.mark.slow
def test_gaussian_noise_passes_a_ks_test_at_fifty_thousand_draws():
    dimension, scale = 10_000, 3.0
    mechanism = GaussianMechanism(dimension=dimension, scale=scale)
    zero = torch.zeros(dimension, dtype=torch.float64)
    draws = torch.cat([mechanism(zero) / scale for _ in range(5)]).numpy()
    assert stats.kstest(draws, "norm").pvalue > KS_FLOOR
    assert abs(draws.var(ddof=1) - 1) < Z_TAIL * math.sqrt(2 / (draws.size - 1))


def test_gaussian_is_applied_to_the_float64_sum_itself():
    total = torch.tensor([1e6, -3.25, 1e-300, 0.0], dtype=torch.float64)
    out = GaussianMechanism(dimension=4, scale=1e-12)(total)
    assert out.dtype == torch.float64 and out.device.type == "cpu" and out.shape == (4,)
    assert float((out - total).abs().max()) < 1e-9


def test_gaussian_noise_differs_with_all_python_entropy_and_seeds_pinned(monkeypatch):
    """OpenDP draws from OpenSSL: constant Python entropy and workflow seeds change nothing."""
    pin_python_entropy(monkeypatch)
    mechanism = GaussianMechanism(dimension=64, scale=1.0)
    zero = torch.zeros(64, dtype=torch.float64)
    first = mechanism(zero)
    torch.manual_seed(1234)
    np.random.seed(1234)
    second = GaussianMechanism(dimension=64, scale=1.0)(zero)
    assert not torch.equal(first, second)


def test_gaussian_works_with_every_torch_random_draw_forbidden(monkeypatch):
    forbid_torch_randomness(monkeypatch)
    out = GaussianMechanism(dimension=16, scale=2.0)(torch.zeros(16, dtype=torch.float64))
    assert bool(torch.isfinite(out).all()) and bool((out != 0).any())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dimension": 0, "scale": 1.0}, "dimension"),
        ({"dimension": 3, "scale": 0.0}, "scale=0.0"),
        ({"dimension": 3, "scale": float("inf")}, "scale=inf"),
        ({"dimension": 3, "scale": float("nan")}, "scale=nan"),
    ],
)
def test_bad_gaussian_parameters_are_refused_naming_them(kwargs, message):
    with pytest.raises(InvalidParameterError, match=message):
        GaussianMechanism(**kwargs)


def test_a_sum_of_the_wrong_shape_or_dtype_is_refused():
    mechanism = GaussianMechanism(dimension=3, scale=1.0)
    for bad in (torch.zeros(4, dtype=torch.float64), torch.zeros(3), [0.0, 0.0, 0.0]):
        with pytest.raises(InvalidParameterError, match=r"float64 tensor of shape \(3,\)"):
            mechanism(bad)


# --- Poisson sampling -------------------------------------------------------------------------


def test_bernoulli_keeps_with_probability_q():
    count, q = 200_000, 0.1
    kept = bernoulli(count, q)
    assert kept.dtype == bool and kept.shape == (count,)
    assert abs(int(kept.sum()) - count * q) < Z_TAIL * math.sqrt(count * q * (1 - q))


def test_bernoulli_compares_os_words_exactly_with_the_expansion_of_q(monkeypatch):
    """The decision rule itself, on chosen words: U < q iff U's first differing word is
    smaller; a word equal to q's draws the next one; equal on all of q's words is U >= q."""
    q = 2.0**-20 + 3 * 2.0**-72  # exact in float64; needs two 64-bit words
    frac = Fraction(q)
    scaled = frac.numerator << (128 - (frac.denominator.bit_length() - 1))
    high, low = scaled >> 64, scaled & ((1 << 64) - 1)
    rounds = iter(
        [
            np.array([high - 1, high + 1, high, high, high, 0], dtype=np.uint64),
            np.array([low - 1, low, low + 1], dtype=np.uint64),  # the three ties
        ]
    )
    asked = []

    def words(count):
        asked.append(count)
        return next(rounds)

    monkeypatch.setattr(noise, "_os_words", words)
    kept = bernoulli(6, q)
    assert kept.tolist() == [True, False, True, False, False, True]
    assert asked == [6, 3], "only ties draw another word"


def test_bernoulli_edge_cases():
    assert bernoulli(5, 1.0).tolist() == [True] * 5
    assert bernoulli(0, 0.5).shape == (0,)
    tiny = bernoulli(1_000, 2.0**-1000)
    assert not tiny.any()
    for count, q in [(-1, 0.5), (True, 0.5), (2.0, 0.5), (3, 0.0), (3, 1.5), (3, math.nan)]:
        with pytest.raises(InvalidParameterError):
            bernoulli(count, q)


def test_bernoulli_with_entropy_agreeing_in_its_low_64_bits_still_differs(monkeypatch):
    agree_in_low_64_bits(monkeypatch)
    draws = {tuple(bernoulli(256, 0.5).tolist()) for _ in range(3)}
    assert len(draws) == 3  # equal draws have probability about 2^-255


def test_bernoulli_works_with_every_torch_random_draw_forbidden(monkeypatch):
    forbid_torch_randomness(monkeypatch)
    kept = bernoulli(1_000, 0.5)
    assert 0 < int(kept.sum()) < 1_000
