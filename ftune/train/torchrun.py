"""torchrun for `ftune train`'s own relaunch: the same launcher (torch.distributed.run), without
its traceback when a process fails.

Each process reports its error as ftune's panel text in the run's error folder
(distributed.ERROR_DIR); the command that launched them prints the first one, once. torchrun's
ChildFailedError traceback and its failure table would only repeat that panel as launcher noise,
so here the failure becomes the exit code of the failed process. `--print-launch` still prints
plain torchrun, for SLURM scripts.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent logs each failed worker and the SIGTERMs it sends the others as warnings/errors:
    # the failed process's own panel says what happened.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
