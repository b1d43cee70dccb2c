"""Downstream evaluation through lm-evaluation-harness (minsota.harness), offline, on the local tasks in
tests/assets/eval/: a multiple-choice task (40 examples), a rolling-loglikelihood task and a generation task.

The proof is against an implementation we did not write: the harness's own Hugging Face model (`HFLM`) run on
`minsota export-hf` of the same run must give every example's log-likelihood within 1e-4 (fp32), the same
greedy flags, the same accuracies and the same greedy generations. The run's tokenizer is a byte-level BPE
trained here (no download, no shared data) or, where ../shared/data has it, gpt-neox-20b.
"""

import contextlib
import io
import json
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is part of [dev]")

from minsota import harness  # noqa: E402
from minsota.cli import main  # noqa: E402
from minsota.data import build_tokenizer  # noqa: E402
from minsota.inference import load_run  # noqa: E402

from conftest import ENV, REPO, SHARED_DATA, records, run, sets, torchrun  # noqa: E402

TASKS = REPO / "tests" / "assets" / "eval"
CLOZE, PROSE, COMPLETE = "minsota_python_cloze", "minsota_prose", "minsota_python_complete"
NEOX = SHARED_DATA / "gpt-neox-20b"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The hub is never asked; data_files in the task YAMLs are relative to the repository root."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def manager():
    """The harness's task index for the tasks of tests/assets/eval: that directory alone."""
    return harness.task_manager(TASKS, tasks=[CLOZE, PROSE, COMPLETE])


def train_bpe(directory):
    """A 512-token byte-level BPE (GPT-2's scheme) trained on the task texts, end of text at id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [line for path in TASKS.glob("*.jsonl") for line in path.read_text().splitlines()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json", 512


def minsota(*args) -> tuple[int, str]:
    """`minsota ARGS` in this process (a module's fixture has no capsys) -> (exit code, stderr, with every Python
    warning raised meanwhile: pytest would otherwise record them where no assertion sees them)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            code = main([str(a) for a in args])
    return code, err.getvalue() + "".join(f"warning: {w.category.__name__}: {w.message}\n" for w in raised)


def train_and_export(tmp, tokenizer, vocab):
    """(run directory, its export-hf directory): `tiny` trained 20 steps with a 32-token context (short, so
    few-shot prompts outgrow it), in this process (a child would import torch and transformers again)."""
    overrides = {
        "train.steps": 20,
        "train.eval_batches": 1,
        "train.sample_tokens": 0,
        "data.num_workers": 0,
        "train.seq_len": 32,
        "model.max_seq_len": 32,
        "data.tokenizer": tokenizer,
        "model.vocab_size": vocab,
    }
    code, err = minsota("train", "tiny", "--out", tmp / "run", *sets(overrides))
    assert code == 0, err
    code, err = minsota("export-hf", tmp / "run", tmp / "hf")
    assert code == 0 and "warning" not in err and (tmp / "hf" / "tokenizer.json").is_file(), err
    return tmp / "run", tmp / "hf"


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bpe")
    return train_and_export(tmp, *train_bpe(tmp / "bpe"))


@pytest.fixture(scope="module", params=["bpe", "gpt-neox-20b"])
def trained(request, bpe_run, tmp_path_factory):
    if request.param == "bpe":
        return bpe_run
    if not NEOX.is_dir():
        pytest.skip(f"no {NEOX}")
    return train_and_export(tmp_path_factory.mktemp("neox"), NEOX, 50304)


def samples(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_scores_equal_the_harness_own_hf_model_on_the_export(trained, manager):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    run_dir, hf_dir = trained
    recipe, model, _ = load_run(run_dir, device="cpu")
    ours = harness.MinsotaLM(model, build_tokenizer(recipe), batch_size=8, progress=False)
    theirs = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=1, dtype="float32")
    tasks = [CLOZE, PROSE, COMPLETE]
    # 2-shot: some contexts longer than the model's 32 tokens, so both cut them from the left
    got, want = (harness.evaluate_tasks(lm, tasks, manager, num_fewshot=2, log_samples=True) for lm in (ours, theirs))

    lengths = [
        len(ours.tok_encode(context + choice)) for s in got["samples"][CLOZE] for context, choice in s["arguments"]
    ]
    assert max(lengths) > model.cfg.max_seq_len + 1 > min(lengths)  # some requests were truncated, some not
    for task in (CLOZE, PROSE):
        pairs = [
            (a, b) for s, t in zip(samples(got, task), samples(want, task)) for a, b in zip(s["resps"], t["resps"])
        ]
        assert len(pairs) == {CLOZE: 160, PROSE: 8}[task]
        ll = [(a[0][0], b[0][0]) if task == CLOZE else (a[0], b[0]) for a, b in pairs]
        worst = max(abs(x - y) for x, y in ll)
        assert worst <= 1e-4, f"{task}: max abs log-likelihood difference {worst:.3g} over {len(ll)} requests"
        if task == CLOZE:
            assert [a[0][1] for a, _ in pairs] == [b[0][1] for _, b in pairs]  # the greedy flags
    for metric in ("acc,none", "acc_norm,none"):
        assert got["results"][CLOZE][metric] == want["results"][CLOZE][metric]
    assert got["results"][PROSE]["bits_per_byte,none"] == pytest.approx(
        want["results"][PROSE]["bits_per_byte,none"], abs=1e-5
    )
    # the prose documents outgrow the 32-token context: several rolling windows each
    assert sum(len(ours.tok_encode(s["target"])) for s in got["samples"][PROSE]) > 8 * model.cfg.max_seq_len
    generated = [s["filtered_resps"][0] for s in samples(got, COMPLETE)]
    assert generated == [s["filtered_resps"][0] for s in samples(want, COMPLETE)]
    assert not any("\n" in g for g in generated)  # cut at the stop string
    # without a stop string, 12 greedy tokens after each prompt: ours through the KV cache, theirs HF's generate
    unstopped = {"until": [], "max_gen_toks": 12, "do_sample": False}
    free = [
        Instance("generate_until", {}, (s["arguments"][0][0], unstopped), i)
        for i, s in enumerate(samples(got, COMPLETE))
    ]
    generated = ours.generate_until(free)
    assert generated == theirs.generate_until(free) and all(generated)


def test_eval_command_prints_the_table_and_writes_results(bpe_run, cli):
    run_dir, _ = bpe_run
    code, out, err = cli(
        "eval", run_dir, "--tasks", f"{CLOZE},{PROSE}", "--include-path", TASKS, "--limit", "8", "--batch-size", "3"
    )
    assert code == 0, err
    assert out.startswith("tiny, step 20:") and CLOZE in out and "acc_norm" in out and "bits_per_byte" in out
    written = sorted((run_dir / "eval").glob("step-20-*.json"))
    assert str(written[-1]) in out
    results = json.loads(written[-1].read_text())
    assert results["minsota"]["step"] == 20 and results["n-samples"][CLOZE] == {"original": 40, "effective": 8}
    assert f"|{results['results'][CLOZE]['acc,none']:.4f}|" in out.replace(" ", "")


def test_unknown_task_is_one_line_with_close_matches(cli, tmp_path):
    code, _, err = cli("eval", tmp_path, "--tasks", "hellaswg", "--include-path", TASKS)
    assert code == 2 and err.count("\n") == 1, err
    assert "unknown task 'hellaswg'" in err and "hellaswag" in err and "--include-path" in err
    code, _, err = cli("eval", tmp_path, "--tasks", CLOZE, "--include-path", tmp_path / "nowhere")
    assert code == 2 and "--include-path" in err and "no such directory" in err and err.count("\n") == 1
    code, _, err = cli("eval", tmp_path, "--limit", "3")  # an option of --tasks, without it
    assert code == 2 and err == "minsota: error: --limit goes with --tasks\n"


def test_a_directory_s_tasks_by_name_are_indexed_without_the_harness_own(manager):
    """Exact names of tasks in the directory: its index alone (milliseconds, not ~7 s); a glob, or a task it does
    not hold, gets the harness's ~15k beside them. Each index is built once per process."""
    assert manager.all_tasks == sorted([CLOZE, PROSE, COMPLETE])
    assert harness.task_manager("tests/assets/eval", tasks=[PROSE]) is manager  # the same directory
    both = harness.task_manager(TASKS, tasks=["minsota_p*"])
    assert "arc_easy" in both.all_tasks and harness.task_manager(TASKS, tasks=[CLOZE, "arc_easy"]) is both
    assert sorted(harness.task_names(both, ["minsota_p*"])) == sorted([PROSE, CLOZE, COMPLETE])
    assert harness.task_manager(TASKS) is both  # no names given


def test_a_hub_task_without_an_answer_fails_without_retrying(bpe_run, tmp_path):
    """No offline switch set, the hub just unreachable: datasets is put offline instead of retrying for ~24 s.
    The task is the harness's own arc_easy, named with its directory (indexing all of the harness's takes ~7 s)."""
    import lm_eval.tasks

    arc = Path(lm_eval.tasks.__file__).parent / "arc"
    run_dir, _ = bpe_run
    unreachable = {
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_OFFLINE": "",
        "HF_DATASETS_OFFLINE": "",
        "HF_HOME": str(tmp_path / "hf"),
    }
    args = ("eval", run_dir, "--tasks", "arc_easy", "--include-path", arc)
    done = run(*args, env={**ENV, **unreachable}, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("minsota: error: task data unavailable")
    assert "allenai/ai2_arc" in done.stderr and "unreachable" in done.stderr and "dataset_path: json" in done.stderr
    assert "--include-path" in done.stderr


def test_without_the_extra_it_is_one_line_naming_the_install(cli, monkeypatch, tmp_path):
    for name in [name for name in sys.modules if name.split(".")[0] == "lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import lm_eval...` raises ImportError
    monkeypatch.delitem(sys.modules, "minsota.harness")
    code, _, err = cli("eval", tmp_path, "--tasks", CLOZE)
    assert code == 2 and err.count("\n") == 1 and 'pip install -e ".[eval]"' in err, err


def test_tasks_during_training_go_to_metrics_and_compare(tmp_path, manager, cli):
    """`compare` of tiny with itself, each run scoring two tasks at steps 2 and 4: metrics.jsonl, the table."""
    overrides = {
        "train.eval_batches": 1,
        "train.sample_tokens": 0,
        "data.num_workers": 0,
        "train.eval_tasks": f'["{CLOZE}", "{PROSE}"]',
        "train.eval_tasks_every": 2,
        "train.eval_tasks_limit": 8,
        "train.eval_tasks_path": "tests/assets/eval",
    }
    code, out, err = cli("compare", "tiny", "tiny", "--steps", 4, "--out", tmp_path, *sets(overrides))
    assert code == 0, err
    keys = [f"tasks/{CLOZE}/acc_norm", f"tasks/{PROSE}/bits_per_byte"]
    run_dir = tmp_path / "tiny" / "seed-0"
    scored = [r for r in records(run_dir) if keys[0] in r]
    assert [r["step"] for r in scored] == [2, 4] and all(set(r) - {"val_loss"} == {"step", *keys} for r in scored)
    header, _, *rows = out.splitlines()[:4]
    assert header.split()[-2:] == [key.removeprefix("tasks/") for key in keys]
    assert rows[0].split()[-2:] == rows[1].split()[-2:] == [f"{scored[-1][key]:.4f}" for key in keys]
    # the end-of-run scores are those of the final checkpoint, evaluated afterwards
    recipe, model, _ = load_run(run_dir, device="cpu")
    lm = harness.MinsotaLM(model, build_tokenizer(recipe), recipe.train.micro_batch_size, progress=False)
    again = harness.evaluate_tasks(lm, [CLOZE, PROSE], manager, limit=8)
    assert harness.main_scores(again, [CLOZE, PROSE]) == pytest.approx({k: scored[-1][k] for k in keys}, abs=1e-6)


def test_an_unknown_training_task_stops_before_training(cli, tmp_path):
    """No task directory: the harness's own index (the one `minsota eval --tasks hellaswag` reads), ~7 s to build."""
    code, _, err = cli("train", "tiny", "--out", tmp_path / "run", *sets({"train.eval_tasks": '["arc_esy"]'}))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("minsota: error: --set train.eval_tasks: train.eval_tasks: unknown task 'arc_esy'")
    assert "arc_easy" in err and not (tmp_path / "run" / "recipe.json").exists()


def test_tasks_under_fsdp_score_as_the_checkpoint_does(tmp_path, manager):
    """Two ranks, FSDP2: every rank runs the harness (the root's weights gathered around hidden_states/logits)."""
    overrides = {
        "train.steps": 2,
        "train.micro_batch_size": 4,
        "train.parallelism": "fsdp",
        "train.eval_batches": 2,
        "train.sample_tokens": 0,
        "train.eval_tasks": f'["{PROSE}"]',
        "train.eval_tasks_limit": 4,
        "train.eval_tasks_path": "tests/assets/eval",
    }
    done = torchrun("train", "tiny", "--out", tmp_path / "run", *sets(overrides))
    assert done.returncode == 0, done.stderr
    key = f"tasks/{PROSE}/bits_per_byte"
    scored = [r for r in records(tmp_path / "run") if key in r]
    recipe, model, _ = load_run(tmp_path / "run", device="cpu")
    lm = harness.MinsotaLM(model, build_tokenizer(recipe), 4, progress=False)
    again = harness.main_scores(harness.evaluate_tasks(lm, [PROSE], manager, limit=4), [PROSE])
    assert [r["step"] for r in scored] == [2] and scored[0][key] == pytest.approx(again[key], abs=1e-5)


def test_the_harness_leaves_the_random_streams_as_they_were(bpe_run, manager):
    import random

    import numpy as np
    import torch

    recipe, model, _ = load_run(bpe_run[0], device="cpu")
    lm = harness.MinsotaLM(model, build_tokenizer(recipe), 4, progress=False)
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with harness.rng_untouched():
        harness.evaluate_tasks(lm, [CLOZE], manager, limit=2)  # it seeds all three
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()
