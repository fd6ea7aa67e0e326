"""Drives the compose testbed (docker-compose.yml) on Docker Compose v2 or on podman-compose.

Contract
--------
* :func:`build_wheels` puts the wheels the image installs into
  ``.compose/wheels/`` (``deps/``: the project's dependencies, cached between
  runs under ``DISTRIBUTOR_COMPOSE_CACHE``, default
  ``/var/cache/distributor-compose``, keyed by pyproject.toml and the Python
  version; ``project/``: the project itself, rebuilt every time from a copy of
  the source).  The host's Python must be the image's (3.11, Debian 12's),
  because some wheels are compiled.
* :func:`ensure_base_image` (podman) makes the image the Dockerfile starts
  from when there is no registry: ``debootstrap --variant=minbase bookworm``
  from the mirror apt uses, with every package of
  ``testbed/image/debian-packages.txt`` included, imported as
  ``localhost/distributor-base:bookworm-<key>``; the key hashes that list, so
  the image is made again only when it changes (older keys are removed).
  The ``monitor`` profile's image starts from a second base made the same way
  from ``testbed/image/monitor-packages.txt`` (Debian's prometheus and
  prometheus-alertmanager), ``localhost/distributor-monitor-base:bookworm-<key>``,
  made only when a cluster with that profile is built.
* :class:`ComposeCluster` is one compose project (``-p NAME``), with the
  compose profiles it runs (``profiles=("monitor",)``: the monitor service and
  its image too): ``build``, ``up`` (returns when every service is healthy and
  the VIP answers from the client), ``down`` (containers, networks and the key
  volume of that project only, of every profile), ``exec``/``popen``/``kill``/
  ``logs`` on a service, the distributors' metrics and roles, and the monitor's
  Prometheus API (``prometheus``).  Podman is given
  ``testbed/image/containers.conf`` through ``CONTAINERS_CONF`` unless the
  caller set one.
* ``python -m testbed.compose_cluster [-p NAME] [--engine E] VERB`` offers the
  same verbs on the command line (see ``--help``).

Podman facts this relies on (podman 4.3 on Debian 12, measured): healthchecks
run only when something runs them (podman schedules them with systemd timers,
and there may be no systemd), so ``up`` runs them itself with ``podman
healthcheck run``; podman-compose before podman 4.6 ignores ``depends_on``
conditions (the entrypoint waits instead, see ``testbed.container``);
podman-compose ignores ``build.network``, and a build on podman's default
network would put a NAT bridge on the host, so the image is built here with
``podman build --network=none`` (the base already has every package).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .compose import (BASE_IMAGE_VARIABLE, IMAGE, LAN_PORTS, MODE_VARIABLE, MONITOR_BASE_VARIABLE, MONITOR_DOCKERFILE,
                      MONITOR_IMAGE, MONITOR_PORTS, MONITOR_PROFILE, PROFILES, start_order)
from .runner import TestbedError, wait_until
from .topology import Topology, build

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PACKAGES_FILE = ROOT / "testbed" / "image" / "debian-packages.txt"
MONITOR_PACKAGES_FILE = ROOT / "testbed" / "image" / "monitor-packages.txt"
CONTAINERS_CONF = ROOT / "testbed" / "image" / "containers.conf"
WHEELS = ROOT / ".compose" / "wheels"
CACHE = Path(os.environ.get("DISTRIBUTOR_COMPOSE_CACHE", "/var/cache/distributor-compose"))
BASE_REPOSITORY = "localhost/distributor-base"
MONITOR_BASE_REPOSITORY = "localhost/distributor-monitor-base"
CNI_IPAM_STATE = Path("/var/lib/cni/networks")
SUITE = "bookworm"
IMAGE_PYTHON = (3, 11)  # Debian 12's python3, which runs the wheels in the image


@dataclass(frozen=True)
class Flavour:
    """An image the compose file builds, and the local base (podman) it starts from."""
    image: str
    dockerfile: Path
    packages_file: Path
    base_repository: str
    base_variable: str  # the compose file's build argument for the base


RUNTIME = Flavour(IMAGE, ROOT / "Dockerfile", PACKAGES_FILE, BASE_REPOSITORY, BASE_IMAGE_VARIABLE)
MONITOR = Flavour(MONITOR_IMAGE, ROOT / MONITOR_DOCKERFILE, MONITOR_PACKAGES_FILE, MONITOR_BASE_REPOSITORY,
                  MONITOR_BASE_VARIABLE)
FLAVOURS = {"runtime": RUNTIME, MONITOR_PROFILE: MONITOR}  # by profile, "runtime" for the image of every run


def _source_parts() -> tuple[str, ...]:
    """What the project's wheel is built from: the packages pyproject.toml includes, and its metadata files."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    return ("pyproject.toml", "README.md", *(pattern.rstrip("*") for pattern in find["include"]))


SOURCE_PARTS = _source_parts()
ENGINES = ("docker", "podman")
MODES = ("rewrite", "kernel")
DEFAULT_PROJECT = "distributor-testbed"
_PROJECT_RE = re.compile(r"^[a-z][a-z0-9]{0,19}$|^distributor-testbed$")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class ComposeError(TestbedError):
    """A compose step failed; the message says which command and what it printed."""


def _run(argv: list[str], env: dict[str, str] | None = None, check: bool = True, timeout: float | None = 600,
         **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT, **kwargs)
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise ComposeError(f"{' '.join(argv)} failed ({result.returncode}):\n{output[-3000:]}")
    return result


# -- wheels ------------------------------------------------------------------------

def wheels_key(pyproject: bytes, python: tuple[int, ...], machine: str) -> str:
    """The cache key of the dependency wheels: what decides which wheels pip builds."""
    digest = hashlib.sha256(pyproject + f"|python {python[0]}.{python[1]}|{machine}".encode())
    return digest.hexdigest()[:16]


def build_wheels(log=_say) -> Path:
    """Fill .compose/wheels/{deps,project}; returns the wheels directory."""
    if sys.version_info[:2] != IMAGE_PYTHON:
        raise ComposeError(f"the wheels are built by this Python, {sys.version_info[0]}.{sys.version_info[1]}, "
                           f"but the image runs {IMAGE_PYTHON[0]}.{IMAGE_PYTHON[1]} (Debian 12): use Debian 12's python3")
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    key = wheels_key(pyproject, sys.version_info[:2], os.uname().machine)
    cached = CACHE / "wheels" / key
    if not (cached / "COMPLETE").exists():
        log(f"building the dependency wheels into {cached} (key {key})")
        project = tomllib.loads(pyproject.decode())
        requirements = project["project"]["dependencies"]
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=cached.parent))
        try:
            _run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(partial), *requirements])
            # The build backend too, so the project's own wheel builds without an index on warm runs
            # (`wheel` for setuptools releases that lack bdist_wheel).
            _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--dest", str(partial / "backend"),
                  *project["build-system"]["requires"], "wheel"])
            (partial / "COMPLETE").write_text(f"wheels of {' '.join(requirements)}\n")
            shutil.rmtree(cached, ignore_errors=True)
            partial.rename(cached)  # atomic: a half-built cache is never seen as complete
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    deps = WHEELS / "deps"
    shutil.rmtree(WHEELS, ignore_errors=True)
    deps.mkdir(parents=True)
    for wheel in cached.glob("*.whl"):
        shutil.copy2(wheel, deps)
    # The project from a copy of its source: setuptools leaves build/ in the tree it builds in,
    # and stale files there would slip into later wheels.
    with tempfile.TemporaryDirectory(prefix="distributor-src-") as tmp:
        for part in SOURCE_PARTS:
            source = ROOT / part
            if source.is_dir():
                shutil.copytree(source, Path(tmp) / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, Path(tmp) / part)
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--find-links", str(cached / "backend"),
              "--wheel-dir", str(WHEELS / "project"), tmp])
    return WHEELS


# -- the base image (podman, no registry) --------------------------------------------

def image_packages(text: str | None = None, path: Path = PACKAGES_FILE) -> list[str]:
    text = path.read_text() if text is None else text
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def base_image_name(packages: list[str] | None = None, flavour: Flavour = RUNTIME) -> str:
    """``REPOSITORY:bookworm-<key>``; the key hashes the package list, so a changed list makes a new base."""
    packages = image_packages(path=flavour.packages_file) if packages is None else packages
    digest = hashlib.sha256(f"{SUITE} minbase {' '.join(sorted(packages))}".encode()).hexdigest()[:12]
    return f"{flavour.base_repository}:{SUITE}-{digest}"


def apt_mirror(sources: list[Path] | None = None) -> str:
    """The Debian mirror apt uses for the main archive (deb822 or one-line sources)."""
    if sources is None:
        sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split() and "security" not in uris.group(1):
                return uris.group(1)
        for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if match.group(2) == SUITE:
                return match.group(1)
    return "http://deb.debian.org/debian"


def ensure_base_image(env: dict[str, str], log=_say, flavour: Flavour = RUNTIME) -> str:
    """The local base image of ``flavour``, made with debootstrap when it is missing; returns its name."""
    name = base_image_name(flavour=flavour)
    if _run(["podman", "image", "exists", name], env=env, check=False).returncode == 0:
        return name
    mirror = apt_mirror()
    packages = image_packages(path=flavour.packages_file)
    log(f"making the base image {name} with debootstrap from {mirror}")
    with tempfile.TemporaryDirectory(prefix="distributor-base-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(rootfs), mirror],
             timeout=1200)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            _run(["podman", "import", "--message", f"debootstrap {SUITE} minbase + {flavour.packages_file.name}", "-",
                  name], env=env, stdin=tar.stdout)
        finally:
            tar.stdout.close()
            tar.wait()
    listing = _run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", flavour.base_repository], env=env)
    for line in listing.stdout.split():
        if line != name:
            _run(["podman", "rmi", line], env=env, check=False)  # an older key: still used by an image? then it stays
    return name


# -- engines -------------------------------------------------------------------------

def engine_environment(engine: str, mode: str = "rewrite", base: str | None = None,
                       bases: dict[str, str] | None = None) -> dict[str, str]:
    """The engine's environment: the mode, and on podman its config and the local bases ({build argument
    variable: image}; ``base`` is the runtime image's)."""
    env = dict(os.environ)
    env[MODE_VARIABLE] = mode
    if engine == "podman":
        env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
        if base:
            env[BASE_IMAGE_VARIABLE] = base
        env.update(bases or {})
    return env


def _works(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def podman_compose() -> str | None:
    beside = Path(sys.executable).parent / "podman-compose"
    return str(beside) if beside.exists() else shutil.which("podman-compose")


def docker_compose() -> list[str] | None:
    """Docker Compose v2: the docker CLI plugin, or its standalone binary (`docker-compose` v2)."""
    if _works(["docker", "compose", "version"]):
        return ["docker", "compose"]
    try:
        version = subprocess.run(["docker-compose", "version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return ["docker-compose"] if re.search(r"version v?2\.", version) else None


def detect_engine(wanted: str = "auto") -> str:
    """``docker`` when Docker Compose v2 reaches an engine, else ``podman`` when podman-compose is there."""
    if wanted in ("auto", "docker") and docker_compose() and _works(["docker", "info"]):
        return "docker"
    if wanted in ("auto", "podman") and shutil.which("podman") and podman_compose():
        return "podman"
    if wanted == "docker":
        raise ComposeError("Docker Compose v2 cannot reach a Docker engine here (`docker compose version`, `docker info`)")
    raise ComposeError("no compose engine: install Docker Compose v2, or run scripts/install-compose.sh for podman")


@dataclass
class ComposeCluster:
    project: str = DEFAULT_PROJECT
    engine: str = "podman"
    mode: str = "rewrite"
    nodes: int = 3
    profiles: tuple[str, ...] = ()  # compose profiles to run too: "monitor"
    topology: Topology = field(init=False)
    _containers: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not _PROJECT_RE.match(self.project):
            raise ComposeError(f"project name {self.project!r} is not valid: use 1-20 lower-case letters and digits, "
                               "starting with a letter")
        if self.engine not in ENGINES:
            raise ComposeError(f"engine {self.engine!r} is not valid; expected one of {', '.join(ENGINES)}")
        if self.mode not in MODES:
            raise ComposeError(f"mode {self.mode!r} is not valid; expected one of {', '.join(MODES)}")
        self.profiles = tuple(dict.fromkeys(self.profiles))
        for profile in self.profiles:
            if profile not in PROFILES:
                raise ComposeError(f"profile {profile!r} is not valid; expected one of {', '.join(PROFILES)}")
        self.topology = build(self.nodes, monitor=MONITOR_PROFILE in self.profiles)
        self.flavours = [RUNTIME, *(FLAVOURS[profile] for profile in self.profiles)]
        self.base = base_image_name() if self.engine == "podman" else None
        bases = {f.base_variable: base_image_name(flavour=f) for f in self.flavours[1:]}
        self.env = engine_environment(self.engine, self.mode, self.base, bases if self.engine == "podman" else None)

    @property
    def vip(self) -> str:
        return str(self.topology.vip)

    # -- commands --------------------------------------------------------------------
    def compose_argv(self, *args: str, profiles: tuple[str, ...] | None = None) -> list[str]:
        """The compose command for this project, with this cluster's profiles (or ``profiles``)."""
        chosen = [f"--profile={profile}" for profile in (self.profiles if profiles is None else profiles)]
        if self.engine == "docker":
            command = docker_compose() or ["docker", "compose"]
        else:
            command = [podman_compose() or "podman-compose"]
        return [*command, *chosen, "-p", self.project, "-f", str(COMPOSE_FILE), *args]

    def compose(self, *args: str, check: bool = True, timeout: float | None = 600,
                profiles: tuple[str, ...] | None = None) -> subprocess.CompletedProcess:
        return _run(self.compose_argv(*args, profiles=profiles), env=self.env, check=check, timeout=timeout)

    def cli(self, *args: str, check: bool = True, timeout: float | None = 120, **kwargs) -> subprocess.CompletedProcess:
        return _run([self.engine, *args], env=self.env, check=check, timeout=timeout, **kwargs)

    # -- lifecycle -------------------------------------------------------------------
    def build(self, log=_say) -> None:
        """The wheels, then the images: the runtime one and those of this cluster's profiles (podman: offline,
        each from its local base)."""
        build_wheels(log)
        previous = {f.image: self._image_id(f.image) for f in self.flavours}
        if self.engine == "podman":
            for flavour in self.flavours:
                base = ensure_base_image(self.env, log, flavour)
                self.cli("build", "--network=none", "--build-arg", f"BASE_IMAGE={base}", "-t", flavour.image, "-f",
                         str(flavour.dockerfile), str(ROOT), timeout=1200)
        else:
            self.compose("build", timeout=1800)
        for image, before in previous.items():
            if before and before != self._image_id(image):
                # The image this build replaced; its layers stay cached under the new one.
                self.cli("rmi", before, check=False)

    def _image_id(self, image: str) -> str:
        return self.cli("image", "inspect", "-f", "{{.Id}}", image, check=False).stdout.strip()

    def up(self, timeout: float = 180.0) -> None:
        """Start the project (removing what an earlier run of it left) and wait until the VIP answers."""
        self.down()
        try:
            self.compose("up", "-d", "--no-build", timeout=timeout)
            deadline = time.monotonic() + timeout
            for service in self._health_order():
                wait_until(lambda: self.healthy(service), max(1.0, deadline - time.monotonic()), f"{service} to be healthy",
                           interval=0.5)
        except BaseException as exc:
            logs = "\n".join(f"--- {h.name} ---\n{self.logs(h.name, 15)}" for h in self.topology.by_role("distributor"))
            self.down()
            if isinstance(exc, TestbedError):
                raise ComposeError(f"{exc}\n{logs}") from None
            raise

    def _health_order(self) -> list[str]:
        order, done = [], set()
        dependencies = start_order(self.topology)

        def visit(name: str) -> None:
            if name not in done:
                done.add(name)
                for other in dependencies[name]:
                    visit(other)
                order.append(name)

        for host in self.topology.hosts:
            visit(host.name)
        return order

    def down(self) -> None:
        """Remove the project's containers (of every profile, whichever this cluster runs), networks and key
        volume; nothing of any other project."""
        if self.engine == "podman" or self.containers():
            self.compose("down", "-v", "-t", "3", check=False, timeout=300, profiles=PROFILES)
        for name in self.containers().values():
            self.cli("rm", "-f", "-t", "0", name, check=False)
        for kind in ("network", "volume"):
            listing = self.cli(kind, "ls", "-q", "--filter", f"label=com.docker.compose.project={self.project}", check=False)
            for name in listing.stdout.split():
                self.cli(kind, "rm", "-f", name, check=False)
        if self.engine == "podman":
            # CNI's host-local IPAM keeps a directory per network after the network is gone.
            for bridge in self.topology.bridges:
                state = CNI_IPAM_STATE / f"{self.project}_{bridge}"
                if state.is_dir() and all(p.name == "lock" or p.name.startswith("last_reserved_ip") for p in state.iterdir()):
                    shutil.rmtree(state, ignore_errors=True)
        self._containers = {}

    # -- services --------------------------------------------------------------------
    def containers(self) -> dict[str, str]:
        """{service: container name} of this project, running or not."""
        listing = self.cli("ps", "-a", "--filter", f"label=com.docker.compose.project={self.project}",
                           "--format", "{{.Names}} {{.Labels}}", check=False)
        found = {}
        for line in listing.stdout.splitlines():
            name, _, labels = line.partition(" ")
            match = re.search(r"com\.docker\.compose\.service[:=](\w+)", labels)
            if match:
                found[match.group(1)] = name
        return found

    def container(self, service: str) -> str:
        if service not in PROFILES:
            self.topology.host(service)  # raises for an unknown service
        if service not in self._containers:
            self._containers = self.containers()
        try:
            return self._containers[service]
        except KeyError:
            raise ComposeError(f"project {self.project} has no container for {service}; is it up?") from None

    def healthy(self, service: str) -> bool:
        name = self.container(service)
        if self.engine == "podman":
            # Runs the service's compose healthcheck now (podman has no scheduler without systemd).
            return self.cli("healthcheck", "run", name, check=False, timeout=30).returncode == 0
        status = self.cli("inspect", "-f", "{{.State.Health.Status}}", name, check=False).stdout.strip()
        return status == "healthy"

    def exec_argv(self, service: str, argv: list[str], interactive: bool = False) -> list[str]:
        return [self.engine, "exec", *(["-i"] if interactive else []), self.container(service), *argv]

    def exec(self, service: str, argv: list[str], check: bool = True, timeout: float | None = 120,
             **kwargs) -> subprocess.CompletedProcess:
        return _run(self.exec_argv(service, argv, "input" in kwargs), env=self.env, check=check, timeout=timeout, **kwargs)

    def popen(self, service: str, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.exec_argv(service, argv), env=self.env, **kwargs)

    def kill(self, service: str) -> None:
        """SIGKILL the service's container (its network namespace goes with it)."""
        self.cli("kill", "-s", "KILL", self.container(service))

    def logs(self, service: str, lines: int = 30) -> str:
        try:
            result = self.cli("logs", "--tail", str(lines), self.container(service), check=False)
        except ComposeError as exc:
            return str(exc)
        return (result.stdout + result.stderr).strip()

    def metrics(self, service: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """A distributor's Prometheus samples, read from inside its container on its LAN address."""
        from prometheus_client.parser import text_string_to_metric_families

        address = self.topology.host(service).address_on("int")
        body = self.exec(service, ["curl", "-sS", "-m", "2", f"http://{address}:{LAN_PORTS['metrics']}/metrics"]).stdout
        samples = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def role(self, service: str) -> str | None:
        for (name, labels), value in self.metrics(service).items():
            if name == "distributor_failover_role" and value == 1:
                return dict(labels)["role"]
        return None

    def running(self, service: str) -> bool:
        state = self.cli("inspect", "-f", "{{.State.Running}}", self.container(service), check=False).stdout.strip()
        return state == "true"

    def wait_settled(self, timeout: float = 30.0) -> tuple[str, str]:
        """Wait for one active distributor and one caught-up backup; returns (active, backup)."""
        dists = [h.name for h in self.topology.by_role("distributor")]

        def check() -> tuple[str, str] | None:
            roles = {h: self.role(h) for h in dists}
            if sorted(map(str, roles.values())) != ["active", "backup"]:
                return None
            active = next(h for h, r in roles.items() if r == "active")
            backup = next(h for h, r in roles.items() if r == "backup")
            return (active, backup) if self.metrics(backup)[("distributor_sync_caught_up", ())] == 1 else None

        return wait_until(check, timeout, "one active distributor and one caught-up backup", interval=0.3)  # type: ignore[return-value]

    def prometheus(self, path: str, **params: str):
        """``GET /api/v1/PATH`` of the monitor's Prometheus, from inside its container; returns the answer's data."""
        argv = ["curl", "-sS", "-m", "10", "--get", f"http://127.0.0.1:{MONITOR_PORTS['prometheus']}/api/v1/{path}"]
        for key, value in params.items():
            argv += ["--data-urlencode", f"{key}={value}"]
        body = self.exec(MONITOR_PROFILE, argv, check=False)
        try:
            answer = json.loads(body.stdout)
        except json.JSONDecodeError:
            output = (body.stdout + body.stderr).strip()[-500:]
            raise ComposeError(f"Prometheus did not answer /api/v1/{path}: {output}") from None
        if answer.get("status") != "success":
            raise ComposeError(f"Prometheus answered /api/v1/{path} {params}: {answer.get('error', answer)}")
        return answer["data"]

    def owns_vip(self, service: str) -> bool:
        out = self.exec(service, ["ip", "-4", "-o", "addr", "show", "dev", "ext0"], check=False).stdout
        return f"{self.vip}/32" in out


def main(argv: list[str] | None = None) -> int:
    # --profile before or after the verb (`--profile monitor up` or `up --profile monitor`).
    profile = argparse.ArgumentParser(add_help=False)
    profile.add_argument("--profile", action="append", choices=PROFILES, default=argparse.SUPPRESS,
                         help="run this compose profile too (monitor: Prometheus and Alertmanager, their own image)")
    parser = argparse.ArgumentParser(prog="python -m testbed.compose_cluster", description=__doc__.split("\n\n")[0],
                                     parents=[profile])
    parser.add_argument("-p", "--project", default=DEFAULT_PROJECT)
    parser.add_argument("--engine", choices=("auto", *ENGINES), default="auto")
    parser.add_argument("--mode", choices=MODES, default=os.environ.get(MODE_VARIABLE, "rewrite"))
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("wheels", help="build the wheels the image installs (.compose/wheels)")
    base = verbs.add_parser("base", help="podman: make a local base image with debootstrap if it is missing")
    base.add_argument("flavour", nargs="?", choices=tuple(FLAVOURS), default="runtime",
                      help="the runtime image's base (default) or the monitor profile's")
    verbs.add_parser("build", parents=[profile], help="wheels, then the image (and the profiles' images)")
    up = verbs.add_parser("up", parents=[profile],
                          help="build, start, wait until every service is healthy and the VIP answers")
    up.add_argument("--no-build", action="store_true", help="use the image as it is")
    verbs.add_parser("down", parents=[profile],
                     help="remove the project's containers (of every profile), networks and key volume")
    verbs.add_parser("ps", parents=[profile], help="the project's containers")
    for verb in ("kill", "logs"):
        verbs.add_parser(verb, parents=[profile]).add_argument("service")
    run = verbs.add_parser("exec", parents=[profile], help="run a command in a service: exec SERVICE -- CMD...")
    run.add_argument("service")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    profiles = tuple(getattr(args, "profile", ()))
    try:
        if args.verb == "wheels":
            print(build_wheels())
            return 0
        engine = detect_engine(args.engine)
        if args.verb == "base":
            print(ensure_base_image(engine_environment("podman"), flavour=FLAVOURS[args.flavour]))
            return 0
        cluster = ComposeCluster(args.project, engine, args.mode, profiles=profiles)
        if args.verb == "build" or (args.verb == "up" and not args.no_build):
            started = time.monotonic()
            cluster.build()
            _say(f"built {', '.join(f.image for f in cluster.flavours)} in {time.monotonic() - started:.1f} s")
        if args.verb == "up":
            started = time.monotonic()
            cluster.up()
            print(f"{args.project} is up on {engine} ({args.mode} mode) after {time.monotonic() - started:.1f} s; "
                  f"the VIP {cluster.vip} answers from the client")
            for service, name in sorted(cluster.containers().items()):
                print(f"  {service:8} {name}")
            if MONITOR_PROFILE in profiles:
                address = cluster.topology.host(MONITOR_PROFILE).address_on("int")
                print(f"  Prometheus http://{address}:{MONITOR_PORTS['prometheus']}, Alertmanager "
                      f"http://{address}:{MONITOR_PORTS['alertmanager']} (cluster LAN: exec monitor -- curl)")
        elif args.verb == "down":
            cluster.down()
        elif args.verb == "ps":
            return subprocess.call(cluster.compose_argv("ps"), env=cluster.env, cwd=ROOT)
        elif args.verb == "kill":
            cluster.kill(args.service)
        elif args.verb == "logs":
            print(cluster.logs(args.service, 200))
        elif args.verb == "exec":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            return subprocess.call(cluster.exec_argv(args.service, command, interactive=not sys.stdin.isatty()),
                                   env=cluster.env)
    except ComposeError as exc:
        print(f"compose_cluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
