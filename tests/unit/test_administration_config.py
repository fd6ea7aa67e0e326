"""[administration]: defaults follow the rest of the config; errors name the key; the metrics an alert needs."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from distributor.config import ConfigError, parse
from distributor.contentcore import AdministrationOptions, ContentPut, FileSpec, SyncReported
from distributor.core import DistributorCore
from distributor.daemon import describe, reload_refusal
from distributor.metrics import DistributorCollector, render
from distributor.reroute import Mode
from tests.unit.test_config import MINIMAL
from tests.unit.test_reroute import service_spec

HEALTH = '[health]\nkeys_file = "/etc/distributor/keys"\n'


def test_defaults_take_the_heartbeat_keys_and_the_distributors_name():
    config = parse(MINIMAL + HEALTH + '[distributor]\nname = "dist1"\n[administration]\n')
    admin = config.administration
    assert admin.keys_file == "/etc/distributor/keys" and admin.sender == "dist1"
    assert admin.options == AdministrationOptions() and admin.options.broker_port == 8407
    assert admin.blob_dir == "/var/lib/distributor/blobs"
    assert admin.state_file == "/var/lib/distributor/administration.json"
    assert "administration: brokers on port 8407 as 'dist1'" in describe(config)
    assert parse(MINIMAL).administration is None and "administration: off" in describe(parse(MINIMAL))
    memory = parse(MINIMAL + HEALTH + '[administration]\nstate_file = ""\nbroker_port = 9000\n').administration
    assert memory.state_file is None and memory.options.broker_port == 9000


@pytest.mark.parametrize("text, key", [
    ("[administration]\n", "administration.keys_file"),  # no [health] to take the keys from
    (HEALTH + "[administration]\nbroker_port = 0\n", "administration.broker_port"),
    (HEALTH + '[administration]\nsender = "two words"\n', "administration.sender"),
    (HEALTH + "[administration]\nretry = 10\nmax_retry = 5\n", "administration.max_retry"),
    (HEALTH + "[administration]\ncheck_intervall = 5\n", "check_intervall"),
])
def test_errors_name_the_key(text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse(MINIMAL + text)


def test_a_changed_administration_section_needs_a_restart():
    before = parse(MINIMAL + HEALTH + "[administration]\n")
    assert reload_refusal(before, parse(MINIMAL + HEALTH + "[administration]\n")) is None
    assert "[administration]" in reload_refusal(before, parse(MINIMAL + HEALTH + "[administration]\nretry = 3\n"))


def samples(core) -> dict:
    text = render(DistributorCollector(core, clock=lambda: 1.0)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
            for s in f.samples}


def test_the_mismatch_gauge_the_content_alert_reads_is_exported_per_node():
    core = DistributorCore("dist1", Mode.REWRITE, [service_spec(nodes=("web1", "web2"))], 100,
                           administration=AdministrationOptions())
    core.start(0.0, 0.0)
    core.handle(ContentPut(1, (FileSpec("a.bin", 1, "a" * 64),), "alice", 0.5, 0.5))
    for node in ("web1", "web2"):  # the checks at start, then version 1 on web1 only
        core.handle(SyncReported(node, 0, True, True, None, None, None, 0, 0.6, 0.6))
    core.handle(SyncReported("web1", 1, True, True, None, None, None, 1, 0.7, 0.7))
    found = samples(core)
    assert found[("distributor_node_content_mismatch", (("node", "web1"),))] == 0
    assert found[("distributor_node_content_mismatch", (("node", "web2"),))] == 1
    assert found[("distributor_content_version", ())] == 1
    assert found[("distributor_node_content_version", (("node", "web1"),))] == 1
    assert found[("distributor_content_syncs_total", (("result", "matched"),))] == 3
    assert found[("distributor_content_refusals_total", (("reason", "traversal"),))] == 0


def test_promtool_accepts_the_content_families():
    from tests.unit.test_metrics import PROMTOOL, promtool_check_metrics
    if PROMTOOL is None:
        pytest.skip("promtool is missing: run scripts/install.sh (Debian package prometheus)")
    core = DistributorCore("dist1", Mode.REWRITE, [service_spec(nodes=("web1", "web2"))], 100,
                           administration=AdministrationOptions())
    core.start(0.0, 0.0)
    promtool_check_metrics(render(DistributorCollector(core, clock=lambda: 1.0), process=True))
