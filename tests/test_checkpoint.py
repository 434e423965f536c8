"""The training checkpointer and the model-folder format: round trips, atomicity, bit-exact resume, clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import TINY, tiny_model
from msdda.alignment import BaseTrainConfig, train_diffusion
from msdda.atomic import replace_dir_atomic, write_bytes_atomic
from msdda.errors import MSDDAError
from msdda.models import Checkpointer, CheckpointError, from_pretrained, read_model_config, save_pretrained
from msdda.tasks.digits import DigitsDenoiser, DigitsDenoiserConfig

REPO = Path(__file__).resolve().parents[1]


def _trained_step(model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    x = torch.randn(2, 1, 8, 8, generator=gen)
    model(x, torch.tensor([1, 2]), torch.tensor([0, 1])).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_round_trip_restores_weights_optimizer_generators_and_state(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(5)
    _trained_step(model, opt, gen)
    ck = Checkpointer(tmp_path / "ck", keep=2)
    path = ck.save(3, {"model": model}, opt, {"data": gen}, {"note": "x", "elapsed_seconds": 1.25})
    assert path == tmp_path / "ck" / "step-000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    assert not list((tmp_path / "ck").glob(".tmp*"))
    global_next = torch.rand(3)  # the global RNG as it continues after the save

    model2 = tiny_model(seed=1)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    gen2 = torch.Generator().manual_seed(0)
    got = ck.load_latest({"model": model2}, opt2, {"data": gen2})
    assert got is not None and got.step == 3 and got.state == {"note": "x", "elapsed_seconds": 1.25}
    _assert_same_state(model, model2)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid in s1["state"]:
        for key, val in s1["state"][pid].items():
            assert torch.equal(torch.as_tensor(val), torch.as_tensor(s2["state"][pid][key]))
    assert torch.equal(torch.randn(4, generator=gen), torch.randn(4, generator=gen2))
    assert torch.equal(torch.rand(3), global_next)  # the global RNG was restored too


def test_resumed_optimisation_is_bit_exact(tmp_path):
    def run(steps, start=None):
        model = tiny_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        ck = Checkpointer(tmp_path / "ck")
        if start is not None:
            assert ck.load(ck.path(start), {"model": model}, opt, {"g": gen}).step == start
        for step in range(start or 0, steps):
            _trained_step(model, opt, gen)
            if step + 1 == 2 and start is None:
                ck.save(2, {"model": model}, opt, {"g": gen})
        return model

    full = run(4)
    resumed = run(4, start=2)
    _assert_same_state(full, resumed)


def test_list_latest_and_prune(tmp_path):
    model = nn.Linear(2, 2)
    ck = Checkpointer(tmp_path / "ck", keep=2)
    assert ck.list() == [] and ck.latest() is None
    assert ck.load_latest({"model": model}) is None
    for step in (1, 2, 3):
        ck.save(step, {"model": model})
    (tmp_path / "ck" / ".tmp-step-000004").mkdir()  # an interrupted save: never listed
    (tmp_path / "ck" / "step-000009").mkdir()  # no state.json: incomplete, never listed
    assert [s for s, _ in ck.list()] == [2, 3]
    assert ck.latest() == tmp_path / "ck" / "step-000003"
    ck.prune(1)
    assert [s for s, _ in ck.list()] == [3]
    ck.save(3, {"model": model}, state={"again": True})  # overwriting a step replaces it whole
    assert ck.read(ck.latest()).state == {"again": True}
    ck.clear()
    assert not (tmp_path / "ck").exists()
    with pytest.raises(CheckpointError, match="keep=0"):
        Checkpointer(tmp_path, keep=0)


def test_corrupt_or_mismatched_checkpoints_raise_checkpoint_error(tmp_path):
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters())
    ck = Checkpointer(tmp_path / "ck")
    path = ck.save(1, {"model": model}, opt, {"g": torch.Generator()})
    assert issubclass(CheckpointError, MSDDAError)

    with pytest.raises(CheckpointError, match="refused"):
        def refuse(c):
            raise CheckpointError("refused")
        ck.load(path, {"model": tiny_model()}, validate=refuse)
    with pytest.raises(CheckpointError, match="no state for generator 'other'"):
        ck.load(path, {"model": tiny_model()}, generators={"other": torch.Generator()})
    other = DigitsDenoiser(DigitsDenoiserConfig(base_channels=16, channel_mult=(1, 2), time_embed_dim=16, num_groups=4))
    with pytest.raises(CheckpointError, match="does not match the model architecture"):
        ck.load(path, {"model": other})
    with pytest.raises(CheckpointError, match="optimiser state that does not fit"):
        ck.load(path, {"model": tiny_model()}, torch.optim.Adam(nn.Linear(2, 2).parameters()))

    (path / "model.safetensors").write_bytes(b"\x00not safetensors" * 8)
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        ck.load(path, {"model": tiny_model()})
    (path / "state.json").write_text("{truncated")
    with pytest.raises(CheckpointError, match="unreadable state.json"):
        ck.load(path, {"model": tiny_model()})


def test_reads_the_earlier_state_layout(tmp_path):
    """Checkpoints written before the Checkpointer kept the caller's keys at the top of state.json."""
    model = nn.Linear(2, 2)
    ck = Checkpointer(tmp_path)
    path = ck.save(4, {"model": model})
    doc = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({"step": 4, "optimizer": doc["optimizer"], "config": {"beta": 1}}))
    assert ck.read(path).state == {"config": {"beta": 1}}


_KILLED_SAVE = """
import sys, torch
from torch import nn
from msdda.models import Checkpointer
ck = Checkpointer(sys.argv[1], keep=1)
model = nn.Linear(512, 512)
step = 1
while True:
    ck.save(step, {"model": model}, state={"step": step})
    print(step, flush=True)
    step += 1
"""


def test_a_save_killed_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(tmp_path / "ck")], stdout=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, text=True)
    assert proc.stdout is not None
    for _ in range(3):  # let it finish a few saves, then kill it mid-way through another
        assert proc.stdout.readline()
    time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = Checkpointer(tmp_path / "ck")
    latest = ck.latest()
    assert latest is not None
    got = ck.load(latest, {"model": nn.Linear(512, 512)})
    assert got.state == {"step": got.step} and got.step >= 3


def test_atomic_helpers_leave_no_temp_files(tmp_path):
    write_bytes_atomic(tmp_path / "a.bin", b"123")
    assert (tmp_path / "a.bin").read_bytes() == b"123"
    tmp = tmp_path / ".new"
    tmp.mkdir()
    (tmp / "f").write_text("new")
    final = tmp_path / "d"
    final.mkdir()
    (final / "f").write_text("old")
    replace_dir_atomic(tmp, final)
    assert (final / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "d"]


def test_base_training_resumes_bit_exactly(tmp_path):
    cfg = BaseTrainConfig(steps=4, batch_size=8, warmup_steps=1, seed=3, label_dropout=0.3)
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    labels = torch.arange(16) % 10
    full, stats_full = train_diffusion(tiny_model(), images, labels, cfg, null_class=10, progress=False, log_every=3)

    ck = tmp_path / "ck"
    train_diffusion(tiny_model(), images, labels, BaseTrainConfig(**{**cfg.to_dict(), "steps": 4}), null_class=10,
                    progress=False, log_every=3, checkpoint_dir=ck, checkpoint_every=2)
    assert [s for s, _ in Checkpointer(ck).list()] == [2]  # none at the last step
    assert sorted(p.name for p in Checkpointer(ck).latest().iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    rows = []
    resumed, stats = train_diffusion(tiny_model(seed=7), images, labels, cfg, null_class=10, progress=False,
                                     log_every=3, checkpoint_dir=ck, checkpoint_every=2, on_log=rows.append)
    _assert_same_state(full, resumed)
    assert [r["step"] for r in rows] == [3, 4]  # the steps after the checkpoint only
    assert {k: v for k, v in stats.items() if k != "seconds"} == {k: v for k, v in stats_full.items() if k != "seconds"}
    with pytest.raises(CheckpointError, match="another configuration"):
        train_diffusion(tiny_model(), images, labels, BaseTrainConfig(**{**cfg.to_dict(), "lr": 1e-4}), null_class=10,
                        progress=False, log_every=3, checkpoint_dir=ck, checkpoint_every=2)


def test_model_folder_round_trip_and_checks(tmp_path):
    model = tiny_model()
    d = save_pretrained(model, tmp_path / "m", model_type="msdda.digits_denoiser", task="digits",
                        architecture=TINY.to_dict(), metadata={"kind": "test"})
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    doc = read_model_config(d)
    assert doc["metadata"] == {"kind": "test"} and doc["scheduler"] == {}

    def build(arch):
        return DigitsDenoiser(DigitsDenoiserConfig.from_dict(arch))

    back, _ = from_pretrained(d, build, model_type="msdda.digits_denoiser", task="digits")
    _assert_same_state(model, back)
    assert not back.training and not any(p.requires_grad for p in back.parameters())
    with pytest.raises(CheckpointError, match="holds a 'msdda.digits_denoiser' model, expected 'other'"):
        from_pretrained(d, build, model_type="other", task="digits")
    with pytest.raises(CheckpointError, match="another architecture.*base_channels"):
        from_pretrained(d, build, model_type="msdda.digits_denoiser", task="digits",
                        architecture=DigitsDenoiserConfig().to_dict())


def test_digits_base_recipe_checkpoints_and_resumes(tmp_path):
    from msdda.tasks.digits.training import train_digits_base

    cfg = BaseTrainConfig(steps=3, batch_size=4, warmup_steps=1, seed=2)
    train_digits_base(tmp_path / "a", cfg, architecture=TINY, progress=False)
    assert not (tmp_path / "a" / "checkpoints").exists()  # off unless asked for
    train_digits_base(tmp_path / "b", cfg, architecture=TINY, progress=False, checkpoint_every=2)
    assert [s for s, _ in Checkpointer(tmp_path / "b" / "checkpoints").list()] == [2]
    first = load_file(str(tmp_path / "b" / "model.safetensors"))
    (tmp_path / "b" / "model.safetensors").unlink()
    train_digits_base(tmp_path / "b", cfg, architecture=TINY, progress=False, checkpoint_every=2)  # resumes
    again, plain = load_file(str(tmp_path / "b" / "model.safetensors")), load_file(str(tmp_path / "a" / "model.safetensors"))
    assert first.keys() == again.keys() == plain.keys()
    assert all(torch.equal(first[k], again[k]) and torch.equal(first[k], plain[k]) for k in first)
