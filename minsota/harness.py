"""Downstream evaluation through EleutherAI's lm-evaluation-harness (`lm-eval`, the optional extra ``[eval]``).

HellaSwag, ARC, PIQA, LAMBADA and their like are the harness's tasks, not re-implemented here: `MinsotaLM` is
the harness's language-model API (`lm_eval.api.model.TemplateLM`) over a run's own decoder and tokenizer, read
straight from the run directory (no export step), and `evaluate_tasks` hands it to `lm_eval.simple_evaluate`.

- ``loglikelihood``: the harness's `TemplateLM` turns each (context, continuation) pair into ids as it does for
  its own Hugging Face model (the whole string encoded, then the context; spaces at the end of the context move
  to the continuation; an empty context becomes the end-of-text token, after which every training document
  starts). Requests go longest first, ``batch_size`` at a time, right-padded into one (B, T) forward: causal
  attention keeps the padding out of the real tokens. A request longer than the model's context is cut from
  the left to ``max_seq_len`` tokens (+ the last one, predicted but not fed), as the harness's `HFLM` cuts it.
  Only the continuation's rows go through the LM head, so a batch never holds (B, T, vocab) logits.
- ``loglikelihood_rolling`` (perplexity tasks): the harness's own disjoint rolling windows
  (`get_rolling_token_windows`, after the end-of-text token), scored as above, summed per document.
- ``generate_until``: one request at a time through `minsota.generation.generate` (its KV cache), greedy or
  sampled as the task's ``generation_kwargs`` say, ending at the end-of-text token or a stop string.

`tests/test_harness.py` checks every per-example log-likelihood against the harness's `HFLM` run on
`minsota export-hf` of the same run (fp32, within 1e-4) and the greedy generations token for token.

Tasks are found by the harness (`TaskManager`, plus the YAML files of ``--include-path`` directories; tasks named
exactly from such a directory are indexed from it alone, see `task_manager`): a task on local files is a YAML with
``dataset_path: json`` and ``dataset_kwargs: {data_files: ...}``. With the Hugging Face hub unreachable,
`datasets` is switched to offline mode for the evaluation, so a hub data set that is not in the local cache
fails at once, in one line saying how to use local files, and not after its ~24 s of retries. `report_run` is
``minsota eval RUN_DIR --tasks ...``; `TaskEvaluator` is the trainer's hook for ``train.eval_tasks``. Nothing
else imports this module, and they import it only when asked: lm-eval is optional.
"""

import contextlib
import difflib
import functools
import json
import random
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch.distributed.fsdp import register_fsdp_forward_method
from tqdm import tqdm

from minsota.data import Tokenizer, build_tokenizer, hub_reachable
from minsota.errors import UserError
from minsota.generation import generate
from minsota.runtime import autocast_dtype

INSTALL = 'pip install -e ".[eval]" (or pip install lm-eval)'
try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window, make_table
except ImportError:
    raise UserError(f"downstream tasks (--tasks, train.eval_tasks) need lm-evaluation-harness: {INSTALL}") from None

TASK_PREFIX = "tasks/"  # metrics.jsonl and the trackers get tasks/TASK/METRIC
MAIN_METRICS = ("acc_norm", "acc", "exact_match", "bits_per_byte")  # a task's main metric: the first it reports
MAX_GEN_TOKENS = 256  # generate_until's default when a task names none (the harness's HFLM default)


class MinsotaLM(TemplateLM):
    """A minsota decoder and its tokenizer as an lm-evaluation-harness model (module docstring)."""

    def __init__(
        self, model, tokenizer: Tokenizer, batch_size: int = 8, autocast=None, seed: int = 0, progress: bool = True
    ):
        super().__init__()
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        self.model, self.text_tokenizer, self.batch_size, self.seed = model, tokenizer, batch_size, seed
        self.autocast = autocast or contextlib.nullcontext()
        self.progress = progress
        self._device = model.output.weight.device
        for method in ("hidden_states", "logits"):  # FSDP2 gathers the root's weights around forward() alone
            register_fsdp_forward_method(model, method)  # (a no-op on a model it does not shard)

    @property
    def eot_token_id(self) -> int:  # also the prefix of an empty context (TemplateLM.prefix_token_id)
        return self.text_tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.text_tokenizer.encode(string)  # minsota's tokenizers add no special tokens

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives the continuation) per request
        (key, context ids, continuation ids), scored longest first in batches of one forward each."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        scores = []
        with tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or not self.progress) as bar:
            for chunk in order.get_batched(n=self.batch_size):
                scores += self._score([(context, continuation) for _, context, continuation in chunk])
                bar.update(len(chunk))
        return order.get_original(scores)

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        # fed: what the model reads, cut from the left to its context; it predicts fed[1:] + the last token
        fed = [(context + continuation)[-(self.max_length + 1) : -1] for context, continuation in pairs]
        width = max(map(len, fed))
        tokens = torch.tensor([ids + [0] * (width - len(ids)) for ids in fed], device=self._device)  # (B, T)
        scores = []
        with self.autocast:
            hidden = self.model.hidden_states(tokens)  # (B, T, D)
            for row, ids, (_, continuation) in zip(hidden, fed, pairs):
                logprobs = self.model.logits(row[len(ids) - len(continuation) : len(ids)]).log_softmax(-1)  # (C, vocab)
                target = torch.tensor(continuation, device=self._device)
                scores.append(
                    (logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all()))
                )
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's whole log-likelihood over disjoint windows of at most ``max_seq_len`` predictions."""
        windows = [
            (i, window)
            for i, (text,) in enumerate(request.args for request in requests)
            for window in map(
                make_disjoint_window,
                get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1),
            )
        ]
        scores = self._loglikelihood_tokens([(None, *window) for _, window in windows], disable_tqdm)
        totals = [0.0] * len(requests)
        for (i, _), (logprob, _) in zip(windows, scores):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        texts = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm or not self.progress):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKENS)  # temperature 0 unless do_sample
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)  # the end-of-text token: stop_id
            max_new = kwargs.pop("max_gen_toks")
            # room for the new tokens in the window, as HFLM cuts the context (a too-long one restarts the window)
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_new) :] or [self.prefix_token_id]

            def stop(new: list[int], until=until) -> bool:
                return any(s in self.text_tokenizer.decode(new) for s in until)

            with self.autocast:
                new = generate(
                    self.model,
                    prompt,
                    max_new,
                    kwargs["temperature"],
                    kwargs.get("top_k", 0),
                    kwargs.get("top_p", 1.0),
                    self.seed,
                    stop_id=self.eot_token_id,
                    stop=stop,
                )
            texts.append(postprocess_generated_text(self.text_tokenizer.decode(new), until, None))
        return texts


# ------------------------------------------------------------------------------------------------ tasks


def task_manager(include_path: str | None, key: str = "--include-path", tasks: list[str] | tuple = ()):
    """The harness's task index for ``tasks``: the YAML tasks under ``include_path`` (a directory) alone when each
    of ``tasks`` names one of them exactly, else those and the harness's own, ~15k YAML files that take ~7 s to
    read here (in every process: each rank, each run of a `compare`). An exact task name finds the same task in
    both (the directory's tasks override the harness's); groups, tags and globs may reach beyond the directory.
    Each index is built once per process (a task file added later in the same process is not seen); loading a
    task reads its YAML again."""
    if include_path and not Path(include_path).is_dir():
        raise UserError(f"{key} {include_path}: no such directory (it should hold task YAML files)")
    include_path = str(Path(include_path).resolve()) if include_path else None
    if include_path and tasks:
        local = _index(include_path, defaults=False)
        if set(tasks) <= set(local.all_subtasks):
            return local
    return _index(include_path, defaults=True)


@functools.cache
def _index(include_path: str | None, defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def task_names(manager, tasks: list[str]) -> list[str]:
    """Names (or glob patterns, or YAML paths, as the harness takes them) resolved to registered tasks, groups
    and tags; an unknown one is refused with the harness's closest names."""
    names = []
    for task in tasks:
        matches = [task] if task.endswith(".yaml") and Path(task).is_file() else manager.match_tasks([task])
        if not matches:
            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(
                f"unknown task '{task}'{hint}: `lm-eval ls tasks` lists the harness's tasks; a "
                f"directory of task YAML files adds yours (--include-path DIR, train.eval_tasks_path)"
            )
        names += [name for name in matches if name not in names]
    return names


@contextlib.contextmanager
def hub_or_offline():
    """`datasets` in offline mode while the hub does not answer (its HF_DATASETS_OFFLINE switch, which it reads
    into ``datasets.config.HF_HUB_OFFLINE`` at import): local files and the cache load, a hub data set fails at
    once; task data that cannot be had is one line saying how to use local files."""
    import datasets

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = before or not hub_reachable(for_datasets=True)
    try:
        yield
    except (ConnectionError, FileNotFoundError) as e:  # the hub offline, a data set not cached, data_files missing
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if datasets.config.HF_HUB_OFFLINE:
            raise UserError(
                f"task data unavailable: {reason}; the Hugging Face hub is unreachable (or HF_HUB_OFFLINE"
                f" / HF_DATASETS_OFFLINE is set): evaluate on local files, a task YAML with "
                f"'dataset_path: json' and 'dataset_kwargs: {{data_files: ...}}' in a directory given "
                f"with --include-path DIR (train.eval_tasks_path)"
            ) from None
        raise UserError(
            f"task data unavailable: {reason} (a task's data_files are read relative to the directory you run from)"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def evaluate_tasks(
    lm: MinsotaLM,
    tasks: list[str],
    manager,
    num_fewshot: int | None = None,
    limit: int | None = None,
    log_samples: bool = False,
) -> dict:
    """The harness's results (``results``, ``groups``, ``configs``, ``n-shot``, ...; ``samples`` per example
    with ``log_samples``) of ``lm`` on ``tasks``, which `task_names` resolved."""
    from lm_eval import simple_evaluate

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    training = lm.model.training
    lm.model.eval()
    try:
        with hub_or_offline():
            return simple_evaluate(
                lm,
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=log_samples,
                batch_size=lm.batch_size,
            )
    finally:
        lm.model.train(training)


def main_scores(results: dict, tasks: list[str]) -> dict[str, float]:
    """Each task's (or group's) main metric as ``tasks/TASK/METRIC``: the first of `MAIN_METRICS` it reports,
    else its first metric; a filter other than the default stays in the name (``exact_match,strict-match``)."""
    scores = {}
    for task in tasks:
        row = results.get("groups", {}).get(task) or results["results"].get(task, {})
        metrics = {
            key.removesuffix(",none"): value
            for key, value in row.items()
            if "," in key and "_stderr," not in key and isinstance(value, (int, float))
        }
        if metrics:
            main = next((m for m in MAIN_METRICS if m in metrics), next(iter(metrics)))
            scores[f"{TASK_PREFIX}{task}/{main}"] = float(metrics[main])
    return scores


# ------------------------------------------------------------------------------------------ entry points


def report_run(
    recipe,
    model,
    step: int,
    run_dir: Path,
    tasks: list[str],
    manager,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> str:
    """``minsota eval RUN_DIR --tasks ...`` (`minsota.inference.evaluate_run_tasks` loads the run): the harness's
    tables for a run's checkpoint at ``step``; the results go to RUN_DIR/eval/step-N-TIMESTAMP.json."""
    dtype = autocast_dtype(recipe.train.precision, model.output.weight.device)
    autocast = torch.autocast(model.output.weight.device.type, dtype=dtype) if dtype else None
    lm = MinsotaLM(model, build_tokenizer(recipe), batch_size, autocast, seed=recipe.train.seed)
    results = evaluate_tasks(lm, tasks, manager, num_fewshot, limit)
    out = run_dir / "eval" / f"step-{step}-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    results["minsota"] = {"run_dir": str(run_dir), "step": step, "recipe": recipe.name, "tasks": tasks}
    out.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    tables = [make_table(results)] + ([make_table(results, "groups")] if results.get("groups") else [])
    return "\n".join([f"{recipe.name}, step {step}:", *tables, f"wrote {out}"])


@contextlib.contextmanager
def rng_untouched():
    """simple_evaluate seeds Python's, NumPy's and torch's RNGs; a training run's streams carry on as if it had
    not run."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        yield
    random.setstate(python)
    np.random.set_state(numpy)


class TaskEvaluator:
    """``train.eval_tasks`` for the trainer. Built before the run starts: an unknown task, a missing directory
    or task data that cannot be had stops the run before it trains (the data is loaded once to see)."""

    def __init__(self, recipe):
        t = recipe.train
        try:
            self.manager = task_manager(t.eval_tasks_path or None, "train.eval_tasks_path", t.eval_tasks)
            self.tasks = task_names(self.manager, t.eval_tasks)
            with hub_or_offline():
                self.manager.load(self.tasks)
        except UserError as e:
            raise UserError(f"{recipe.where('train.eval_tasks')}: train.eval_tasks: {e}") from None
        self.limit = t.eval_tasks_limit or None
        self.batch_size, self.seed = t.micro_batch_size, t.seed
        self.lm = None

    def __call__(self, model, tokenizer: Tokenizer, autocast) -> dict[str, float]:
        """Each task's main metric (`main_scores`) for the model as it is now. Every rank runs it whole (under
        FSDP2 the forwards gather weights collectively, as the end-of-run sample does); rank 0 logs it."""
        if self.lm is None:
            self.lm = MinsotaLM(model, tokenizer, self.batch_size, autocast, self.seed, progress=False)
        with rng_untouched():
            results = evaluate_tasks(self.lm, self.tasks, self.manager, limit=self.limit)
        return main_scores(results, self.tasks) if results else {}  # None where LOCAL_RANK > 0 (torchrun)
