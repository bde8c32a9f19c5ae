import atexit
import os
import sys

from fastrsb.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # One of several processes (torchrun's, or --nproc's), its work done and its process group
    # destroyed: it ends here rather than in the interpreter's finalization, where torch's gloo
    # threads can still abort a process that has finished ("terminate called without an active
    # exception", SIGABRT; pytorch/pytorch#179291, #190489), turning a finished run's exit code
    # into 134. Seen once in CI under load, on a `doctor --nproc 2` whose report was complete.
    # The atexit handlers still run, as at any exit: without them each rank left a file in /tmp
    # for every DALI pipeline it built with conditionals (the autograph code, removed at exit).
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
