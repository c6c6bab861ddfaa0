"""``kdcache train-student`` that stalls in its second evaluation: a test kills it after epoch 1, however fast it is.

Epoch 1 trains, evaluates and writes its checkpoint and metrics; epoch 2
trains and then waits in evaluation until the process is killed, so the
killing test never races a run that already finished.
"""

import sys
import time

from kdcache.cli import main
from kdcache.train import trainer as train

_evaluate = train.evaluate
_calls = {"n": 0}


def _stall_second(*args, **kwargs):
    _calls["n"] += 1
    if _calls["n"] >= 2:
        while True:
            time.sleep(0.1)
    return _evaluate(*args, **kwargs)


if __name__ == "__main__":
    train.evaluate = _stall_second
    sys.exit(main())
