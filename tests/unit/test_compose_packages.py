"""The compose image has a Debian package for every program the code runs in it.

The image (Dockerfile) installs testbed/image/debian-packages.txt and nothing else, so a program
the distributor, the node agent or the entrypoint starts without its package there fails only on a
real engine (the image once lacked nftables, which rewrite mode runs as `nft`).  The programs are
found by reading the source: argv lists given to subprocess and exec calls; a program found here
without an entry in PROGRAM_PACKAGES fails the test until someone names its package.
"""

import ast
import re
import tomllib
from pathlib import Path

import yaml

from testbed import compose_cluster, runner

ROOT = Path(__file__).parents[2]

# Program -> the Debian 12 package that provides it in the image.
PROGRAM_PACKAGES = {
    "iptables": "iptables",
    "iptables-save": "iptables",
    "iptables-restore": "iptables",
    "ip6tables-save": "iptables",
    "ip6tables-restore": "iptables",
    "nft": "nftables",
    "ip": "iproute2",
    "nginx": "nginx",
    "curl": "curl",
    "wrk": "wrk",
    "python3": "python3",
}
# Shared objects loaded from the system: nginx's modules (load_module), and the libraries of
# Python dependencies whose wheels link them without carrying a copy.
NGINX_MODULES = {"ngx_http_echo_module.so": "libnginx-mod-http-echo"}
WHEEL_LIBRARIES = {"netfilterqueue": "libnetfilter-queue1"}

# Code that runs inside the image: every argv it starts counts.
IMAGE_SOURCES = ("distributor", "backup", "node", "common", "testbed/container.py",
                 "testbed/wrk.py", "testbed/traffic.py")  # the last two: the client's load, in the compose e2e test
# Code that runs on the host and starts commands in a container (exec SERVICE ARGV): only those count.
DRIVER_SOURCES = ("testbed/compose_cluster.py", "tests/e2e/test_compose_e2e.py")
RUNNERS = {"run", "Popen", "call", "check_call", "check_output", "create_subprocess_exec", "_run", "execvp", "execv",
           "execlp", "execl", "spawnvp"}
IN_CONTAINER = {"exec", "popen", "exec_argv"}  # ComposeCluster methods: (service, argv)
ARGV_NAMES = re.compile(r"^(argv|cmd|command)$")


def _program(node: ast.AST) -> str | None:
    """The program of an argv written as a list or tuple literal starting with a string."""
    if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
        first = node.elts[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


def _name(func: ast.AST) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def programs_in(source: str, in_container_only: bool = False) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = _name(node.func)
            if in_container_only:
                candidates = node.args[1:2] if name in IN_CONTAINER else []
            elif name in RUNNERS:
                candidates = node.args
                if name.startswith(("exec", "spawn")) and node.args and isinstance(node.args[0], ast.Constant):
                    found.add(node.args[0].value)  # os.execvp("nginx", [...])
            else:
                candidates = []
            found.update(p for p in map(_program, candidates) if p)
        elif isinstance(node, ast.Assign) and not in_container_only:
            if any(isinstance(t, ast.Name) and ARGV_NAMES.match(t.id) for t in node.targets):
                program = _program(node.value)
                if program:
                    found.add(program)
    return found


def _files(parts: tuple[str, ...]) -> list[Path]:
    files = []
    for part in parts:
        path = ROOT / part
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def programs_the_image_runs() -> dict[str, set[str]]:
    """{program: the files that start it}."""
    found: dict[str, set[str]] = {}
    for in_container_only, parts in ((False, IMAGE_SOURCES), (True, DRIVER_SOURCES)):
        for path in _files(parts):
            for program in programs_in(path.read_text(), in_container_only):
                found.setdefault(program, set()).add(str(path.relative_to(ROOT)))
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        if "profiles" in service:
            continue  # a profile's service runs its own image (test_the_monitor_image_has_what_its_entrypoint_runs)
        found.setdefault(service["command"][0], set()).add("docker-compose.yml")
        found.setdefault(service["healthcheck"]["test"][1], set()).add("docker-compose.yml")
    return found


def test_the_scan_finds_argv_lists_in_calls_and_assignments():
    source = """
subprocess.run(["ip", "link"], check=True)
self._run(["nft", "-f", "-"], text)
os.execvp("nginx", ["nginx", "-c", conf])
subprocess.run([*prefix, *argv])
argv = ["wrk", "-t1"]
cluster.exec("client", ["curl", "-s", url])
subprocess.run([sys.executable, "-m", "x"])
"""
    assert programs_in(source) == {"ip", "nft", "nginx", "wrk"}
    assert programs_in(source, in_container_only=True) == {"curl"}


def test_every_program_the_image_runs_has_its_package_in_the_image():
    found = programs_the_image_runs()
    # The scan still sees what we know the code runs (a scan that finds nothing would pass).
    assert {"iptables-save", "iptables-restore", "nft", "ip", "nginx", "curl", "wrk", "python3"} <= set(found)
    unmapped = {p: sorted(where) for p, where in found.items() if p not in PROGRAM_PACKAGES}
    assert not unmapped, f"programs run in the image with no Debian package named in PROGRAM_PACKAGES: {unmapped}"
    packages = set(compose_cluster.image_packages())
    missing = {p: PROGRAM_PACKAGES[p] for p in found if PROGRAM_PACKAGES[p] not in packages}
    assert not missing, f"add to testbed/image/debian-packages.txt (program: package): {missing}"


def test_the_libraries_loaded_from_the_system_have_their_packages_in_the_image():
    packages = set(compose_cluster.image_packages())
    modules = {Path(m).name for m in re.findall(r"^load_module (\S+);", runner.NGINX_CONF, re.M)}
    unmapped = modules - set(NGINX_MODULES)
    assert not unmapped, f"nginx modules with no Debian package named in NGINX_MODULES: {sorted(unmapped)}"
    dependencies = {re.split(r"[<>=!~ \[;]", d, 1)[0].lower()
                    for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    needed = {m: NGINX_MODULES[m] for m in modules} | {d: WHEEL_LIBRARIES[d] for d in dependencies & set(WHEEL_LIBRARIES)}
    assert "netfilterqueue" in needed  # the dependency is still read
    missing = {name: package for name, package in needed.items() if package not in packages}
    assert not missing, f"add to testbed/image/debian-packages.txt: {missing}"


# The monitor profile's image (testbed/image/Dockerfile.monitor): program -> its Debian 12 package.
MONITOR_PROGRAMS = {
    "prometheus": "prometheus",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "curl": "curl",
    "python3": "python3",
}
# bash's keywords and builtins, the entrypoint's own functions, and coreutils (essential in every Debian image).
SHELL_WORDS = {"set", "if", "then", "fi", "else", "echo", "exit", "printf", "for", "do", "done", "kill", "wait", "trap",
               "stop", "ready", "write_targets", "}", "{", "local", "mkdir"}


def test_the_monitor_image_has_what_its_entrypoint_runs():
    entrypoint = (ROOT / "testbed" / "image" / "monitor-entrypoint.sh").read_text()
    commands = set()
    for line in entrypoint.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or "=" in line.split()[0]:
            continue  # a comment, an assignment, or an option continuing the line before
        word = line.split()[0]
        if word.endswith("()"):
            continue  # a function's definition
        commands.add(word)
    programs = commands - SHELL_WORDS
    assert {"prometheus", "prometheus-alertmanager", "python3"} <= programs, programs
    unmapped = programs - set(MONITOR_PROGRAMS)
    assert not unmapped, f"programs the monitor's entrypoint runs with no package in MONITOR_PROGRAMS: {unmapped}"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["monitor"]["healthcheck"]["test"][1] == "testbed-monitor"  # the entrypoint itself
    assert "curl" in entrypoint  # its healthcheck
    packages = set(compose_cluster.image_packages(path=compose_cluster.MONITOR_PACKAGES_FILE))
    missing = {p: MONITOR_PROGRAMS[p] for p in programs | {"curl"} if MONITOR_PROGRAMS[p] not in packages}
    assert not missing, f"add to testbed/image/monitor-packages.txt (program: package): {missing}"
