"""The tasks every node agent ships (run one: ``python -m node.builtin_tasks NAME``).

Contract
--------
The broker's task runner (:mod:`node.taskrunner`) starts each task as its own
process, with its time and memory limits, and passes two JSON objects in the
environment: ``TASK_SETTINGS`` (from the node's config: the paths below; a
request can never choose a path) and ``TASK_ARGS`` (from the run request).
A task prints one JSON object on stdout and exits 0, or prints why on stderr
and exits 1.

================= ============================================================
reload-nginx      SIGHUP to the nginx master named by ``nginx_pid_file`` (nginx
                  rereads its config; workers finish their requests first).
                  Refuses when that pid is not an nginx process (a stale pid file).
rotate-logs       For each of ``logs``: ``x.log.(N-1)`` -> ``x.log.N`` ... ``x.log`` ->
                  ``x.log.1`` (``rotate_keep`` generations), then SIGUSR1 to nginx,
                  which reopens its log files (nginx's documented rotation).
disk-usage        The document root's filesystem (size, free, used fraction) and
                  what the root holds (files, bytes), walked without following links.
scan-access-log   :mod:`node.logscan` over ``access_log``: counts per kind of
                  suspicious request.  Args: ``max_lines`` (default: all).
================= ============================================================
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from node.logscan import Scanner

__all__ = ["TASKS", "main"]


class TaskError(Exception):
    pass


def _nginx_master(settings: dict[str, Any]) -> int:
    pid_file = settings.get("nginx_pid_file")
    if not pid_file:
        raise TaskError("no nginx_pid_file in the node's [broker.tasks] config")
    try:
        pid = int(Path(pid_file).read_text().strip())
    except (OSError, ValueError) as exc:
        raise TaskError(f"cannot read nginx's pid from {pid_file}: {exc}") from None
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        raise TaskError(f"nginx pid {pid} from {pid_file} is not running") from None
    if comm != "nginx":
        raise TaskError(f"pid {pid} from {pid_file} is {comm!r}, not nginx: a stale pid file")
    return pid


def reload_nginx(settings: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    pid = _nginx_master(settings)
    os.kill(pid, signal.SIGHUP)
    return {"signalled": pid, "signal": "SIGHUP"}


def rotate_logs(settings: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    keep = int(settings.get("rotate_keep", 5))
    rotated = []
    for name in settings.get("logs", []):
        log = Path(name)
        if not log.exists():
            continue
        for generation in range(keep - 1, 0, -1):
            older = log.with_name(f"{log.name}.{generation}")
            if older.exists():
                os.replace(older, log.with_name(f"{log.name}.{generation + 1}"))
        os.replace(log, log.with_name(f"{log.name}.1"))
        rotated.append(str(log))
    reopened = None
    if rotated and settings.get("nginx_pid_file"):
        reopened = _nginx_master(settings)
        os.kill(reopened, signal.SIGUSR1)  # nginx reopens its logs on USR1
    return {"rotated": rotated, "keep": keep, "nginx_reopened": reopened}


def disk_usage(settings: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    root = settings.get("document_root")
    if not root:
        raise TaskError("no document_root in the node's config")
    vfs = os.statvfs(root)
    total, free = vfs.f_blocks * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize
    files = size = 0
    for directory, _dirs, names in os.walk(root, followlinks=False):
        for name in names:
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            files += 1
            size += st.st_size
    return {"document_root": root, "filesystem": {"total": total, "free": free,
                                                  "used_fraction": round(1 - free / total, 4) if total else None},
            "files": files, "bytes": size}


def scan_access_log(settings: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    path = settings.get("access_log")
    if not path:
        raise TaskError("no access_log in the node's [broker.tasks] config")
    max_lines = args.get("max_lines")
    if max_lines is not None and (isinstance(max_lines, bool) or not isinstance(max_lines, int) or max_lines < 1):
        raise TaskError(f"max_lines {max_lines!r} is not valid; expected an integer >= 1")
    scanner = Scanner()
    try:
        with open(path, encoding="utf-8", errors="replace") as log:
            if max_lines is None:
                scanner.feed(log)
            else:
                scanner.feed(line for _, line in zip(range(max_lines), log))
    except FileNotFoundError:
        raise TaskError(f"access log {path} does not exist (is nginx's access_log on?)") from None
    return {"access_log": path, **scanner.report()}


TASKS: dict[str, Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]] = {
    "reload-nginx": reload_nginx,
    "rotate-logs": rotate_logs,
    "disk-usage": disk_usage,
    "scan-access-log": scan_access_log,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in TASKS:
        print(f"usage: python -m node.builtin_tasks {{{','.join(TASKS)}}}", file=sys.stderr)
        return 2
    try:
        settings = json.loads(os.environ.get("TASK_SETTINGS", "{}"))
        args = json.loads(os.environ.get("TASK_ARGS", "{}"))
        result = TASKS[argv[0]](settings, args)
    except (TaskError, OSError, ValueError) as exc:
        print(f"{argv[0]}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
