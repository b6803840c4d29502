"""The environment setup: a ComfyUI checkout's own needs join it, the torch family does not."""

from __future__ import annotations

from comfyui_dp_adapt.headless import bootstrap


def test_a_comfyui_checkouts_requirements_join_without_the_torch_family(tmp_path, monkeypatch):
    (tmp_path / "requirements.txt").write_text(
        "comfyui-frontend-package==1.27.10\n"
        "torch\n"
        "torchaudio  # would pull torch down\n"
        "torchvision>=0.20\n"
        "# a comment\n"
        "\n"
        "--extra-index-url https://example.invalid/simple\n"
        "av>=14.2.0\n"
        "SQLAlchemy\n"
    )
    monkeypatch.delenv(bootstrap.COMFYUI_DIR_VARIABLE, raising=False)
    assert bootstrap.comfyui_checkout_requirements() == []
    without = bootstrap._wanted()

    monkeypatch.setenv(bootstrap.COMFYUI_DIR_VARIABLE, str(tmp_path))
    assert bootstrap.comfyui_checkout_requirements() == [
        "comfyui-frontend-package==1.27.10",
        "av>=14.2.0",
        "SQLAlchemy",
    ]
    assert bootstrap._wanted() != without, "a checkout's needs change what must be installed"


def test_a_checkout_without_requirements_adds_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(bootstrap.COMFYUI_DIR_VARIABLE, str(tmp_path))
    assert bootstrap.comfyui_checkout_requirements() == []
