"""Digits task building blocks: data, denoiser network, classifier (training, shipped weights, I/O)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from msdda.errors import MSDDAError
from msdda.tasks.digits import (
    NULL_CLASS,
    NUM_CLASSES,
    ClassifierLoadError,
    DigitsClassifier,
    DigitsClassifierConfig,
    DigitsDenoiser,
    DigitsDenoiserConfig,
    DigitsTaskError,
    accuracy,
    count_parameters,
    default_classifier_dir,
    load_classifier,
    load_digits_tensor,
    save_classifier,
    split_digits,
    train_and_save_default_classifier,
    train_classifier,
)
from msdda.tasks.digits.classifier import CONFIG_FILE, WEIGHTS_FILE, read_classifier_metadata

# ---------------------------------------------------------------------------------------------- data


def test_load_digits_shapes_and_range() -> None:
    from sklearn.datasets import load_digits

    images, labels = load_digits_tensor()
    assert images.shape == (1797, 1, 8, 8)
    assert images.dtype == torch.float32
    assert labels.shape == (1797,)
    assert labels.dtype == torch.int64
    assert float(images.min()) == -1.0
    assert float(images.max()) == 1.0
    assert set(labels.tolist()) == set(range(NUM_CLASSES))
    assert NUM_CLASSES == 10 and NULL_CLASS == 10
    # Raw 0..16 maps linearly: 0 -> -1, 8 -> 0, 16 -> 1.
    raw = torch.as_tensor(load_digits().images, dtype=torch.float32)
    torch.testing.assert_close(images[:, 0], raw / 8.0 - 1.0)


def test_load_digits_returns_copies() -> None:
    images, _ = load_digits_tensor()
    images.fill_(0.0)
    again, _ = load_digits_tensor()
    assert float(again.min()) == -1.0


def test_split_is_deterministic_disjoint_and_stratified() -> None:
    a = split_digits(seed=0, holdout_fraction=0.2)
    b = split_digits(seed=0, holdout_fraction=0.2)
    c = split_digits(seed=1, holdout_fraction=0.2)
    assert torch.equal(a.holdout_images, b.holdout_images)
    assert torch.equal(a.train_labels, b.train_labels)
    assert not torch.equal(a.holdout_images, c.holdout_images)
    n_train, n_hold = a.train_labels.numel(), a.holdout_labels.numel()
    assert n_train + n_hold == 1797
    assert abs(n_hold / 1797 - 0.2) < 0.01
    # Disjoint: no held-out image appears among the training images.
    flat_train = a.train_images.flatten(1)
    flat_hold = a.holdout_images.flatten(1)
    all_images, _ = load_digits_tensor()
    unique_total = torch.unique(all_images.flatten(1), dim=0).shape[0]
    unique_union = torch.unique(torch.cat([flat_train, flat_hold]), dim=0).shape[0]
    assert unique_union == unique_total
    # Stratified: every class at about 20% in the held-out part.
    for cls in range(NUM_CLASSES):
        n_cls = int((a.train_labels == cls).sum() + (a.holdout_labels == cls).sum())
        assert abs(int((a.holdout_labels == cls).sum()) - 0.2 * n_cls) <= 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(DigitsTaskError, match="holdout_fraction"):
        split_digits(holdout_fraction=fraction)
    assert issubclass(DigitsTaskError, MSDDAError) and issubclass(DigitsTaskError, ValueError)


# ------------------------------------------------------------------------------------------- network


def _inputs(b: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    c = torch.randint(0, 11, (b,), generator=g)
    return x, t, c


def _randomise_output(model: DigitsDenoiser, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:  # the zero-initialised convs
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_denoiser_output_shapes() -> None:
    x, t, c = _inputs()
    assert DigitsDenoiser()(x, t, c).shape == (5, 2, 8, 8)
    small = DigitsDenoiser(DigitsDenoiserConfig(learned_variance=False))
    assert small(x, t, c).shape == (5, 1, 8, 8)


def test_denoiser_parameter_count() -> None:
    n = count_parameters(DigitsDenoiser())
    assert 200_000 <= n <= 450_000, n


def test_denoiser_zero_init_output() -> None:
    torch.manual_seed(0)
    x, t, c = _inputs(7)
    out = DigitsDenoiser()(x, t, c)
    assert torch.count_nonzero(out) == 0  # eps = 0 and v = 0 before training


def test_denoiser_is_deterministic() -> None:
    torch.manual_seed(123)
    m1 = DigitsDenoiser()
    torch.manual_seed(123)
    m2 = DigitsDenoiser()
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)
    _randomise_output(m1)
    _randomise_output(m2)
    x, t, c = _inputs()
    out1, out2 = m1(x, t, c), m2(x, t, c)
    assert torch.equal(out1, out2)
    assert torch.equal(m1(x, t, c), out1)  # same input, same output
    assert out1.abs().sum() > 0


def test_denoiser_conditioning_and_timestep_forms() -> None:
    torch.manual_seed(0)
    m = DigitsDenoiser().eval()
    _randomise_output(m)
    x, t, _ = _inputs(4)
    # cond None means the null class everywhere.
    torch.testing.assert_close(m(x, t, None), m(x, t, torch.full((4,), NULL_CLASS)))
    # A scalar timestep is broadcast; float timesteps are accepted.
    torch.testing.assert_close(m(x, 17, None), m(x, torch.full((4,), 17), None))
    torch.testing.assert_close(m(x, torch.tensor(17.0), None), m(x, 17, None))
    # The class and the timestep both change the prediction.
    a = m(x, t, torch.zeros(4, dtype=torch.long))
    b = m(x, t, torch.full((4,), 7))
    assert (a - b).abs().max() > 1e-4
    assert (m(x, 10, None) - m(x, 900, None)).abs().max() > 1e-4


def test_denoiser_gradients_reach_input_and_first_layer() -> None:
    torch.manual_seed(0)
    m = DigitsDenoiser()
    _randomise_output(m)
    x, t, c = _inputs(3)
    x.requires_grad_(True)
    m(x, t, c).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert m.conv_in.weight.grad is not None and m.conv_in.weight.grad.abs().sum() > 0
    assert m.class_emb.weight.grad is not None


def test_denoiser_gradients_match_finite_differences() -> None:
    # The residual blocks use in-place ops for speed; this checks they leave autograd exact.
    torch.manual_seed(0)
    m = DigitsDenoiser().double()
    _randomise_output(m)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    t, c = torch.tensor([3, 500]), torch.tensor([1, NULL_CLASS])
    assert torch.autograd.gradcheck(lambda x_: m(x_, t, c), (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_denoiser_rejects_bad_inputs() -> None:
    m = DigitsDenoiser()
    x, t, c = _inputs(3)
    with pytest.raises(DigitsTaskError, match=r"\[B, 1, 8, 8\]"):
        m(torch.zeros(3, 8, 8), t, c)
    with pytest.raises(DigitsTaskError, match="t of shape"):
        m(x, torch.zeros(2), c)
    with pytest.raises(DigitsTaskError, match="0..10"):
        m(x, t, torch.tensor([0, 11, 3]))
    with pytest.raises(DigitsTaskError, match="integer tensor"):
        m(x, t, torch.zeros(3))


def test_denoiser_config_round_trip_and_validation() -> None:
    cfg = DigitsDenoiserConfig(base_channels=8, channel_mult=(1, 2), dropout=0.1, learned_variance=False)
    data = json.loads(json.dumps(cfg.to_dict()))
    back = DigitsDenoiserConfig.from_dict(data)
    assert back == cfg and back.channel_mult == (1, 2)
    assert DigitsDenoiser(back)(torch.zeros(2, 1, 8, 8), 3, None).shape == (2, 1, 8, 8)
    with pytest.raises(DigitsTaskError, match="unknown DigitsDenoiserConfig keys"):
        DigitsDenoiserConfig.from_dict({"base_channel": 8})
    with pytest.raises(DigitsTaskError, match="num_groups"):
        DigitsDenoiserConfig(base_channels=12)
    with pytest.raises(DigitsTaskError, match="divisible"):
        DigitsDenoiserConfig(channel_mult=(1, 1, 1, 1, 1))


# ---------------------------------------------------------------------------------------- classifier


def test_shipped_classifier_accuracy() -> None:
    directory = default_classifier_dir()
    assert (directory / WEIGHTS_FILE).is_file(), "run msdda.tasks.digits.train_and_save_default_classifier()"
    assert (directory / WEIGHTS_FILE).stat().st_size < 300_000
    model = load_classifier(directory)
    split = split_digits(seed=0)
    acc = accuracy(model, split.holdout_images, split.holdout_labels)
    assert acc >= 0.95, acc
    # It also tolerates sampler-like noise, which the augmentation is for.
    g = torch.Generator().manual_seed(0)
    noisy = split.holdout_images + 0.2 * torch.randn(split.holdout_images.shape, generator=g)
    assert accuracy(model, noisy, split.holdout_labels) >= 0.9
    assert read_classifier_metadata(directory)["holdout_accuracy"] == pytest.approx(acc, abs=1e-6)


def test_train_classifier_is_deterministic_and_leaves_global_rng() -> None:
    split = split_digits(seed=0)
    x, y = split.train_images[:256], split.train_labels[:256]
    torch.manual_seed(99)
    before = torch.rand(3)
    torch.manual_seed(99)
    a = train_classifier(x, y, epochs=2, seed=5, progress=False)
    after = torch.rand(3)
    b = train_classifier(x, y, epochs=2, seed=5, progress=False)
    threads = torch.get_num_threads()
    c = train_classifier(x, y, epochs=2, seed=6, progress=False, num_threads=1)
    assert torch.get_num_threads() == threads  # the thread setting is restored
    assert torch.equal(before, after)  # training did not consume the caller's global RNG
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.head.weight, c.head.weight)


def test_train_and_save_default_classifier_fast_and_accurate(tmp_path) -> None:
    # CPU time, not wall time: other processes sharing the cores must not fail this test. The budget is
    # 30 s of wall time on 2 cores; an unloaded run takes a few seconds.
    t0 = time.process_time()
    out = train_and_save_default_classifier(tmp_path / "clf", seed=0, progress=False)
    cpu_seconds = time.process_time() - t0
    assert cpu_seconds < 60, cpu_seconds
    meta = read_classifier_metadata(out)
    assert meta["holdout_accuracy"] >= 0.95
    assert meta["split_seed"] == 0 and meta["train_seed"] == 0
    split = split_digits(seed=0)
    assert accuracy(load_classifier(out), split.holdout_images, split.holdout_labels) >= 0.95


def test_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = DigitsClassifier(DigitsClassifierConfig(channels=(8, 8, 16)))
    save_classifier(model, tmp_path, metadata={"note": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files left
    back = load_classifier(tmp_path)
    assert back.config == model.config
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(back(x), model.eval()(x), rtol=0, atol=0)
    assert read_classifier_metadata(tmp_path) == {"note": "test"}


def test_load_errors_name_the_path(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ClassifierLoadError, match="nowhere.*msdda train-classifier"):
        load_classifier(missing)

    save_classifier(DigitsClassifier(), tmp_path)
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(b"\x00garbage, not a safetensors file" * 10)
    with pytest.raises(ClassifierLoadError, match=f"{weights}.*corrupt") as info:
        load_classifier(tmp_path)
    assert isinstance(info.value, MSDDAError)

    weights.unlink()
    with pytest.raises(ClassifierLoadError, match=f"{weights}.*does not exist"):
        load_classifier(tmp_path)

    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ClassifierLoadError, match="not valid JSON"):
        load_classifier(tmp_path)


def test_load_rejects_mismatched_config(tmp_path) -> None:
    save_classifier(DigitsClassifier(DigitsClassifierConfig(channels=(8, 8, 16))), tmp_path)
    cfg_path = tmp_path / CONFIG_FILE
    doc = json.loads(cfg_path.read_text())
    doc["architecture"]["channels"] = [8, 8, 32]
    cfg_path.write_text(json.dumps(doc))
    with pytest.raises(
        ClassifierLoadError,
        match=r"shape mismatches .*conv3\.weight: model \(32, 8, 3, 3\), file \(16, 8, 3, 3\)",
    ):
        load_classifier(tmp_path)
    doc["architecture"]["width"] = 3
    cfg_path.write_text(json.dumps(doc))
    with pytest.raises(ClassifierLoadError, match="unknown DigitsClassifierConfig keys"):
        load_classifier(tmp_path)
    doc["model_type"] = "something_else"
    cfg_path.write_text(json.dumps(doc))
    with pytest.raises(ClassifierLoadError, match="not a digits classifier config"):
        load_classifier(tmp_path)


def test_classifier_rejects_bad_shape() -> None:
    with pytest.raises(DigitsTaskError, match=r"\[B, 1, 8, 8\]"):
        DigitsClassifier()(torch.zeros(2, 64))


def test_classifier_folder_is_a_model_folder_and_the_earlier_layout_still_loads(tmp_path) -> None:
    torch.manual_seed(0)
    model = DigitsClassifier(DigitsClassifierConfig(channels=(8, 8, 16)))
    save_classifier(model, tmp_path, metadata={"note": "old"})
    doc = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert doc["model_type"] == "msdda.digits_classifier" and doc["task"] == "digits"
    assert doc["architecture"] == {"channels": [8, 8, 16], "num_classes": 10}
    # the layout written before the one model-folder format
    old = {"model_type": doc["model_type"], "config": doc["architecture"], "metadata": doc["metadata"]}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(old))
    back = load_classifier(tmp_path)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(back(x), model.eval()(x), rtol=0, atol=0)
    assert read_classifier_metadata(tmp_path) == {"note": "old"}
