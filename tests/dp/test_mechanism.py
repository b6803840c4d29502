"""Mechanism M1: the bound, the noise statistics, OS-entropy randomness, the record hook."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_dp_adapt.dp.accounting import release_event
from comfyui_dp_adapt.dp.errors import InvalidParameterError
from comfyui_dp_adapt.dp.mechanism import (
    BoundMode,
    bound_contributions,
    poisson_sample,
    release_noisy_aggregate,
    renormalize_unit,
    rescale_to_norm,
)


def random_vectors(m, d, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.rand(m, 1, generator=g, dtype=torch.float64) * scale
    directions = torch.nn.functional.normalize(
        torch.randn(m, d, generator=g, dtype=torch.float64), dim=1
    )
    return directions * lengths


@pytest.mark.parametrize("mode", list(BoundMode))
@pytest.mark.parametrize("clip_norm", [1e-3, 0.5, 1.0, 37.0])
def test_bounded_norms_never_exceed_the_clip_norm(mode, clip_norm):
    for seed in range(5):
        _check_bound(mode, clip_norm, seed)


def _check_bound(mode, clip_norm, seed):
    centre = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    vectors = centre + random_vectors(2000, 64, scale=100 * clip_norm, seed=seed)
    vectors[:5] = centre  # zero differences too
    bounded = bound_contributions(vectors, centre=centre, clip_norm=clip_norm, mode=mode)
    assert (bounded.norm(dim=1) <= clip_norm).all()
    if mode is BoundMode.NORMALIZE:
        nonzero = bounded.norm(dim=1)[5:]
        torch.testing.assert_close(nonzero, torch.full_like(nonzero, clip_norm))


def test_clip_mode_leaves_vectors_inside_the_ball_unchanged_and_keeps_directions():
    centre = torch.zeros(16, dtype=torch.float64)
    inside = random_vectors(100, 16, scale=0.9)
    torch.testing.assert_close(bound_contributions(inside, centre=centre, clip_norm=1.0), inside)
    outside = (
        random_vectors(100, 16, scale=50)
        + torch.nn.functional.normalize(torch.ones(1, 16)).double() * 2
    )
    bounded = bound_contributions(outside, centre=centre, clip_norm=1.0)
    cos = torch.nn.functional.cosine_similarity(bounded, outside, dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_noise_std_matches_z_times_c():
    """Pure-noise releases (all contributions at the centre) of D = 20000 coordinates.

    With R releases there are N = R * D standard normal draws; the sample variance s^2 has
    relative standard deviation sqrt(2/N) (chi-square), so |s/(zC) - 1| > 6 sqrt(1/(2N))
    (six standard deviations of s) has probability below 2e-9 if the noise is right.
    """
    z, c, d, n, releases = 1.7, 0.3, 20_000, 10, 5
    centre = torch.zeros(d, dtype=torch.float64)
    samples = []
    for _ in range(releases):
        release = release_noisy_aggregate(
            centre.repeat(3, 1),
            centre=centre,
            clip_norm=c,
            noise_multiplier=z,
            sampling_rate=1.0,
            dataset_size=n,
        )
        samples.append(release.estimate * n)  # undo the division by q n
    noise = torch.cat(samples)
    count = noise.numel()
    std = noise.std().item()
    assert abs(std / (z * c) - 1) < 6 * math.sqrt(1 / (2 * count))
    # mean zero: the mean of N draws has std zC/sqrt(N); allow six of those
    assert abs(noise.mean().item()) < 6 * z * c / math.sqrt(count)
    # isotropic: coordinates are uncorrelated across releases' halves
    a, b = noise[: count // 2], noise[count // 2 :]
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 6 / math.sqrt(count // 2)


def test_estimate_is_centre_plus_sum_over_q_n_up_to_the_noise():
    centre = torch.full((8,), 0.5, dtype=torch.float64)
    vectors = centre + random_vectors(4, 8, scale=0.1, seed=3)
    release = release_noisy_aggregate(
        vectors,
        centre=centre,
        clip_norm=1.0,
        noise_multiplier=1e-9,
        sampling_rate=0.5,
        dataset_size=10,
    )
    expected = centre + (vectors - centre).sum(0) / (0.5 * 10)
    torch.testing.assert_close(release.estimate, expected, atol=1e-7, rtol=0)
    assert release.event == release_event(noise_multiplier=1e-9, sampling_rate=0.5)
    assert release.dimension == 8 and release.dataset_size == 10


def test_identical_releases_with_identical_workflow_seeds_differ():
    centre = torch.zeros(32, dtype=torch.float64)
    vectors = random_vectors(5, 32, scale=1.0)
    outputs = []
    for _ in range(2):
        torch.manual_seed(1234)  # what a workflow seed does; the noise must ignore it
        outputs.append(
            release_noisy_aggregate(
                vectors,
                centre=centre,
                clip_norm=1.0,
                noise_multiplier=1.0,
                sampling_rate=1.0,
                dataset_size=5,
            ).estimate
        )
    assert not torch.equal(outputs[0], outputs[1])


def test_poisson_sampling_is_fresh_and_ignores_the_global_seed():
    draws = []
    for _ in range(3):
        torch.manual_seed(0)
        draws.append(tuple(poisson_sample(400, sampling_rate=0.5).indices))
    assert len(set(draws)) == 3
    assert poisson_sample(7, sampling_rate=1.0).indices == list(range(7))
    sizes = [len(poisson_sample(1000, sampling_rate=0.1).indices) for _ in range(20)]
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 100) < 6 * math.sqrt(1000 * 0.1 * 0.9 / 20)


def test_sample_repr_hides_which_images_were_kept():
    sample = poisson_sample(50, sampling_rate=0.5)
    assert repr(sample) == "PoissonSample(dataset_size=50, indices=<private>)"
    assert str(sample) == repr(sample)


def test_release_never_holds_the_sample():
    centre = torch.zeros(4, dtype=torch.float64)
    release = release_noisy_aggregate(
        torch.ones(2, 4),
        centre=centre,
        clip_norm=1.0,
        noise_multiplier=1.0,
        sampling_rate=0.5,
        dataset_size=9,
    )
    fields = set(vars(release))
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


def test_empty_sample_still_releases_pure_noise():
    centre = torch.zeros(6, dtype=torch.float64)
    release = release_noisy_aggregate(
        torch.zeros(0, 6),
        centre=centre,
        clip_norm=1.0,
        noise_multiplier=1.0,
        sampling_rate=0.1,
        dataset_size=20,
    )
    assert release.estimate.shape == (6,) and bool((release.estimate != 0).all())


def test_record_hook_runs_once_before_the_noise_and_can_stop_the_release():
    centre = torch.zeros(4, dtype=torch.float64)
    seen = []
    release_noisy_aggregate(
        torch.ones(2, 4),
        centre=centre,
        clip_norm=1.0,
        noise_multiplier=2.0,
        sampling_rate=1.0,
        dataset_size=3,
        before_noise=seen.append,
    )
    assert seen == [release_event(noise_multiplier=2.0, sampling_rate=1.0)]

    class Refused(Exception):
        pass

    def refuse(event):
        raise Refused

    with pytest.raises(Refused):
        release_noisy_aggregate(
            torch.ones(2, 4),
            centre=centre,
            clip_norm=1.0,
            noise_multiplier=2.0,
            sampling_rate=1.0,
            dataset_size=3,
            before_noise=refuse,
        )


def test_post_processing_helpers():
    x = torch.tensor([3.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(renormalize_unit(x).norm(), torch.tensor(1.0, dtype=torch.float64))
    rows = rescale_to_norm(2.0, rows=2)(torch.arange(1.0, 7.0, dtype=torch.float64))
    torch.testing.assert_close(
        rows.reshape(2, 3).norm(dim=1), torch.full((2,), 2.0, dtype=torch.float64)
    )


@pytest.mark.parametrize(
    ("vectors", "centre", "kwargs", "message"),
    [
        (torch.full((2, 3), float("nan")), torch.zeros(3), {}, "NaN"),
        (torch.full((2, 3), float("inf")), torch.zeros(3), {}, "NaN or infinite"),
        (torch.ones(2, 3), torch.zeros(4), {}, "dimension"),
        (torch.ones(3), torch.zeros(3), {}, r"\(m, D\)"),
        (torch.ones(2, 3), torch.zeros(3), {"clip_norm": 0.0}, "clip_norm"),
        (torch.ones(2, 3), torch.zeros(3), {"clip_norm": -1.0}, "clip_norm"),
        (torch.ones(2, 3), torch.zeros(3), {"sampling_rate": 0.0}, "sampling_rate"),
        (torch.ones(2, 3), torch.zeros(3), {"sampling_rate": 1.01}, "sampling_rate"),
        (torch.ones(2, 3), torch.zeros(3), {"dataset_size": 0}, "dataset_size"),
        (torch.ones(5, 3), torch.zeros(3), {"dataset_size": 4}, "declared dataset size"),
        (torch.ones(2, 3), torch.zeros(3), {"noise_multiplier": float("nan")}, "noise_multiplier"),
    ],
)
def test_bad_inputs_are_refused_before_anything_happens(vectors, centre, kwargs, message):
    calls = []
    arguments = dict(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=1.0, dataset_size=10)
    arguments.update(kwargs)
    with pytest.raises(InvalidParameterError, match=message):
        release_noisy_aggregate(vectors, centre=centre, before_noise=calls.append, **arguments)
    assert calls == [], "nothing may be recorded for a refused input"
