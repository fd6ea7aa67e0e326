"""The layers import one way: pure cores <- adapters <- programs; packages common <- backup <- distributor.

Every module of the project is placed in exactly one layer here, so a new module must be given a
room (docs/architecture.md says which).  The imports of every module, including imports inside
functions, are read with ``ast``: a core that imports an adapter, a clock, a socket, asyncio or a
third-party I/O package fails this test.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("common", "distributor", "backup", "node")

CORE = {
    "common.machine", "common.sansio", "common.wire", "common.tomlconfig",
    "distributor.checksum", "distributor.balancer", "distributor.conntable", "distributor.reroute",
    "distributor.heartbeat", "distributor.core", "distributor.partialsum", "distributor.maglev", "distributor.admin",
    "distributor.announce",
    "distributor.synauth",
    "backup.roles", "backup.sync", "backup.failover",
    # administration (docs/administration.md)
    "common.adminauth", "common.paths", "distributor.content", "distributor.contentcore", "node.tasks",
    "node.logscan",
}
ADAPTERS = {
    "common.keyfile", "common.realtime", "common.systemd",
    "distributor.datapath", "distributor.rules", "distributor.conntrack", "distributor.udp", "distributor.alerts",
    "distributor.announcer",
    "distributor.metrics", "distributor.runtime", "distributor.netif", "distributor.nfqueue", "distributor.api",
    "backup.takeover", "node.metrics",
    # administration: common.bundle binds OpenSSL (cryptography) and draws new keys from the kernel's random source
    "common.bundle", "distributor.blobstore", "distributor.adminclient", "node.broker", "node.store", "node.taskrunner",
}
PROGRAMS = {"distributor.config", "distributor.daemon", "node.agent", "distributor.ctl",
            "distributor.signtool", "node.builtin_tasks"}
PACKAGE_INITS = {f"{p}" for p in PACKAGES}

# The standard library a pure core may use: computation only.  No clock (time), no I/O (socket,
# asyncio, select, subprocess, os, threading, logging's handlers), no third-party I/O package.
# A dotted entry allows that submodule only (urllib.parse, not urllib.request).
CORE_STDLIB = {"__future__", "abc", "array", "bisect", "collections", "dataclasses", "enum", "functools", "hashlib",
               "heapq", "hmac", "ipaddress", "itertools", "json", "math", "re", "struct", "sys", "tomllib", "typing",
               "urllib.parse", "zlib"}
# Which project packages each package may import (the programs of `distributor` sit on top of all).
PACKAGE_DEPENDS = {"common": set(), "backup": {"common"}, "node": {"common"}, "distributor": {"common", "backup"}}


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(name: str, path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from . import checksum` names a module, not an attribute.
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                if candidate in MODULES:
                    found.add(candidate)
    return found


MODULES = modules()


def layer(name: str) -> str:
    for layer_name, members in (("core", CORE), ("adapter", ADAPTERS), ("program", PROGRAMS), ("init", PACKAGE_INITS)):
        if name in members:
            return layer_name
    raise AssertionError(f"module {name} is in no layer: add it to CORE, ADAPTERS or PROGRAMS in {__file__}")


def project(module: str) -> str | None:
    """The project module an import names (its longest known prefix), or None for outside code."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def core_may_import(module: str) -> bool:
    """Whether a core may import ``module`` from outside the project (CORE_STDLIB)."""
    return module.split(".")[0] in CORE_STDLIB or module in CORE_STDLIB


def test_every_module_is_in_exactly_one_layer():
    for name in MODULES:
        layer(name)
    assert not (CORE & ADAPTERS) and not (CORE & PROGRAMS) and not (ADAPTERS & PROGRAMS)
    assert (CORE | ADAPTERS | PROGRAMS | PACKAGE_INITS) == set(MODULES), "a listed module does not exist"


@pytest.mark.parametrize("name", sorted(CORE))
def test_a_core_imports_only_cores_and_pure_standard_library(name):
    for module in imports_of(name, MODULES[name]):
        target = project(module)
        if target is not None:
            assert layer(target) in ("core", "init"), f"core {name} imports {layer(target)} {target}"
        else:
            assert core_may_import(module), f"core {name} imports {module}: cores never touch clocks, sockets or I/O"


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_an_adapter_imports_no_program(name):
    for module in imports_of(name, MODULES[name]):
        target = project(module)
        if target is not None:
            assert layer(target) != "program", f"adapter {name} imports program {target}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_packages_import_one_way(name):
    package = name.split(".")[0]
    for module in imports_of(name, MODULES[name]):
        target = project(module)
        if target is not None and target.split(".")[0] != package:
            assert target.split(".")[0] in PACKAGE_DEPENDS[package], f"{name} ({package}) imports {target}"


def test_package_inits_import_nothing_of_the_project():
    for package in PACKAGES:
        assert not {project(m) for m in imports_of(package, MODULES[package])} - {None}


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text("def f():\n    import socket\n    from .datapath import PacketQueue\n    from . import checksum\n")
    found = imports_of("distributor.fake", path)
    assert {"socket", "distributor.datapath", "distributor.checksum"} <= found
    assert project("distributor.datapath") == "distributor.datapath" and layer("distributor.datapath") == "adapter"


def test_a_dotted_allowance_covers_that_submodule_only():
    assert core_may_import("urllib.parse") and core_may_import("re")
    assert not core_may_import("urllib.request") and not core_may_import("urllib")
    assert not core_may_import("cryptography.hazmat.primitives") and not core_may_import("os.path")
