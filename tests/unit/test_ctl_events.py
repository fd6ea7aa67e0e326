"""distributorctl events: every kind of event reads as a line, a change with who made it."""

from __future__ import annotations

from distributor import ctl

EVENTS = [
    {"id": 1, "time": 0.0, "kind": "alert", "subject": "web2", "old": "ready", "new": "drain",
     "reason": "set by an operator", "level": "info"},
    {"id": 2, "time": 0.0, "kind": "change", "who": "operator", "op": "set_weight", "args": {"node": "web3", "weight": 2}},
    {"id": 3, "time": 0.0, "kind": "log", "level": "error", "message": "reload refused, the running configuration stays"},
]


class Recorded:
    def call(self, method, path, body=None, query=None):
        assert (method, path) == ("GET", "/api/v1/events")
        return EVENTS


def test_events_print_one_line_each_and_a_change_names_who_made_it(capsys):
    assert ctl.run(Recorded(), ctl.build_parser().parse_args(["events"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("alert  web2: ready -> drain (set by an operator)")
    assert lines[1].endswith("change operator: set_weight node=web3 weight=2")
    assert lines[2].endswith("log    reload refused, the running configuration stays")
