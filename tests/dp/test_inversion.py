"""Per-image inversion without coupling (docs/privacy.md §3.2), on a small differentiable toy model.

The toy "text encoder" mixes the placeholder vectors into every position and the toy
"denoiser" is a nonlinear function of latents, context, timestep and noise, so gradients
really flow through both; the real ComfyUI models are covered in tests/nodes.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_dp_adapt.dp import inversion
from comfyui_dp_adapt.dp.errors import InvalidParameterError
from comfyui_dp_adapt.dp.inversion import (
    InversionConfig,
    train_per_image_embeddings,
)
from comfyui_dp_adapt.tests.support.toy_model import D, K, toy_model, toy_prompts


def train(latents, seeds, config=None, model_seed=0, **kwargs):
    text_forward, denoise_loss, calls = toy_model(model_seed)
    config = config or InversionConfig(steps=5, learning_rate=0.05, images_per_batch=2)
    out = train_per_image_embeddings(
        latents,
        initial=torch.zeros(K, D) + 0.1,
        prompts=toy_prompts(),
        config=config,
        seeds=seeds,
        text_forward=text_forward,
        denoise_loss=denoise_loss,
        **kwargs,
    )
    return out, calls


def latents_for(m: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, 4, 3, 3, generator=torch.Generator().manual_seed(seed))


def test_changing_one_image_leaves_every_other_embedding_bitwise_identical():
    latents = latents_for(5)
    seeds = [11, 12, 13, 14, 15]
    before, _ = train(latents, seeds)
    for j in range(5):
        changed = latents.clone()
        changed[j] = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(100 + j))
        after, _ = train(changed, seeds)
        for i in range(5):
            if i != j:
                assert torch.equal(before[i], after[i]), f"image {j} changed embedding {i}"
        assert not torch.equal(before[j], after[j]), "the changed image's own embedding must move"


def test_removing_an_image_does_not_change_the_others():
    latents = latents_for(4)
    full, _ = train(
        latents, [1, 2, 3, 4], InversionConfig(steps=4, learning_rate=0.05, images_per_batch=1)
    )
    fewer, _ = train(
        latents[[0, 2, 3]],
        [1, 3, 4],
        InversionConfig(steps=4, learning_rate=0.05, images_per_batch=1),
    )
    assert torch.equal(full[[0, 2, 3]], fewer)


@pytest.mark.parametrize("per_batch", [2, 3, 4])
def test_removing_any_image_leaves_the_others_bitwise_identical_in_padded_chunks(per_batch):
    """Fixed-size chunks: removing image j moves the others to other chunks and positions,
    yet every other result is bitwise the same (docs/privacy.md §3.2)."""
    latents = latents_for(5)
    seeds = [21, 22, 23, 24, 25]
    config = InversionConfig(steps=3, learning_rate=0.05, images_per_batch=per_batch)
    full, _ = train(latents, seeds, config)
    for j in range(5):
        keep = [i for i in range(5) if i != j]
        fewer, _ = train(latents[keep], [seeds[i] for i in keep], config)
        assert torch.equal(full[keep], fewer), f"removing image {j} moved another image"


def test_work_and_progress_depend_on_the_public_size_only():
    """With a declared size of 8, folders of 5 and 6 images do the same passes."""
    seen = {}
    for m in (5, 6):
        steps = []
        _, calls = train(
            latents_for(m),
            list(range(m)),
            InversionConfig(steps=2, learning_rate=0.05, images_per_batch=3),
            public_rows=8,
            on_step=lambda done, total, steps=steps: steps.append((done, total)),
        )
        seen[m] = (calls["rows"], steps)
    assert seen[5] == seen[6]
    assert seen[5][0] == [3] * 6, "ceil(8 / 3) = 3 chunks of 3 rows, 2 steps each"


@pytest.mark.parametrize("per_batch", [4, 7, 256])
def test_padded_work_is_bounded_by_the_public_size_whatever_the_batch_setting(per_batch):
    """images_per_batch = 256 with n_hat = 4 once padded every pass to 256 rows; a pass now
    has min(images_per_batch, n_hat) rows, so the rows processed are n_hat per step."""
    n_hat, steps = 4, 3
    for m in (2, 4):
        _, calls = train(
            latents_for(m),
            list(range(m)),
            InversionConfig(steps=steps, learning_rate=0.05, images_per_batch=per_batch),
            public_rows=n_hat,
        )
        assert sum(calls["rows"]) == n_hat * steps
        assert set(calls["rows"]) == {n_hat}


def test_small_public_size_keeps_removing_an_image_bitwise_neutral():
    """The pass size min(images_per_batch, n_hat) is public: the same for both folders."""
    latents = latents_for(3)
    seeds = [31, 32, 33]
    config = InversionConfig(steps=3, learning_rate=0.05, images_per_batch=64)
    full, _ = train(latents, seeds, config, public_rows=3)
    fewer, _ = train(latents[[0, 2]], [31, 33], config, public_rows=3)
    assert torch.equal(full[[0, 2]], fewer)


def test_progress_past_the_public_size_is_held_at_its_total():
    """A folder larger than n_hat = 4 (docs/privacy.md §1): the work covers every image,
    but what a progress bar fed through PublicProgress shows is the same for 5, 6 and 9
    images as for 3 and 4: values 1..total of a total from n_hat alone."""
    from comfyui_dp_adapt.dp.inversion import PublicProgress

    shown, rows = {}, {}
    for m in (3, 4, 5, 6, 9):
        reports, raw = [], []
        progress = PublicProgress(4, lambda v, t, reports=reports: reports.append((v, t)))

        def on_step(done, total, raw=raw, progress=progress):
            raw.append((done, total))
            progress.advance_to(done)

        out, calls = train(
            latents_for(m),
            list(range(m)),
            InversionConfig(steps=2, learning_rate=0.05, images_per_batch=2),
            public_rows=4,
            on_step=on_step,
        )
        assert out.shape[0] == m
        assert all(total == 4 and done <= total for done, total in raw)
        shown[m], rows[m] = reports, sum(calls["rows"])
    assert shown[3] == shown[4] == shown[5] == shown[6] == shown[9]
    assert shown[9] == [(v, 4) for v in range(1, 5)]
    assert rows[9] == 2 * 2 * 5, "9 images: 5 padded chunks of 2 rows, 2 steps each"


def test_public_progress_never_passes_or_repeats_its_total():
    from comfyui_dp_adapt.dp.inversion import PublicProgress

    reports = []
    progress = PublicProgress(3, lambda v, t: reports.append((v, t)))
    for value in (1, 1, 2, 5, 3, 9):
        progress.advance_to(value)
    assert reports == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(InvalidParameterError, match="total=0"):
        PublicProgress(0, print)


def test_batching_changes_speed_not_results_beyond_float_rounding():
    latents = latents_for(4)
    one, _ = train(
        latents, [5, 6, 7, 8], InversionConfig(steps=4, learning_rate=0.05, images_per_batch=1)
    )
    four, calls = train(
        latents, [5, 6, 7, 8], InversionConfig(steps=4, learning_rate=0.05, images_per_batch=4)
    )
    assert calls["rows"] == [4] * 4, "all four images should share every forward pass"
    torch.testing.assert_close(one, four, rtol=1e-5, atol=1e-6)


def test_each_image_gets_exactly_the_configured_number_of_steps():
    steps = []
    out, calls = train(
        latents_for(5),
        [1, 2, 3, 4, 5],
        InversionConfig(steps=3, learning_rate=0.05, images_per_batch=2),
        public_rows=5,
        on_step=lambda done, total: steps.append((done, total)),
    )
    assert calls["rows"] == [2] * 9, "the last chunk is padded to the full batch size"
    assert steps == [(i, 9) for i in range(1, 10)]
    assert out.shape == (5, K, D) and out.dtype == torch.float32


def test_training_moves_the_embeddings_away_from_the_initializer():
    out, _ = train(latents_for(3), [1, 2, 3])
    assert (out - 0.1).abs().amax(dim=(1, 2)).min() > 0


def test_per_image_seeds_drive_the_randomness():
    latents = latents_for(2)
    a, _ = train(latents, [1, 2])
    b, _ = train(latents, [1, 3])
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def test_seeds_differing_only_above_bit_64_give_different_training():
    """The per-image generator keeps every bit of a 128-bit seed (a torch generator keeps
    32): seeds equal in their low 64 bits still draw differently."""
    latents = latents_for(2)
    low = 12345
    a, _ = train(latents, [low, low + 1])
    b, _ = train(latents, [low | (1 << 100), low + 1])
    assert not torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_training_seeds_come_from_128_bits_of_os_entropy(monkeypatch):
    asked = []

    def randbits(bits):
        asked.append(bits)
        return (1 << bits) - 1 - len(asked)

    monkeypatch.setattr(inversion.secrets, "randbits", randbits)
    seeds = inversion.training_seeds_from_entropy(3)
    assert asked == [128, 128, 128]
    assert seeds == [(1 << 128) - 2, (1 << 128) - 3, (1 << 128) - 4]
    assert (
        len({tuple(inversion.training_generator(s).integers(1 << 62, size=4)) for s in seeds}) == 3
    )


@pytest.mark.parametrize("bad", [-1, 1.5, True, "7"])
def test_a_bad_training_seed_is_refused(bad):
    with pytest.raises(InvalidParameterError, match="training seed"):
        inversion.training_generator(bad)


def test_cancel_from_the_progress_callback_stops_training():
    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        train(latents_for(3), [1, 2, 3], on_step=cancel)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0, "learning_rate": 0.1, "images_per_batch": 1},
        {"steps": 1, "learning_rate": 0.0, "images_per_batch": 1},
        {"steps": 1, "learning_rate": float("nan"), "images_per_batch": 1},
        {"steps": 1, "learning_rate": 0.1, "images_per_batch": 0},
        {"steps": True, "learning_rate": 0.1, "images_per_batch": 1},
    ],
)
def test_bad_hyperparameters_are_refused_with_their_name(kwargs):
    with pytest.raises(InvalidParameterError) as error:
        InversionConfig(**kwargs)
    bad = next(
        name for name, value in kwargs.items() if not (value and value == value) or value is True
    )
    assert bad in str(error.value)


def test_seed_count_and_initializer_shape_are_checked():
    text_forward, denoise_loss, _ = toy_model()
    config = InversionConfig(steps=1, learning_rate=0.1, images_per_batch=1)
    with pytest.raises(InvalidParameterError, match="one seed per image"):
        train_per_image_embeddings(
            latents_for(2),
            initial=torch.zeros(K, D),
            prompts=toy_prompts(),
            config=config,
            seeds=[1],
            text_forward=text_forward,
            denoise_loss=denoise_loss,
        )
    with pytest.raises(InvalidParameterError, match="placeholders"):
        train_per_image_embeddings(
            latents_for(2),
            initial=torch.zeros(K + 1, D),
            prompts=toy_prompts(),
            config=config,
            seeds=[1, 2],
            text_forward=text_forward,
            denoise_loss=denoise_loss,
        )
