"""Several minsota commands in turn in one process, as `conftest.in_turn` launches them: alone, or in each rank
under torchrun, so that the launch's start-up (importing torch, starting the ranks, joining their process
group: ~10 s) is paid once for all of them rather than once per command.

    python tests/jobs.py JOBS.json OUT

JOBS.json maps a name to {"code": Python that every rank runs first (optional), "argv": the `minsota` arguments
(null: the code alone)}. Every rank runs every job in that order and writes OUT/NAME/RANK.out and RANK.err
(what the job printed), then RANK.code (its exit status; absent: it never finished). Under torchrun a job that
raises or exits non-zero ends its rank's process, as the command would alone, since the other ranks may be
waiting for it in a collective: torchrun then ends the launch, and the jobs after it never run. A job's code
may patch modules for the jobs after it: such jobs go last.
"""

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from minsota.cli import main


def run(job: dict, folder: Path, rank: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{rank}.start").write_text(repr(time.time()))
    with (
        open(folder / f"{rank}.out", "w") as out,
        open(folder / f"{rank}.err", "w") as err,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        torch._dynamo.reset()  # each job compiles afresh, as in a process of its own
        try:
            exec(job.get("code", ""), {"__name__": "__job__"})
            if dist.is_initialized():
                dist.barrier()  # what rank 0's code prepared (a copied run) is there before any rank goes on
            code = 0 if job["argv"] is None else main(job["argv"])
        except SystemExit as exit_:  # argparse's refusals; sys.exit("text") exits 1, as Python's own does
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        except BaseException:
            traceback.print_exc()
            raise
    (folder / f"{rank}.code").write_text(str(code))
    return code


if __name__ == "__main__":
    jobs, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the ranks join once: the trainer keeps a group it finds
        dist.init_process_group("gloo")
    for name, job in jobs.items():
        if run(job, out / name, rank) and dist.is_initialized():
            os._exit(1)  # a rank alone refused (rank 0 checks the run directory): the others must not wait on it
