"""Runs the node's administration tasks: load sampling, persistence, processes with limits (adapter).

Contract
--------
* :class:`TaskService` wraps the pure :class:`node.tasks.Scheduler`: it
  samples the agent's load measurement (``os.getloadavg()`` and the CPU
  sampler it is given over ``/proc/stat``: the agent passes a
  ``node.agent.CpuSampler``, the same measure the heartbeat decision uses;
  an adapter never imports the program) every ``sample_interval`` seconds, asks the
  scheduler what is due, starts it, and persists every record change to
  ``tasks.json`` in the state directory (atomically), so a request id is never
  run twice, across restarts too.
* Every task is its own process in its own session (process group), so its
  time limit ends it and whatever it started: at the limit the whole group
  gets SIGKILL (state ``timed_out``); after a normal exit the group is killed
  too, so no task leaves a process behind.  stdout and stderr are merged and
  kept up to ``output_limit`` bytes; the rest is counted, not stored.
  Resource limits are set with ``setrlimit(2)`` in the child before exec:
  ``RLIMIT_AS`` (memory), ``RLIMIT_CPU`` (time limit + 1 s, a backstop if the
  wall-clock kill were late), ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, no core files.
* Built-in tasks (:mod:`node.builtin_tasks`) run as the agent's own user
  (reloading nginx needs it) with the node's settings; a request chooses only
  their ``args``.
* A signed bundle runs only after its signature verified again (it was also
  verified when it was installed), as the configured unprivileged user
  (``setgid``/``setuid`` and no supplementary groups), with the bundle's own
  limits, from ``<bundle_dir>/run/<name>/files/<entry>``, in the working
  directory ``<bundle_dir>/run/<name>/work`` (owned by that user; the files
  directory is not writable by it).  Nothing outside the bundle's directory is
  ever executed or made its working directory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from common.bundle import Bundle, BundleRefused, open_bundle

from .store import atomic_write
from .tasks import Gate, LoadSample, Priority, Scheduler, State, TaskRecord

__all__ = ["TaskSpec", "TaskSettings", "TaskRefused", "TaskService", "run_limited", "ProcessOutcome"]

log = logging.getLogger("node-agent.tasks")

_PRIORITY_RANK = {Priority.LOW: 0, Priority.NORMAL: 1, Priority.HIGH: 2}
BUILTIN_PRIORITY = {"reload-nginx": Priority.HIGH, "rotate-logs": Priority.LOW, "disk-usage": Priority.NORMAL,
                    "scan-access-log": Priority.LOW}


class CpuMeasure(Protocol):
    """The CPU busy fraction since the previous call, from the text of ``/proc/stat`` (``node.agent.CpuSampler``)."""

    def sample(self, proc_stat: str) -> float: ...


class TaskRefused(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "builtin" or "bundle"
    priority: Priority  # the default; for a bundle also the highest allowed (it is signed)
    time_limit: float
    memory_limit: int  # bytes


@dataclass(frozen=True)
class ProcessOutcome:
    state: State
    exit_status: int | None
    output: str
    truncated: int
    error: str = ""


def _limits(memory: int, cpu_seconds: int, file_size: int, files: int) -> Callable[[], None]:
    # Runs in the child between fork and exec, after setuid (lowering limits is always allowed). The agent
    # has threads, so this does nothing but setrlimit(2) calls: no imports, no locks, no logging.
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


async def _collect(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, int]:
    kept = bytearray()
    dropped = 0
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return bytes(kept), dropped
        room = max(0, limit - len(kept))
        kept += chunk[:room]
        dropped += len(chunk) - min(room, len(chunk))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def run_limited(argv: list[str], env: dict[str, str], cwd: str, time_limit: float, memory_limit: int,
                      output_limit: int, user: int | None = None, group: int | None = None,
                      file_size_limit: int = 64 << 20) -> ProcessOutcome:
    """Run ``argv`` with the limits; never raises for what the child does."""
    kwargs: dict[str, Any] = {}
    if user is not None:
        kwargs.update(user=user, group=group, extra_groups=[])
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            cwd=cwd, env=env, start_new_session=True, close_fds=True,
            preexec_fn=_limits(memory_limit, int(time_limit) + 1, file_size_limit, 256), **kwargs)
    except (OSError, subprocess.SubprocessError) as exc:
        return ProcessOutcome(State.FAILED, None, "", 0, f"cannot start {argv[0]}: {exc}")
    reader = asyncio.ensure_future(_collect(process.stdout, output_limit))
    state, error = None, ""
    try:
        await asyncio.wait_for(process.wait(), time_limit)
    except asyncio.TimeoutError:
        _kill_group(process.pid)
        await process.wait()
        state, error = State.TIMED_OUT, f"killed at its time limit of {time_limit:g} s"
    except asyncio.CancelledError:
        _kill_group(process.pid)
        await process.wait()
        raise
    # Whatever it left running in its group. The group id cannot be reused while a member lives; once none
    # does, this is a no-op (unless the pid space wrapped around in between).
    _kill_group(process.pid)
    try:
        output, dropped = await asyncio.wait_for(reader, 2.0)
    except asyncio.TimeoutError:  # a descendant that left the group still holds the pipe
        reader.cancel()
        output, dropped = b"", 0
        error = error or "output pipe held open by a process that left the task's group"
    status = process.returncode
    if state is None:
        state = State.DONE if status == 0 else State.FAILED
        if status is not None and status < 0:
            try:
                error = f"killed by signal {signal.Signals(-status).name}"
            except ValueError:
                error = f"killed by signal {-status}"
    return ProcessOutcome(state, status, output.decode("utf-8", "replace"), dropped, error)


@dataclass(frozen=True)
class TaskSettings:
    allow: tuple[str, ...]
    user: int  # bundles run as this uid/gid
    group: int
    output_limit: int
    time_limit: float  # built-in tasks
    memory_limit: int  # bytes, built-in tasks
    builtin_settings: dict[str, Any]  # paths for node.builtin_tasks
    bundles_enabled: bool
    trusted_keys: tuple[bytes, ...]
    sample_interval: float = 1.0


class TaskService:
    def __init__(self, settings: TaskSettings, gate: Gate, state_dir: Path, bundle_root: Path, run_root: Path,
                 cpu: CpuMeasure, keep_results: int = 1000, clock=time.monotonic, wall=time.time):
        self.settings = settings
        self.cpu = cpu
        self.scheduler = Scheduler(gate, keep_results)
        self.state_file = Path(state_dir) / "tasks.json"
        self.bundle_root = Path(bundle_root)
        self.run_root = Path(run_root)
        self._clock, self._wall = clock, wall
        self._running: dict[str, asyncio.Task] = {}
        self._sampler_task: asyncio.Task | None = None
        self._save_lock = asyncio.Lock()
        self.refused: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------
    def load(self) -> None:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return
        records = [TaskRecord.from_dict(r) for r in data.get("records", [])]
        for record in self.scheduler.restore(records, data.get("forgotten", []), self._wall()):
            log.warning("task %s (%s) was running when the agent stopped: marked interrupted, not run again",
                        record.id, record.name)

    async def start(self) -> None:
        cpu = self.cpu
        cpu.sample(Path("/proc/stat").read_text())  # the first sample sets the baseline
        await self._save()

        async def sample_loop() -> None:
            while True:
                await asyncio.sleep(self.settings.sample_interval)
                sample = LoadSample(os.getloadavg()[0], cpu.sample(Path("/proc/stat").read_text()))
                self.scheduler.observe(self._clock(), sample)
                await self.schedule()

        self._sampler_task = asyncio.ensure_future(sample_loop())

    async def stop(self) -> None:
        if self._sampler_task is not None:
            self._sampler_task.cancel()
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)
        if self._sampler_task is not None:
            await asyncio.gather(self._sampler_task, return_exceptions=True)
        await self._save()

    async def _save(self) -> None:
        async with self._save_lock:  # the snapshot is taken inside: the last write is the newest state
            records = [r.to_dict() for r in self.scheduler.records.values()]
            data = json.dumps({"records": records, "forgotten": sorted(self.scheduler.forgotten)}).encode()
            await asyncio.get_running_loop().run_in_executor(None, atomic_write, self.state_file, data)

    # -- requests ----------------------------------------------------------------
    def _bundle(self, name: str) -> Bundle:
        path = self.bundle_root / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TaskRefused("unknown_task", f"task {name!r} is neither an allowed built-in "
                              f"({', '.join(self.settings.allow) or 'none'}) nor an installed bundle") from None
        try:
            return open_bundle(data, self.settings.trusted_keys)
        except BundleRefused as exc:
            raise TaskRefused(exc.reason, f"bundle {name!r}: {exc}") from None

    def resolve(self, name: str) -> TaskSpec:
        """What ``name`` is on this node; raises TaskRefused (blocking: reads a bundle)."""
        if name in self.settings.allow:
            return TaskSpec(name, "builtin", BUILTIN_PRIORITY.get(name, Priority.NORMAL), self.settings.time_limit,
                            self.settings.memory_limit)
        if not self.settings.bundles_enabled or "/" in name or name.startswith("."):
            raise TaskRefused("unknown_task", f"task {name!r} is not allowed on this node "
                              f"(allowed: {', '.join(self.settings.allow) or 'none'})")
        manifest = self._bundle(name).manifest
        return TaskSpec(name, "bundle", Priority(manifest.priority), manifest.time_limit, manifest.memory_limit << 20)

    async def submit(self, request_id: str, name: str, priority: str | None, args: dict[str, Any], sender: str,
                     not_after: float | None = None) -> tuple[TaskRecord, bool]:
        known = self.scheduler.records.get(request_id)
        if known is not None:
            return known, False
        spec = await asyncio.get_running_loop().run_in_executor(None, self.resolve, name)
        chosen = spec.priority if priority is None else Priority(priority)
        if spec.kind == "bundle" and _PRIORITY_RANK[chosen] > _PRIORITY_RANK[spec.priority]:
            raise TaskRefused("priority", f"bundle {name!r} is signed for priority {spec.priority.value} at most; "
                                          f"{chosen.value} was asked")
        record, new = self.scheduler.submit(request_id, name, chosen, args, sender, self._wall(), not_after)
        if new:
            log.info("task %s: %s (%s) queued for %s", request_id, name, chosen.value, sender)
            await self._save()
            await self.schedule()
        return record, new

    async def schedule(self) -> None:
        start, expired = self.scheduler.due(self._clock(), self._wall())
        for record in expired:
            log.info("task %s (%s) expired before it could start", record.id, record.name)
        for record in start:
            self.scheduler.started(record, self._wall())
            log.info("task %s: %s (%s) starting", record.id, record.name, record.priority.value)
            self._running[record.id] = asyncio.ensure_future(self._run(record))
        if start or expired:
            await self._save()

    async def _run(self, record: TaskRecord) -> None:
        try:
            outcome = await self._execute(record)
        except asyncio.CancelledError:
            outcome = ProcessOutcome(State.INTERRUPTED, None, "", 0, "the agent stopped while the task ran")
            self.scheduler.finished(record, self._wall(), outcome.state, None, "", 0, outcome.error)
            self._running.pop(record.id, None)
            raise
        except Exception as exc:  # a bug or an I/O error preparing the task: the record says so
            log.exception("task %s (%s) could not run", record.id, record.name)
            outcome = ProcessOutcome(State.FAILED, None, "", 0, f"{type(exc).__name__}: {exc}")
        self.scheduler.finished(record, self._wall(), outcome.state, outcome.exit_status, outcome.output,
                                outcome.truncated, outcome.error)
        self._running.pop(record.id, None)
        log.info("task %s: %s finished %s (exit %s) in %.2f s", record.id, record.name, outcome.state.value,
                 outcome.exit_status, record.duration or 0.0)
        await self._save()
        await self.schedule()

    async def _execute(self, record: TaskRecord) -> ProcessOutcome:
        loop = asyncio.get_running_loop()
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "TASK_NAME": record.name,
               "TASK_REQUEST_ID": record.id, "TASK_ARGS": json.dumps(record.args)}
        if record.name in self.settings.allow:
            env["TASK_SETTINGS"] = json.dumps(self.settings.builtin_settings)
            env["HOME"] = str(self.run_root)
            pythonpath = os.environ.get("PYTHONPATH")
            if pythonpath:
                env["PYTHONPATH"] = pythonpath
            self.run_root.mkdir(parents=True, exist_ok=True)
            return await run_limited([sys.executable, "-m", "node.builtin_tasks", record.name], env, str(self.run_root),
                                     self.settings.time_limit, self.settings.memory_limit, self.settings.output_limit)
        try:
            bundle = await loop.run_in_executor(None, self._bundle, record.name)
            entry, work = await loop.run_in_executor(None, self._unpack, bundle)
        except TaskRefused as exc:
            return ProcessOutcome(State.FAILED, None, "", 0, str(exc))
        env.update(HOME=str(work), BUNDLE_DIR=str(entry.parent))
        manifest = bundle.manifest
        return await run_limited([str(entry)], env, str(work), manifest.time_limit, manifest.memory_limit << 20,
                                 self.settings.output_limit, self.settings.user, self.settings.group)

    def unreachable(self) -> str | None:
        """Why the task user cannot reach the bundles' run directory (a parent it cannot search), or None."""
        uid, gid = self.settings.user, self.settings.group
        for directory in [self.run_root, *self.run_root.parents]:
            try:
                st = directory.stat()
            except FileNotFoundError:
                continue
            if not (st.st_mode & stat.S_IXOTH or (st.st_uid == uid and st.st_mode & stat.S_IXUSR)
                    or (st.st_gid == gid and st.st_mode & stat.S_IXGRP)):
                return (f"uid {uid} cannot search {directory} (mode {stat.S_IMODE(st.st_mode):o}): "
                        f"bundles under it cannot run; make the bundle directory's parents searchable")
        return None

    def _unpack(self, bundle: Bundle) -> tuple[Path, Path]:
        """Write the verified files to run/<name>/files (root-owned, read-only to the task) and make its work dir."""
        self.run_root.mkdir(parents=True, exist_ok=True)
        problem = self.unreachable()
        if problem:
            raise TaskRefused("bad_bundle", problem)
        name = bundle.manifest.name
        home = self.run_root / name
        files = home / "files"
        work = home / "work"
        home.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o755)
        stamp = files / ".bundle"
        wanted = f"{bundle.key} {bundle.manifest.version} " + " ".join(
            f"{n}:{m['sha256']}" for n, m in sorted(bundle.manifest.files.items()))
        if not (stamp.exists() and stamp.read_text() == wanted):
            shutil.rmtree(files, ignore_errors=True)
            files.mkdir(mode=0o755)
            for file_name, content in bundle.files.items():
                executable = bundle.manifest.files[file_name]["executable"]
                fd = os.open(files / file_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755 if executable else 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(content)
            stamp.write_text(wanted)
        if work.is_symlink() or (work.exists() and not work.is_dir()):
            raise TaskRefused("bad_bundle", f"{work} is not a directory")
        work.mkdir(mode=0o700, exist_ok=True)
        os.chown(work, self.settings.user, self.settings.group, follow_symlinks=False)
        return files / bundle.manifest.entry, work

    # -- views ---------------------------------------------------------------------
    def get(self, request_id: str) -> TaskRecord | None:
        return self.scheduler.records.get(request_id)

    def recent(self, limit: int = 100) -> list[TaskRecord]:
        return list(self.scheduler.records.values())[-limit:]

    def stats(self) -> dict[str, Any]:
        sample = self.scheduler.sample
        idle_since = self.scheduler.idle_since
        return {
            "states": self.scheduler.counts(),
            "load": None if sample is None else {"load1": sample.load1, "cpu": sample.cpu},
            "idle_for": 0.0 if idle_since is None else self._clock() - idle_since,
        }
