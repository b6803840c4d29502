"""Mechanism M1: the norm bound, the noise statistics, OS-entropy randomness, the hook.

Statistical tests use a two-sided normal tail of 5.33 standard deviations (probability
1e-7 per assertion) so that the whole file fails by chance with probability below 1e-6.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from comfyui_dp_adapt.dp import mechanism
from comfyui_dp_adapt.dp.accounting import release_event
from comfyui_dp_adapt.dp.errors import InvalidParameterError
from comfyui_dp_adapt.dp.mechanism import (
    AggregateRelease,
    BoundMode,
    bound_contributions,
    poisson_sample,
    release_noisy_aggregate,
    renormalize_unit,
    rescale_to_norm,
)
from comfyui_dp_adapt.dp.noise import GaussianMechanism
from comfyui_dp_adapt.tests.dp.test_noise import (
    agree_in_low_64_bits,
    forbid_torch_randomness,
    pin_python_entropy,
)

Z_TAIL = 5.33  # P(|N(0,1)| > 5.33) ~ 1e-7


def random_vectors(m, d, *, max_norm, seed=0):
    """m random directions with norms spread over [0, max_norm] on a log scale."""
    g = torch.Generator().manual_seed(seed)
    log_norms = torch.rand(m, 1, generator=g, dtype=torch.float64) * 12 - 10  # 1e-10 .. 1e2
    norms = torch.exp(log_norms * math.log(10)) * (max_norm / 100)
    directions = torch.nn.functional.normalize(
        torch.randn(m, d, generator=g, dtype=torch.float64), dim=1
    )
    return directions * norms


def release(vectors, centre, **kwargs):
    arguments = dict(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=1.0, dataset_size=10)
    arguments.update(kwargs)
    return release_noisy_aggregate(vectors, centre=centre, **arguments)


# --- the bound ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(BoundMode))
@pytest.mark.parametrize("clip_norm", [1e-3, 37.0, 1e6])
@pytest.mark.parametrize("d", [1, 3, 512])
def test_bounded_norms_never_exceed_the_clip_norm(mode, clip_norm, d):
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        centre = torch.randn(d, dtype=torch.float64, generator=g) * clip_norm
        vectors = centre + random_vectors(300, d, max_norm=100 * clip_norm, seed=seed)
        vectors[:5] = centre  # zero differences
        bounded = bound_contributions(vectors, centre=centre, clip_norm=clip_norm, mode=mode)
        norms = torch.linalg.vector_norm(bounded, dim=1)
        assert bounded.dtype == torch.float64 and bounded.shape == vectors.shape
        assert bool((norms <= clip_norm).all()), float(norms.max())
        assert bool((norms[:5] == 0).all()), "a vector at the centre contributes 0"
        if mode is BoundMode.NORMALIZE:
            torch.testing.assert_close(
                norms[5:], torch.full_like(norms[5:], clip_norm), rtol=1e-12, atol=0
            )


def test_clip_mode_leaves_vectors_inside_the_ball_unchanged_and_keeps_directions():
    centre = torch.linspace(-1, 1, 16, dtype=torch.float64)
    inside = random_vectors(300, 16, max_norm=0.999)
    bounded = bound_contributions(centre + inside, centre=centre, clip_norm=1.0)
    assert torch.equal(bounded, (centre + inside) - centre), "bitwise unchanged"
    outside = torch.nn.functional.normalize(torch.randn(300, 16, dtype=torch.float64), dim=1)
    outside = outside * torch.linspace(1.001, 1e5, 300, dtype=torch.float64)[:, None]
    bounded = bound_contributions(centre + outside, centre=centre, clip_norm=1.0)
    cos = torch.nn.functional.cosine_similarity(bounded, outside, dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
    norms = torch.linalg.vector_norm(bounded, dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", list(BoundMode))
def test_extreme_magnitudes_are_bounded_without_overflow_or_underflow(mode):
    huge = torch.tensor([[1e300, -1e300, 1e300], [1e-310, 0.0, -1e-310]], dtype=torch.float64)
    bounded = bound_contributions(huge, centre=torch.zeros(3), clip_norm=2.0, mode=mode)
    norms = torch.linalg.vector_norm(bounded, dim=1)
    assert bool(torch.isfinite(bounded).all())
    assert norms[0] == pytest.approx(2.0, rel=1e-12)
    if mode is BoundMode.NORMALIZE:  # a subnormal difference still has a direction
        assert norms[1] == pytest.approx(2.0, rel=1e-12)
        torch.testing.assert_close(bounded[1], torch.tensor([2**0.5, 0.0, -(2**0.5)]).double())
    else:
        assert torch.equal(bounded[1], huge[1])


def test_any_dtype_is_bounded_in_float64():
    vectors = torch.randn(10, 5, dtype=torch.float16) * 10
    bounded = bound_contributions(vectors, centre=torch.zeros(5, dtype=torch.bfloat16), clip_norm=1)
    assert bounded.dtype == torch.float64
    assert bool((torch.linalg.vector_norm(bounded, dim=1) <= 1).all())


# --- the noise ----------------------------------------------------------------------------


def _pure_noise(z, c, q, n, d, releases):
    """Standardised noise draws: releases of nothing but noise, mapped back to N(0, 1)."""
    centre = torch.linspace(-3, 3, d, dtype=torch.float64)
    draws = []
    for _ in range(releases):
        result = release(
            torch.zeros(0, d),
            centre,
            clip_norm=c,
            noise_multiplier=z,
            sampling_rate=q,
            dataset_size=n,
        )
        # estimate = c + noise / (q n) with noise ~ N(0, (zC)^2 I)
        draws.append((result.estimate - centre) * (q * n) / (z * c))
    return torch.stack(draws)  # (releases, d)


def test_noise_std_matches_z_times_c():
    """N = R * D draws; (N - 1) s^2 / sigma^2 ~ chi-square(N - 1), so s^2 / sigma^2 has mean 1
    and sd sqrt(2 / (N - 1)); at N = 20 000 the normal approximation is accurate to well
    below the 1e-7 tail used here (Wilson-Hilferty)."""
    noise = _pure_noise(z=1.7, c=0.3, q=0.25, n=40, d=2_000, releases=10).flatten()
    count = noise.numel()
    variance_ratio = noise.var().item()  # unit variance expected
    assert abs(variance_ratio - 1) < Z_TAIL * math.sqrt(2 / (count - 1))
    # Mean zero: the mean of N unit normals has sd 1/sqrt(N).
    assert abs(noise.mean().item()) < Z_TAIL / math.sqrt(count)


def test_noise_is_isotropic():
    """Equal variance in every block of coordinates and no correlation between coordinates."""
    noise = _pure_noise(z=0.9, c=2.0, q=1.0, n=3, d=1_000, releases=30)  # 30 000 draws
    blocks = noise.reshape(noise.shape[0], 4, -1).transpose(0, 1).reshape(4, -1)
    per_block = blocks.shape[1]
    for block in blocks:
        assert abs(block.var().item() - 1) < Z_TAIL * math.sqrt(2 / (per_block - 1))
    # Neighbouring coordinates and a random pair of orthogonal directions: correlation ~ 0
    # with sd 1/sqrt(N) under independence.
    products = (noise[:, :-1] * noise[:, 1:]).flatten()
    assert abs(products.mean().item()) < Z_TAIL / math.sqrt(products.numel())
    basis, _ = torch.linalg.qr(torch.randn(noise.shape[1], 2, dtype=torch.float64))
    projected = noise @ basis  # (releases, 2): each column N(0, 1) if isotropic
    assert abs(projected.pow(2).mean().item() - 1) < Z_TAIL * math.sqrt(2 / projected.numel())


def test_estimate_is_centre_plus_bounded_sum_over_q_n():
    centre = torch.full((8,), 0.5, dtype=torch.float64)
    vectors = centre + random_vectors(4, 8, max_norm=3.0, seed=3)
    result = release(
        vectors, centre, clip_norm=1.0, noise_multiplier=1e-12, sampling_rate=0.5, dataset_size=10
    )
    bounded = bound_contributions(vectors, centre=centre, clip_norm=1.0)
    expected = centre + bounded.sum(0) / (0.5 * 10)
    torch.testing.assert_close(result.estimate, expected, atol=1e-10, rtol=0)
    assert result.event == release_event(noise_multiplier=1e-12, sampling_rate=0.5)
    assert (result.dimension, result.dataset_size, result.mode) == (8, 10, BoundMode.CLIP)


def test_estimate_is_float64_on_the_cpu_whatever_the_input_dtype():
    result = release(torch.randn(3, 4, dtype=torch.float16), torch.zeros(4, dtype=torch.float32))
    assert result.estimate.dtype == torch.float64 and result.estimate.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vectors_on_a_gpu_are_summed_there_and_returned_on_the_cpu():
    vectors = torch.randn(5, 16, device="cuda")
    result = release(vectors, torch.zeros(16, device="cuda"), noise_multiplier=1e-12)
    bounded = bound_contributions(vectors, centre=torch.zeros(16, device="cuda"), clip_norm=1.0)
    assert bounded.device.type == "cuda"
    torch.testing.assert_close(result.estimate, bounded.sum(0).cpu() / 10, atol=1e-10, rtol=0)


def test_an_empty_sample_still_releases_noise():
    centre = torch.zeros(6, dtype=torch.float64)
    result = release(torch.zeros(0, 6), centre, sampling_rate=0.1, dataset_size=20)
    assert result.estimate.shape == (6,)
    assert bool((result.estimate != 0).all())


# --- randomness ---------------------------------------------------------------------------


def test_identical_releases_with_identical_workflow_seeds_differ():
    centre = torch.zeros(32, dtype=torch.float64)
    vectors = random_vectors(5, 32, max_norm=1.0)
    outputs = []
    for _ in range(2):
        torch.manual_seed(1234)  # what a workflow seed does; the noise must ignore it
        outputs.append(release(vectors, centre, dataset_size=5).estimate)
    assert not torch.equal(outputs[0], outputs[1])


def test_releases_leave_torch_and_numpy_global_rngs_alone():
    torch.manual_seed(7)
    np.random.seed(7)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    release(torch.ones(3, 4), torch.zeros(4), sampling_rate=0.5)
    poisson_sample(100, sampling_rate=0.5)
    assert torch.equal(torch.get_rng_state(), torch_state), "the global RNG was not consumed"
    assert all(
        np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state, strict=True)
    )


def test_a_workflow_seed_set_before_a_release_does_not_reproduce_its_noise():
    centre = torch.zeros(16, dtype=torch.float64)
    torch.manual_seed(99)
    first = release(torch.zeros(0, 16), centre).estimate
    torch.manual_seed(99)
    assert not torch.equal(release(torch.zeros(0, 16), centre).estimate, first)
    torch.manual_seed(99)
    assert not torch.equal(torch.randn(16, dtype=torch.float64), first)


def test_releases_differ_with_all_python_entropy_and_seeds_pinned(monkeypatch):
    """The noise comes from OpenSSL (OpenDP), not from anything Python or torch can seed."""
    pin_python_entropy(monkeypatch)
    vectors = random_vectors(5, 32, max_norm=1.0)
    first = release(vectors, torch.zeros(32), dataset_size=5).estimate
    pin_python_entropy(monkeypatch)
    assert not torch.equal(release(vectors, torch.zeros(32), dataset_size=5).estimate, first)


def test_releases_with_python_entropy_agreeing_in_its_low_64_bits_differ(monkeypatch):
    """A seed of at most 64 bits would make these equal (a torch generator keeps 32)."""
    agree_in_low_64_bits(monkeypatch)
    vectors = random_vectors(5, 32, max_norm=1.0)
    kwargs = dict(sampling_rate=0.5, dataset_size=5)
    first = release(vectors, torch.zeros(32), **kwargs).estimate
    assert not torch.equal(release(vectors, torch.zeros(32), **kwargs).estimate, first)
    samples = {tuple(poisson_sample(256, sampling_rate=0.5).indices) for _ in range(3)}
    assert len(samples) == 3


def test_a_release_and_its_sample_never_use_torch_random_draws(monkeypatch):
    """A torch generator keeps 32 bits of its seed on every device (CPU, CUDA, MPS)."""
    forbid_torch_randomness(monkeypatch)
    kept = poisson_sample(50, sampling_rate=0.5)
    result = release(torch.ones(3, 4), torch.zeros(4), sampling_rate=0.5)
    assert 0 < len(kept.indices) < 50
    assert bool(torch.isfinite(result.estimate).all())


def test_poisson_sampling_is_fresh_and_ignores_the_global_seed():
    draws = []
    for _ in range(3):
        torch.manual_seed(0)
        draws.append(tuple(poisson_sample(400, sampling_rate=0.5).indices))
    assert len(set(draws)) == 3  # equal draws have probability 2^-400
    assert poisson_sample(7, sampling_rate=1.0).indices == list(range(7))


def test_poisson_sampling_keeps_each_image_with_probability_q():
    n, q, reps = 2_000, 0.1, 50
    counts = torch.zeros(n)
    total = 0
    for _ in range(reps):
        kept = poisson_sample(n, sampling_rate=q).indices
        assert kept == sorted(set(kept)) and all(0 <= i < n for i in kept)
        counts[kept] += 1
        total += len(kept)
    # Total kept ~ Binomial(n * reps, q).
    assert abs(total - n * reps * q) < Z_TAIL * math.sqrt(n * reps * q * (1 - q))
    # The first and second halves of the images are kept equally often (no index bias).
    half = counts[: n // 2].sum() - counts[n // 2 :].sum()
    assert abs(float(half)) < Z_TAIL * math.sqrt(n * reps * q * (1 - q))


def test_sample_repr_hides_which_images_were_kept():
    sample = poisson_sample(50, sampling_rate=0.5)
    assert repr(sample) == "PoissonSample(dataset_size=50, indices=<private>)"
    assert str(sample) == repr(sample)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample.dataset_size = 3


def test_a_release_never_holds_the_sample_or_its_size():
    fields = {f.name for f in dataclasses.fields(AggregateRelease)}
    assert fields == {
        "estimate",
        "event",
        "noise_multiplier",
        "clip_norm",
        "sampling_rate",
        "dataset_size",
        "mode",
        "dimension",
    }


# --- the ledger hook ----------------------------------------------------------------------


class _SpyGaussian(GaussianMechanism):
    """The real mechanism, recording each draw in ``drawn``."""

    __slots__ = ()
    drawn: list = []

    def __call__(self, total):
        type(self).drawn.append("noise")
        return super().__call__(total)


def _spy_on_noise(monkeypatch) -> list:
    drawn = []
    monkeypatch.setattr(_SpyGaussian, "drawn", drawn)
    monkeypatch.setattr(mechanism, "GaussianMechanism", _SpyGaussian)
    return drawn


def test_before_noise_runs_once_with_the_event_before_the_noise(monkeypatch):
    order = _spy_on_noise(monkeypatch)
    release(
        torch.ones(2, 4),
        torch.zeros(4),
        noise_multiplier=2.0,
        sampling_rate=0.5,
        before_noise=lambda event: order.append(event),
    )
    assert order == [release_event(noise_multiplier=2.0, sampling_rate=0.5), "noise"]


def test_a_failing_hook_stops_the_release_before_any_noise(monkeypatch):
    drawn = _spy_on_noise(monkeypatch)

    class Refused(Exception):
        pass

    def refuse(event):
        raise Refused("budget exhausted")

    with pytest.raises(Refused, match="budget exhausted"):
        release(torch.ones(2, 4), torch.zeros(4), before_noise=refuse)
    assert drawn == []


# --- post-processing ------------------------------------------------------------------------


def test_renormalize_unit_gives_a_unit_vector():
    result = release(torch.randn(5, 12), torch.zeros(12), postprocess=renormalize_unit)
    assert float(torch.linalg.vector_norm(result.estimate)) == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(InvalidParameterError, match="norm"):
        renormalize_unit(torch.zeros(3))


def test_rescale_to_norm_gives_every_token_row_the_target_norm():
    k, width = 3, 8
    result = release(
        torch.randn(5, k * width), torch.zeros(k * width), postprocess=rescale_to_norm(0.4, rows=k)
    )
    assert result.estimate.shape == (k * width,)
    norms = torch.linalg.vector_norm(result.estimate.reshape(k, width), dim=1)
    torch.testing.assert_close(norms, torch.full((k,), 0.4, dtype=torch.float64))
    with pytest.raises(InvalidParameterError, match="rows"):
        rescale_to_norm(1.0, rows=5)(torch.ones(12))
    with pytest.raises(InvalidParameterError, match="target_norm"):
        rescale_to_norm(-1.0)


def test_a_postprocess_that_changes_the_shape_is_refused():
    with pytest.raises(InvalidParameterError, match="postprocess"):
        release(torch.randn(2, 4), torch.zeros(4), postprocess=lambda x: x[:2])


# --- non-finite rows and the declared size (docs/privacy.md §2.4) ----------------------------------


@pytest.mark.parametrize(
    "bad_row",
    [
        torch.tensor([float("nan"), 0.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, float("inf"), 0.0], dtype=torch.float64),
        torch.tensor([1e308, 1e308, -1e308], dtype=torch.float64),  # 1e308 - (-1e308) overflows
    ],
)
def test_a_non_finite_row_contributes_zero_silently(bad_row, caplog):
    good = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.4, 0.0]], dtype=torch.float64)
    centre = torch.full((3,), -1e308 if bad_row[0] == 1e308 else 0.0, dtype=torch.float64)
    centre = torch.zeros(3, dtype=torch.float64) if bad_row[0] != 1e308 else centre
    with caplog.at_level("DEBUG"):
        with_bad = mechanism.bound_contributions(
            torch.cat([good, bad_row[None]]), centre=centre, clip_norm=1.0
        )
    alone = mechanism.bound_contributions(good, centre=centre, clip_norm=1.0)
    assert torch.equal(with_bad[:2], alone)
    assert torch.equal(with_bad[2], torch.zeros(3, dtype=torch.float64))
    assert not caplog.records, "a non-finite row must not be logged"


def test_a_release_with_non_finite_rows_happens_and_equals_one_without_them(monkeypatch):
    """Whether a release happens must not depend on one image: the NaN row is a zero row."""

    class FixedNoise(GaussianMechanism):  # a test double: the same noise at every call
        __slots__ = ()

        def __call__(self, total):
            return total + torch.linspace(-1, 1, self.dimension, dtype=torch.float64)

    monkeypatch.setattr(mechanism, "GaussianMechanism", FixedNoise)
    good = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    bad = torch.cat([good, torch.full((1, 6), float("nan"))])
    kwargs = dict(
        centre=torch.zeros(6),
        clip_norm=1.0,
        noise_multiplier=1.0,
        sampling_rate=1.0,
        dataset_size=5,
    )
    assert torch.equal(
        mechanism.release_noisy_aggregate(bad, **kwargs).estimate,
        mechanism.release_noisy_aggregate(good, **kwargs).estimate,
    )


def test_more_rows_than_the_declared_size_is_not_an_error():
    """The declared n_hat is public, the true count private: no error may compare them."""
    result = mechanism.release_noisy_aggregate(
        torch.ones(7, 3),
        centre=torch.zeros(3),
        clip_norm=1.0,
        noise_multiplier=1.0,
        sampling_rate=1.0,
        dataset_size=3,
    )
    assert torch.isfinite(result.estimate).all()


# --- bad inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vectors", "centre", "kwargs", "message"),
    [
        (torch.ones(2, 3), torch.tensor([0.0, float("nan"), 0]), {}, "centre.*NaN"),
        (torch.ones(2, 3), torch.zeros(4), {}, "centre must have shape"),
        (torch.ones(3), torch.zeros(3), {}, r"2-D \(m, D\)"),
        (torch.ones(2, 3, 1), torch.zeros(3), {}, r"2-D \(m, D\)"),
        (torch.ones(2, 0), torch.zeros(0), {}, "D >= 1"),
        ([[1.0, 2.0]], torch.zeros(2), {}, "torch.Tensor"),
        (torch.ones(2, 3, dtype=torch.bool), torch.zeros(3), {}, "real tensor"),
        (torch.ones(2, 3), torch.zeros(3), {"clip_norm": 0.0}, "clip_norm"),
        (torch.ones(2, 3), torch.zeros(3), {"clip_norm": -1.0}, "clip_norm"),
        (torch.ones(2, 3), torch.zeros(3), {"clip_norm": float("nan")}, "clip_norm"),
        (torch.ones(2, 3), torch.zeros(3), {"sampling_rate": 0.0}, "sampling_rate"),
        (torch.ones(2, 3), torch.zeros(3), {"sampling_rate": 1.01}, "sampling_rate"),
        (torch.ones(2, 3), torch.zeros(3), {"dataset_size": 0}, "dataset_size"),
        (torch.ones(2, 3), torch.zeros(3), {"dataset_size": 2.0}, "dataset_size"),
        (torch.ones(2, 3), torch.zeros(3), {"noise_multiplier": 0.0}, "noise_multiplier"),
        (torch.ones(2, 3), torch.zeros(3), {"noise_multiplier": float("inf")}, "noise_multiplier"),
        (torch.ones(2, 3), torch.zeros(3), {"mode": "sphere"}, "mode"),
        (torch.ones(2, 3), torch.zeros(3), {"postprocess": 3}, "postprocess"),
    ],
)
def test_bad_inputs_are_refused_before_anything_happens(
    monkeypatch, vectors, centre, kwargs, message
):
    drawn = _spy_on_noise(monkeypatch)
    recorded = []
    with pytest.raises(InvalidParameterError, match=message):
        release(vectors, centre, before_noise=recorded.append, **kwargs)
    assert recorded == [] and drawn == [], "nothing may be recorded or drawn on bad input"


def test_bad_sampling_arguments_are_refused():
    for n, q in [(0, 0.5), (-3, 0.5), (10, 0.0), (10, 1.5), (10, float("nan"))]:
        with pytest.raises(InvalidParameterError):
            poisson_sample(n, sampling_rate=q)


def test_modes_accept_their_string_values():
    a = bound_contributions(torch.ones(1, 2) * 3, centre=torch.zeros(2), clip_norm=1, mode="clip")
    b = bound_contributions(
        torch.ones(1, 2) * 0.1, centre=torch.zeros(2), clip_norm=1, mode="normalize"
    )
    assert float(torch.linalg.vector_norm(a)) == pytest.approx(1.0)
    assert float(torch.linalg.vector_norm(b)) == pytest.approx(1.0)
