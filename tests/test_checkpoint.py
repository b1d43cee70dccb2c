"""minsota.checkpoint on small tensors: round trip, atomic layout, manifest checks, pruning, refusals; and
minsota.rundir's rules that guard checkpoints (the lock, the checkpoint a resume finds, abandoned branches, keys a
resume may not change)."""

import functools
import json
import multiprocessing
import os
import time

import pytest
import torch

from minsota import checkpoint, rundir
from minsota.errors import DivergedError, SaveError, UserError
from minsota.loader import load_recipe
from minsota.rundir import check_changes


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
        [
            checkpoint.MODEL,
            checkpoint.OPTIMIZER,
            checkpoint.RNG,
            checkpoint.TRAINER,
            checkpoint.RECIPE,
            checkpoint.MANIFEST,
        ]
    )
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


def test_finding_then_loading_hashes_each_file_once(tmp_path, monkeypatch):
    (tmp_path / checkpoint.RECIPE).write_text("{}")
    path = checkpoint.save(tmp_path / "checkpoints", 2, **parts(2))
    hashed = []
    sha256 = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda file: hashed.append(file.name) or sha256(file))
    _, found = rundir.find_resumable(tmp_path)
    checkpoint.load(found)
    assert found == path and sorted(hashed) == sorted(json.loads((path / checkpoint.MANIFEST).read_text())["files"])


def test_a_rank_that_receives_the_weights_hashes_only_what_it_reads(tmp_path, monkeypatch):
    """The ranks but 0 of a resume read the RNG, trainer and recipe files, never the weights or optimizer state:
    those are only checked for presence and size (rank 0, which reads them, hashes them)."""
    (tmp_path / checkpoint.RECIPE).write_text("{}")
    older = checkpoint.save(tmp_path / "checkpoints", 1, **parts(1))
    path = checkpoint.save(tmp_path / "checkpoints", 2, **parts(2))
    hashed = []
    sha256 = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda file: hashed.append(file.name) or sha256(file))
    unread = checkpoint.unread_by(tensors_of_the_model=False)
    assert rundir.find_resumable(tmp_path, unread) == (tmp_path, path)
    loaded = checkpoint.load(path, tensors_of_the_model=False)
    assert loaded["model"] is loaded["optimizer"] is None and loaded["trainer"]["step"] == 2
    assert sorted(hashed) == [checkpoint.RECIPE, checkpoint.RNG, checkpoint.TRAINER]
    model = path / checkpoint.MODEL
    data = model.read_bytes()
    model.write_bytes(data[:100] + bytes([data[100] ^ 0x01]) + data[101:])  # same size: only a hash sees it
    assert rundir.find_resumable(tmp_path, unread) == (tmp_path, path)  # rank 0 finds step-1: they follow it
    assert rundir.find_resumable(tmp_path) == (tmp_path, older)
    model.write_bytes(data[:-1])  # a size they do check
    assert rundir.find_resumable(tmp_path, unread) == (tmp_path, older)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete a file", "delete the manifest"])
def test_damage_is_detected_and_never_loaded(tmp_path, damage):
    path = checkpoint.save(tmp_path, 7, **parts(7))
    checkpoint.verify(path)  # verified once before the damage: a remembered hash must not hide it
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
    assert rundir.find_resumable(run) == (run, run / "checkpoints" / "step-2")
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "step-4" in warning and "model.safetensors" in warning
    # one named checkpoint is never replaced by another: it loads or it is refused
    with pytest.raises(checkpoint.CorruptCheckpoint, match="step-4/model.safetensors"):
        rundir.find_resumable(run / "checkpoints" / "step-4")
    assert rundir.find_resumable(run / "checkpoints" / "step-2") == (run, run / "checkpoints" / "step-2")


def test_resume_refuses_a_run_whose_every_checkpoint_is_corrupt(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.json").write_text("{}")
    assert rundir.find_resumable(run) == (run, None)  # never checkpointed: it starts from step 0
    for step in (2, 4):
        checkpoint.save(run / "checkpoints", step, **parts(step))
        (run / "checkpoints" / f"step-{step}" / checkpoint.MANIFEST).unlink()
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"every checkpoint is corrupt \(step-2, step-4; ") as info:
        rundir.find_resumable(run)
    assert info.value.exit_code == 2 and "\n" not in str(info.value) and str(run / "checkpoints") in str(info.value)
    assert capsys.readouterr().err.count("skipping corrupt checkpoint") == 2


def test_one_lock_holder_per_run_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with rundir.lock_run(run) as lock:
        assert lock == run / ".lock" and lock.read_text() == f"pid {os.getpid()} on {os.uname().nodename}\n"
        refused = (
            rf"^{run} is being written by another trainer \(pid {os.getpid()} on .*holding {lock}\): let it "
            rf"finish or stop it, then --resume {run}$"
        )
        with pytest.raises(UserError, match=refused), rundir.lock_run(run):
            pass
        # a forked child (a data worker) does not keep the lock once the trainer lets go
        fork = multiprocessing.get_context("fork")
        started = fork.Event()
        child = fork.Process(target=lambda: (started.set(), time.sleep(60)))
        child.start()
        assert started.wait(60)
    try:
        with rundir.lock_run(run):
            pass
    finally:
        child.kill()
        child.join()
    assert lock.exists()  # the lock file stays; only the lock ends


def test_a_new_run_directory_refused_before_writing_is_removed(tmp_path):
    run = tmp_path / "new" / "run"
    with pytest.raises(UserError, match="refused"), rundir.lock_run(run, create=True):
        assert (run / ".lock").exists()
        raise UserError("refused")
    assert list(tmp_path.iterdir()) == []  # its parents too
    with rundir.lock_run(run, create=True):
        (run / "recipe.json").write_text("{}")
    assert sorted(os.listdir(run)) == [".lock", "recipe.json"]
    (tmp_path / "file").write_text("")
    not_a_directory = f"^{tmp_path / 'file'}: exists and is not a directory; choose another --out$"
    with pytest.raises(UserError, match=not_a_directory), rundir.lock_run(tmp_path / "file", create=True):
        pass


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


def test_failed_redo_of_a_step_puts_the_previous_one_back(tmp_path, monkeypatch):
    """A step redone after a resume replaces its old self; when that save fails, the old one is kept."""
    checkpoint.save(tmp_path, 1, **parts(1))
    checkpoint.save(tmp_path, 2, **parts(2))
    real_rename = os.rename

    def fail_into_place(src, dst):  # Path.rename: the move of the new checkpoint into step-2 fails
        if os.path.basename(src).startswith(".tmp-step-2-"):
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_into_place)
    with pytest.raises(SaveError, match="Input/output error.*earlier checkpoints are intact"):
        checkpoint.save(tmp_path, 2, **parts(7))
    assert sorted(os.listdir(tmp_path)) == ["step-1", "step-2"]
    assert checkpoint.load(tmp_path / "step-2")["trainer"]["step"] == 2


def test_next_start_restores_a_replaced_checkpoint_left_hidden(tmp_path, capsys):
    """A kill between moving step-N aside and moving the new one in: the next start puts step-N back."""
    checkpoint.save(tmp_path, 1, **parts(1))
    checkpoint.save(tmp_path, 2, **parts(2))
    (tmp_path / "step-2").rename(tmp_path / ".old-step-2-999")
    (tmp_path / ".tmp-step-2-999").mkdir()
    assert checkpoint.checkpoints(tmp_path) == [tmp_path / "step-1"]
    checkpoint.remove_temporary(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["step-1", "step-2"]
    assert checkpoint.load(tmp_path / "step-2")["trainer"]["step"] == 2
    assert "restored" in capsys.readouterr().err
    # a leftover whose step-N is in place is a stale copy: removed
    (tmp_path / ".old-step-1-999").mkdir()
    checkpoint.remove_temporary(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["step-1", "step-2"]


def test_set_aside_after_moves_a_later_branch_out_of_reach(tmp_path, capsys):
    for step in (8, 9, 10):
        checkpoint.save(tmp_path, step, **parts(step))
    target = checkpoint.set_aside_after(tmp_path, 8)
    assert target == tmp_path / "abandoned-after-step-8"
    assert checkpoint.checkpoints(tmp_path) == [tmp_path / "step-8"]
    assert sorted(os.listdir(target)) == ["step-10", "step-9"]
    checkpoint.verify(target / "step-10")  # kept whole, still loadable by name
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step-9, step-10" in err and str(target) in err
    # pruning and cleanup never reach into it; a second abandoned branch gets a folder of its own
    checkpoint.save(tmp_path, 9, keep=1, **parts(9))
    checkpoint.remove_temporary(tmp_path)
    assert sorted(os.listdir(target)) == ["step-10", "step-9"]
    assert checkpoint.set_aside_after(tmp_path, 3) == tmp_path / "abandoned-after-step-3"
    assert checkpoint.set_aside_after(tmp_path, 3) is None
    assert checkpoint.set_aside_after(tmp_path / "missing", 3) is None


def test_resume_from_a_named_older_checkpoint_abandons_the_later_ones(tmp_path, cli, monkeypatch, request):
    """step-2 .. step-4 exist; a run resumed from step-2 with another lr saves step-3 and stops: a plain resume
    then continues that run, not the abandoned step-4."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))
    torch.set_num_threads(1)  # as tests/test_train.py: OpenMP spinning is slow under contention
    run = tmp_path / "run"
    short = [
        "--set",
        "train.eval_batches=1",
        "--set",
        "train.sample_tokens=0",
        "--set",
        "train.checkpoint_every=1",
        "--set",
        "train.keep_checkpoints=9",
    ]
    code, _, err = cli("train", "tiny", "--out", run, "--set", "train.steps=4", *short)
    assert code == 0, err
    code, _, err = cli(
        "train", "--resume", run / "checkpoints" / "step-2", "--set", "train.steps=3", "--set", "train.lr=0.0001"
    )
    assert code == 0, err
    abandoned = run / "checkpoints" / "abandoned-after-step-2"
    assert f"moved the later checkpoints step-3, step-4 of the abandoned branch to {abandoned}" in err
    assert [p.name for p in checkpoint.checkpoints(run / "checkpoints")] == ["step-1", "step-2", "step-3"]
    assert sorted(os.listdir(abandoned)) == ["step-3", "step-4"]
    assert rundir.find_resumable(run) == (run, run / "checkpoints" / "step-3")
    assert checkpoint.load(run / "checkpoints" / "step-3")["recipe"]["train"]["lr"] == 0.0001
    # a plain resume moves nothing
    code, _, err = cli("train", "--resume", run, "--set", "train.steps=4")
    assert code == 0 and "resuming at step 3" in err and "moved" not in err, err
    assert sorted(os.listdir(abandoned)) == ["step-3", "step-4"]


@pytest.mark.parametrize(
    "key, value",
    [
        ("data.holdout_every", 50),
        ("data.text_field", "content"),
        ("data.source", "other"),
        ("train.seq_len", 32),
        ("train.seed", 7),  # the shuffled order's seed
    ],
)
def test_resume_refuses_a_change_to_the_train_stream_unless_allowed(key, value, capsys):
    """These keys change the token stream the saved data position points into."""
    saved = json.loads(json.dumps(load_recipe("tiny").to_dict()))
    changed = load_recipe("tiny", {key: value})
    old = saved[key.split(".")[0]][key.split(".")[1]]
    with pytest.raises(
        UserError,
        match=rf"^{key} changed from {old!r} to {value!r} since step-5; resuming would "
        rf"continue a different run \(pass --allow-change {key} to accept\)$",
    ):
        check_changes(saved, changed, "step-5", ())
    check_changes(saved, changed, "step-5", (key,))
    assert f"resuming with {key} {old!r} -> {value!r}" in capsys.readouterr().err
    # not guarded: the worker count changes speed, never data
    check_changes(saved, load_recipe("tiny", {"data.num_workers": 3}), "step-5", ())


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
