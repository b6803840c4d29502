"""The DP-SGD textual-inversion baseline (docs/privacy.md §4), on a small differentiable toy model.

The toy model is the one of tests/dp/test_inversion.py: the "text encoder" mixes the
placeholder vectors into every position and the "denoiser" is a nonlinear function of
latents, context, timestep and noise, so gradients flow through both.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from comfyui_dp_adapt.dp import dpsgd
from comfyui_dp_adapt.dp.dpsgd import (
    DpSgdConfig,
    _clipped_sum,
    noisy_gradient_sum,
    per_example_gradients,
    train_shared_embedding_dpsgd,
)
from comfyui_dp_adapt.dp.errors import InvalidParameterError
from comfyui_dp_adapt.dp.noise import GaussianMechanism
from comfyui_dp_adapt.tests.dp.test_noise import (
    agree_in_low_64_bits,
    forbid_torch_randomness,
    pin_python_entropy,
)
from comfyui_dp_adapt.tests.support.toy_model import D, K, toy_model, toy_prompts


def latents_for(m: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, 4, 3, 3, generator=torch.Generator().manual_seed(seed))


def pass_inputs(b: int, seed: int = 3):
    """One pass's per-row inputs: latents, templates, timesteps, noise."""
    g = torch.Generator().manual_seed(seed)
    prompts = toy_prompts()
    template_idx = torch.randint(3, (b,), generator=g)
    return (
        torch.randn(b, 4, 3, 3, generator=g),
        prompts.ids[template_idx],
        prompts.mask[template_idx],
        torch.randint(1000, (b,), generator=g).float(),
        torch.randn(b, 4, 3, 3, generator=g),
    )


def embedding_for(seed: int = 7) -> torch.Tensor:
    return torch.randn(K, D, generator=torch.Generator().manual_seed(seed))


def replicated(latents, ids, mask, timesteps, noise, embedding):
    text_forward, denoise_loss, _ = toy_model()
    return per_example_gradients(
        latents,
        embedding,
        ids,
        mask,
        timesteps,
        noise,
        text_forward=text_forward,
        denoise_loss=denoise_loss,
    )


def one_backward_per_example(latents, ids, mask, timesteps, noise, embedding):
    text_forward, denoise_loss, _ = toy_model()
    grads = []
    for i in range(latents.shape[0]):
        e = embedding.detach().clone().requires_grad_(True)
        context = text_forward(ids[i : i + 1], mask[i : i + 1], e.unsqueeze(0))
        loss = denoise_loss(latents[i : i + 1], context, timesteps[i : i + 1], noise[i : i + 1])
        (grad,) = torch.autograd.grad(loss.sum(), e)
        grads.append(grad)
    return torch.stack(grads)


# --- per-example gradients --------------------------------------------------------------


@pytest.mark.parametrize("b", [1, 3, 5])
def test_replicated_leaf_gives_the_gradient_of_each_example_alone(b):
    inputs = pass_inputs(b)
    embedding = embedding_for()
    fast = replicated(*inputs, embedding)
    slow = one_backward_per_example(*inputs, embedding)
    assert fast.shape == (b, K, D)
    assert slow.abs().amax() > 0, "the toy model must have real gradients"
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-7)


def test_an_example_gets_the_same_gradient_at_any_position_of_a_pass():
    b = 4
    inputs = pass_inputs(b)
    embedding = embedding_for()
    reference = one_backward_per_example(*inputs, embedding)[0]
    for position in range(b):
        order = list(range(1, b))
        order.insert(position, 0)  # example 0 moved to ``position``, the others around it
        moved = [x[order] for x in inputs]
        grads = replicated(*moved, embedding)
        torch.testing.assert_close(grads[position], reference, rtol=1e-5, atol=1e-7)


def test_changing_one_image_leaves_every_other_rows_gradient_bitwise_identical():
    b = 5
    latents, ids, mask, timesteps, noise = pass_inputs(b)
    embedding = embedding_for()
    before = replicated(latents, ids, mask, timesteps, noise, embedding)
    for j in range(b):
        changed = latents.clone()
        changed[j] = 10.0 * torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(50 + j))
        after = replicated(changed, ids, mask, timesteps, noise, embedding)
        for i in range(b):
            if i != j:
                assert torch.equal(before[i], after[i]), f"image {j} changed row {i}'s gradient"
        assert not torch.equal(before[j], after[j]), "the changed image's own gradient moves"


# --- clipping, exclusion, noise ---------------------------------------------------------


def test_clipped_norm_never_exceeds_the_bound():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(40, 33, generator=g, dtype=torch.float64)
    scales = torch.logspace(-300, 300, 40, dtype=torch.float64).view(-1, 1)
    rows = rows * scales
    for clip_norm in (1e-3, 0.7, 1.0, 3.3, 1e5):
        for i in range(rows.shape[0]):
            keep = torch.zeros(rows.shape[0], dtype=torch.bool)
            keep[i] = True
            clipped = _clipped_sum(rows, keep, clip_norm)
            assert clipped.dtype == torch.float64
            assert float(torch.linalg.vector_norm(clipped)) <= clip_norm


def test_non_finite_gradients_contribute_zero_silently():
    rows = torch.ones(3, 4, dtype=torch.float64)
    rows[1, 2] = float("nan")
    rows[2, 0] = float("inf")
    keep = torch.ones(3, dtype=torch.bool)
    total = _clipped_sum(rows, keep, 10.0)
    assert torch.equal(total, torch.ones(4, dtype=torch.float64))


def test_an_excluded_or_unsampled_row_contributes_exactly_what_a_removed_row_does():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(6, 20, generator=g, dtype=torch.float64)
    rows[2] = 1e30  # a huge gradient, excluded
    keep = torch.tensor([True, True, False, True, False, True])
    with_excluded = _clipped_sum(rows, keep, 0.5)
    removed = [0, 1, 3, 5]
    without = _clipped_sum(rows[removed], torch.ones(len(removed), dtype=torch.bool), 0.5)
    assert torch.equal(with_excluded, without)
    assert torch.equal(
        _clipped_sum(rows, torch.zeros(6, dtype=torch.bool), 0.5),
        torch.zeros(20, dtype=torch.float64),
    )


def test_noise_of_one_step_has_std_z_c_over_q_n_hat():
    """All rows excluded (one with a huge gradient): the update is pure noise."""
    z, clip_norm, q, n_hat = 1.3, 0.7, 0.25, 40
    per_example = torch.randn(3, 1000, generator=torch.Generator().manual_seed(2)) * 1e6
    keep = torch.zeros(3, dtype=torch.bool)
    draws = torch.stack(
        [
            noisy_gradient_sum(
                per_example,
                keep,
                clip_norm=clip_norm,
                noise_multiplier=z,
                sampling_rate=q,
                declared_dataset_size=n_hat,
            )
            for _ in range(20)
        ]
    )
    assert draws.dtype == torch.float64 and draws.shape == (20, 1000)
    expected = z * clip_norm / (q * n_hat)
    samples = draws.numel()
    # Standard errors: std / sqrt(N) for the mean, ~ std / sqrt(2 N) for the std (6 sigma).
    assert abs(float(draws.mean())) < 6 * expected / samples**0.5
    assert abs(float(draws.std()) / expected - 1) < 6 / (2 * samples) ** 0.5


def test_noisy_gradient_sum_is_the_clipped_sum_plus_noise_over_q_n_hat():
    per_example = torch.tensor([[3.0, 4.0], [0.3, 0.4], [100.0, 0.0]])
    keep = torch.tensor([True, True, False])
    z, clip_norm, q, n_hat = 1e-9, 1.0, 0.5, 4
    out = noisy_gradient_sum(
        per_example,
        keep,
        clip_norm=clip_norm,
        noise_multiplier=z,
        sampling_rate=q,
        declared_dataset_size=n_hat,
    )
    # (0.6, 0.8) clipped + (0.3, 0.4) inside, over q n_hat = 2; noise ~1e-9 / 2.
    torch.testing.assert_close(
        out, torch.tensor([0.45, 0.6], dtype=torch.float64), atol=1e-7, rtol=0
    )


def test_noisy_gradient_sum_refuses_bad_inputs_naming_them():
    rows = torch.zeros(2, 3)
    keep = torch.ones(2, dtype=torch.bool)
    good = {
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        "sampling_rate": 0.5,
        "declared_dataset_size": 10,
    }
    for name, bad in [
        ("clip_norm", 0.0),
        ("noise_multiplier", -1.0),
        ("sampling_rate", 1.5),
        ("declared_dataset_size", 0),
    ]:
        with pytest.raises(InvalidParameterError, match=name):
            noisy_gradient_sum(rows, keep, **{**good, name: bad})
    with pytest.raises(InvalidParameterError, match="keep"):
        noisy_gradient_sum(rows, torch.ones(3, dtype=torch.bool), **good)
    with pytest.raises(InvalidParameterError, match="per_example"):
        noisy_gradient_sum(torch.zeros(3), keep, **good)


# --- training ---------------------------------------------------------------------------


def train(latents, *, config=None, included=None, q=0.5, z=1.0, **kwargs):
    text_forward, denoise_loss, calls = toy_model()
    n = latents.shape[0]
    out = train_shared_embedding_dpsgd(
        latents,
        initial=torch.zeros(K, D) + 0.1,
        prompts=toy_prompts(),
        config=config or DpSgdConfig(steps=3, learning_rate=0.05, images_per_batch=3),
        included=[True] * n if included is None else included,
        sampling_rate=q,
        clip_norm=1.0,
        noise_multiplier=z,
        declared_dataset_size=8,
        text_forward=text_forward,
        denoise_loss=denoise_loss,
        **kwargs,
    )
    return out, calls


@pytest.mark.parametrize("q", [0.01, 0.5, 1.0])
def test_work_and_progress_do_not_depend_on_the_sample_or_the_count(q):
    """Declared size 8: folders of 0, 5 and 6 images, any q, do the same passes and ticks."""
    seen = {}
    for n, rate in itertools.product((0, 5, 6), (q, 1.0)):
        ticks = []
        out, calls = train(
            latents_for(n),
            q=rate,
            public_rows=8,
            on_step=lambda done, total, ticks=ticks: ticks.append((done, total)),
        )
        assert out.shape == (K, D) and out.dtype == torch.float32
        seen[n, rate] = (calls["rows"], ticks)
    first = seen[5, q]
    assert all(value == first for value in seen.values())
    chunks = 3  # ceil(8 / 3) passes of 3 rows per step
    assert first[0] == [3] * (3 * chunks)
    assert first[1] == [(i, 3 * chunks) for i in range(1, 3 * chunks + 1)]


def test_more_images_than_the_declared_size_are_all_processed():
    _, calls = train(latents_for(10), public_rows=8)
    assert calls["rows"] == [3] * (3 * 4), "ceil(10 / 3) passes per step"


def test_randomness_comes_from_os_entropy_not_the_workflow_seed():
    latents = latents_for(4)
    torch.manual_seed(1234)
    a, _ = train(latents)
    torch.manual_seed(1234)
    b, _ = train(latents)
    assert not torch.equal(a, b)


def test_noisy_steps_differ_with_all_python_entropy_and_seeds_pinned(monkeypatch):
    pin_python_entropy(monkeypatch)
    rows, keep = torch.ones(2, 16), torch.ones(2, dtype=torch.bool)
    kwargs = dict(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.5, declared_dataset_size=4)
    first = noisy_gradient_sum(rows, keep, **kwargs)
    pin_python_entropy(monkeypatch)
    assert not torch.equal(noisy_gradient_sum(rows, keep, **kwargs), first)


def test_runs_with_python_entropy_agreeing_in_its_low_64_bits_differ(monkeypatch):
    """Also the per-image training seeds agree: only >64-bit noise and sampling tell them apart."""
    agree_in_low_64_bits(monkeypatch)
    latents = latents_for(4)
    a, _ = train(latents)
    b, _ = train(latents)
    assert not torch.equal(a, b)


def test_noise_and_sampling_never_use_torch_random_draws(monkeypatch):
    forbid_torch_randomness(monkeypatch)
    out = noisy_gradient_sum(
        torch.ones(3, 8),
        torch.tensor([True, False, True]),
        clip_norm=1.0,
        noise_multiplier=1.0,
        sampling_rate=0.5,
        declared_dataset_size=4,
    )
    assert out.shape == (8,) and bool(torch.isfinite(out).all())
    assert 0 < int(dpsgd.bernoulli(200, 0.5).sum()) < 200


class _FixedNoise(GaussianMechanism):
    """A test double: the same noise at every step, so that two runs compare bitwise."""

    __slots__ = ()

    def __call__(self, total):
        return total + torch.linspace(-1e-3, 1e-3, self.dimension, dtype=torch.float64)


def _deterministic(monkeypatch):
    """Fix every draw (per-image seeds, noise; q = 1 draws no sample), for bitwise comparison."""
    monkeypatch.setattr(
        dpsgd, "training_seeds_from_entropy", lambda count: list(range(1000, 1000 + count))
    )
    monkeypatch.setattr(dpsgd, "GaussianMechanism", _FixedNoise)


def test_an_excluded_image_never_influences_the_embedding(monkeypatch):
    latents = latents_for(4)
    included = [True, False, True, True]
    _deterministic(monkeypatch)
    reference, _ = train(latents, included=included, q=1.0, z=1e-3)
    for replacement in (
        torch.zeros(4, 3, 3),
        1e6 * torch.ones(4, 3, 3),
        torch.full((4, 3, 3), float("nan")),
    ):
        changed = latents.clone()
        changed[1] = replacement
        _deterministic(monkeypatch)
        out, _ = train(changed, included=included, q=1.0, z=1e-3)
        assert torch.equal(out, reference)
    changed = latents.clone()
    changed[0] = 5.0
    _deterministic(monkeypatch)
    out, _ = train(changed, included=included, q=1.0, z=1e-3)
    assert not torch.equal(out, reference), "an included image does influence it"


def test_low_noise_training_lowers_the_loss():
    """With next to no noise and q = 1, DP-SGD is clipped gradient descent on the sum."""
    latents = latents_for(6)
    text_forward, denoise_loss, _ = toy_model()
    prompts = toy_prompts()

    def mean_loss(embedding):
        b = latents.shape[0]
        with torch.no_grad():
            context = text_forward(
                prompts.ids[:1].repeat(b, 1),
                prompts.mask[:1].repeat(b, 1),
                embedding.expand(b, K, D),
            )
            return float(
                denoise_loss(
                    latents, context, torch.full((b,), 500.0), torch.zeros_like(latents)
                ).mean()
            )

    initial = torch.zeros(K, D) + 0.1
    out, _ = train(
        latents, q=1.0, z=1e-6, config=DpSgdConfig(steps=40, learning_rate=0.05, images_per_batch=3)
    )
    assert mean_loss(out) < mean_loss(initial)


def test_cancel_from_the_progress_callback_stops_training():
    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        train(latents_for(3), on_step=cancel)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("steps", 0),
        ("steps", 100_001),
        ("steps", True),
        ("learning_rate", 0.0),
        ("learning_rate", float("inf")),
        ("images_per_batch", 0),
        ("num_timesteps", 0),
    ],
)
def test_bad_hyperparameters_are_refused_with_their_name(name, value):
    good = {"steps": 1, "learning_rate": 0.1, "images_per_batch": 1}
    with pytest.raises(InvalidParameterError) as error:
        DpSgdConfig(**{**good, name: value})
    assert f"{name}={value!r}" in str(error.value)


def test_inputs_are_checked_without_revealing_the_image_count():
    with pytest.raises(InvalidParameterError, match="one entry per image") as error:
        train(latents_for(5), included=[True] * 4)
    assert "5" not in str(error.value) and "4" not in str(error.value)
    with pytest.raises(InvalidParameterError, match="bool"):
        train(latents_for(2), included=[1, 0])
    with pytest.raises(InvalidParameterError, match="placeholders"):
        train_shared_embedding_dpsgd(
            latents_for(2),
            initial=torch.zeros(K + 1, D),
            prompts=toy_prompts(),
            config=DpSgdConfig(steps=1, learning_rate=0.1, images_per_batch=1),
            included=[True, True],
            sampling_rate=0.5,
            clip_norm=1.0,
            noise_multiplier=1.0,
            declared_dataset_size=8,
            text_forward=toy_model()[0],
            denoise_loss=toy_model()[1],
        )
    for name, value in [
        ("sampling_rate", 0.0),
        ("clip_norm", -1.0),
        ("noise_multiplier", 0.0),
        ("declared_dataset_size", 0),
    ]:
        text_forward, denoise_loss, _ = toy_model()
        arguments = {
            "initial": torch.zeros(K, D),
            "prompts": toy_prompts(),
            "config": DpSgdConfig(steps=1, learning_rate=0.1, images_per_batch=1),
            "included": [True, True],
            "sampling_rate": 0.5,
            "clip_norm": 1.0,
            "noise_multiplier": 1.0,
            "declared_dataset_size": 8,
            "text_forward": text_forward,
            "denoise_loss": denoise_loss,
        }
        with pytest.raises(InvalidParameterError, match=name):
            train_shared_embedding_dpsgd(latents_for(2), **{**arguments, name: value})


def test_per_image_training_seeds_are_128_bit_and_kept_whole(monkeypatch):
    """Training randomness is not what privacy rests on, yet it is not searchable either:
    runs whose per-image seeds agree in their low 64 bits (noise and sampling fixed) differ,
    and the seeds are asked from the OS once per image."""
    monkeypatch.setattr(dpsgd, "GaussianMechanism", _FixedNoise)
    latents = latents_for(4)
    outputs = []
    for high in (1, 2):
        asked = []

        def seeds(count, high=high, asked=asked):
            asked.append(count)
            return [(high << 100) | (7 + i) for i in range(count)]

        monkeypatch.setattr(dpsgd, "training_seeds_from_entropy", seeds)
        out, _ = train(latents, q=1.0, z=1e-3)
        assert asked == [4]
        outputs.append(out)
    assert not torch.equal(outputs[0], outputs[1])
