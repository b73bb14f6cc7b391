"""The ``illusion-probe`` command under ``torchrun`` with process 1 failing as evaluation starts (for
``test_torchrun.py``): ``FAULT=raise`` raises an error, ``kill`` kills the process, ``hang`` sleeps."""

import os
import signal
import sys
import time

from illusion_probe import cli, evaluation
from illusion_probe.errors import IllusionProbeError


def failing(*args, **kwargs):
    fault = os.environ["FAULT"]
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "hang":
        time.sleep(600)
    raise IllusionProbeError("injected failure on process 1")


if os.environ["RANK"] == "1":
    evaluation._evaluate_split = failing
sys.exit(cli.main(sys.argv[1:]))
