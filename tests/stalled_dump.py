"""``kdcache dump-logits`` whose views stop coming halfway: a test interrupts it mid-run however slow or fast it is.

The second half of the items never arrives (their view builder sleeps until
the process is signalled), so the dump writes the first half and then waits,
and the interrupting test never races a dump that already finished.
"""

import sys
import time

from kdcache.cli import main
from kdcache.dump import chunks

_build = chunks.ViewSet.__getitem__


def _stall_halfway(self, ks):
    if ks[0] >= len(self) // 2:
        while True:
            time.sleep(0.1)
    return _build(self, ks)


if __name__ == "__main__":
    chunks.ViewSet.__getitem__ = _stall_halfway
    sys.exit(main())
