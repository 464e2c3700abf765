"""A process that imports torch and lightning once, then forks a fresh child for each script run the tests ask for.

Every child is a real, separate process that runs the script as `python SCRIPT ARGS` would (runpy, `__main__`, its own
argv, environment, working directory, session and output files); it only skips the ~3.5 s of imports that each of
the suite's ~170 runs would repeat. Processes that a script starts itself (Fabric's DDP ranks) start as usual.

Protocol, one JSON line each way: {"argv", "cwd", "env", "stdout", "stderr"} in; {"pid"} when the child started,
then {"pid", "returncode"} when it ended (a negative number for a signal, as subprocess reports it).
"""

import json
import os
import runpy
import sys

# the slow imports every script shares; nothing runs on a thread yet, so forking stays safe
import lightning.fabric  # noqa: F401, E402
import torch  # noqa: F401, E402
import torchmetrics  # noqa: F401, E402
import tqdm  # noqa: F401, E402
import yaml  # noqa: F401, E402


def child(request: dict) -> None:
    os.setsid()  # a session of its own: a timeout kills the whole process group
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(file, fd)
        os.close(file)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.argv = request["argv"]
    sys.path[0] = os.path.dirname(os.path.abspath(request["argv"][0]))  # as `python SCRIPT` sets it
    runpy.run_path(request["argv"][0], run_name="__main__")  # its SystemExit or exception ends this process as usual


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
            sys.exit(0)  # the script ran to its end: exit with atexit handlers and teardown, like `python SCRIPT`
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
