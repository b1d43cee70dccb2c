"""minsota.checkpoint on small tensors: round trip, atomic layout, manifest checks, pruning, refusals."""

import json
import os

import pytest
import torch

from minsota import checkpoint
from minsota.errors import DivergedError, SaveError


def parts(step=1):
    gen = torch.Generator().manual_seed(step)
    embedding = torch.randn(16, 4, generator=gen)
    return {
        "model": {"tok_embeddings.weight": embedding, "output.weight": embedding, "norm.weight": torch.ones(4)},
        "optimizer": {"norm.weight/exp_avg": torch.randn(4, generator=gen), "norm.weight/step": torch.tensor(3.0)},
        "rng": {"cpu": torch.get_rng_state()},
        "trainer": {"step": step, "data": {"windows": 8 * step}},
        "recipe": {"name": "test", "model": {"dim": 4}},
    }


def test_round_trip_with_tied_weights(tmp_path):
    saved = parts(3)
    path = checkpoint.save(tmp_path, 3, **saved)
    assert path == tmp_path / "step-3"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [checkpoint.MODEL, checkpoint.OPTIMIZER, checkpoint.RNG, checkpoint.TRAINER, checkpoint.RECIPE,
         checkpoint.MANIFEST])
    loaded = checkpoint.load(path)
    assert loaded["step"] == 3 and loaded["trainer"] == saved["trainer"] and loaded["recipe"] == saved["recipe"]
    for part in ("model", "optimizer", "rng"):
        assert loaded[part].keys() == saved[part].keys()
        for name, tensor in saved[part].items():
            assert torch.equal(loaded[part][name], tensor), (part, name)
    # the tied embedding is stored once and comes back as one tensor under both names
    assert loaded["model"]["output.weight"] is loaded["model"]["tok_embeddings.weight"]
    # inference and export read the weights alone: no optimizer state (twice the model) in memory
    weights = checkpoint.load(path, weights_only=True)
    assert weights["optimizer"] is weights["rng"] is weights["trainer"] is None
    assert weights["step"] == 3 and weights["recipe"] == saved["recipe"]
    assert weights["model"].keys() == saved["model"].keys()
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    assert manifest["step"] == 3 and set(manifest["files"]) == set(os.listdir(path)) - {checkpoint.MANIFEST}


def test_weights_only_checkpoint(tmp_path):
    """What an import writes: weights and recipe, no trainer state."""
    saved = parts()
    checkpoint.save(tmp_path, 0, model=saved["model"], recipe=saved["recipe"])
    loaded = checkpoint.load(tmp_path / "step-0")
    assert loaded["trainer"] is None and loaded["optimizer"] is None and loaded["rng"] is None
    assert torch.equal(loaded["model"]["norm.weight"], saved["model"]["norm.weight"])


def test_keeps_the_newest_and_replaces_a_redone_step(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, keep=2, **parts(step))
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-3", "step-4"]
    # resumed from step 3, the run saves step 4 again: the new one replaces the old, nothing is left over
    checkpoint.save(tmp_path, 4, keep=2, **parts(5))
    assert sorted(os.listdir(tmp_path)) == ["step-3", "step-4"]
    assert checkpoint.load(tmp_path / "step-4")["trainer"]["step"] == 5


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete a file", "delete the manifest"])
def test_damage_is_detected_and_never_loaded(tmp_path, damage):
    path = checkpoint.save(tmp_path, 7, **parts(7))
    target = path / (checkpoint.MANIFEST if damage == "delete the manifest" else checkpoint.OPTIMIZER)
    data = target.read_bytes()
    if damage == "flip a byte":
        target.write_bytes(data[:100] + bytes([data[100] ^ 0x01]) + data[101:])
    elif damage == "truncate":
        target.write_bytes(data[:-10])
    else:
        target.unlink()
    with pytest.raises(checkpoint.CorruptCheckpoint, match=str(target)) as info:
        checkpoint.load(path)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.json").write_text("{}")
    for step in (2, 4):
        checkpoint.save(run / "checkpoints", step, **parts(step))
    model = run / "checkpoints" / "step-4" / checkpoint.MODEL
    model.write_bytes(model.read_bytes()[:-1])
    assert checkpoint.find_resumable(run) == (run, run / "checkpoints" / "step-2")
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "step-4" in warning and "model.safetensors" in warning
    # one named checkpoint is never replaced by another: it loads or it is refused
    with pytest.raises(checkpoint.CorruptCheckpoint, match="step-4/model.safetensors"):
        checkpoint.find_resumable(run / "checkpoints" / "step-4")
    assert checkpoint.find_resumable(run / "checkpoints" / "step-2") == (run, run / "checkpoints" / "step-2")


def test_refuses_non_finite_tensors(tmp_path):
    bad = parts()
    bad["optimizer"]["norm.weight/exp_avg"][1] = float("nan")
    with pytest.raises(DivergedError, match="norm.weight/exp_avg"):
        checkpoint.save(tmp_path, 1, **bad)
    assert list(tmp_path.iterdir()) == []


def test_io_error_removes_the_temporary_directory(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, **parts(1))

    def disk_full(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_json", disk_full)
    with pytest.raises(SaveError, match="No space left on device") as info:
        checkpoint.save(tmp_path, 2, **parts(2))
    assert info.value.exit_code == 1
    assert os.listdir(tmp_path) == ["step-1"]
    checkpoint.verify(tmp_path / "step-1")


def test_interrupted_save_leaves_only_hidden_leftovers(tmp_path):
    """A kill mid-save leaves a hidden temporary directory that no reader lists and the next run removes."""
    checkpoint.save(tmp_path, 1, **parts(1))
    (tmp_path / ".tmp-step-2-999").mkdir()
    (tmp_path / ".tmp-step-2-999" / checkpoint.MODEL).write_bytes(b"partial")
    assert checkpoint.checkpoints(tmp_path) == [tmp_path / "step-1"]
    checkpoint.remove_temporary(tmp_path)
    assert os.listdir(tmp_path) == ["step-1"]


def test_save_weights_for_other_tools(tmp_path):
    weight = torch.arange(6.0).view(2, 3)
    checkpoint.save_weights(tmp_path / "w.safetensors", {"a": weight, "b": weight, "c": weight[1]})
    loaded = checkpoint.load_weights(tmp_path / "w.safetensors")
    assert loaded["b"] is loaded["a"] and torch.equal(loaded["a"], weight) and torch.equal(loaded["c"], weight[1])
