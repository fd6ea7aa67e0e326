"""Suspicious requests in a web server's access log, counted per kind (pure: lines in, report out).

The paper's example of low-priority housekeeping: scan the access log and
report what looks like an attack, per node.

Contract
--------
* :func:`parse_line` reads nginx's ``combined`` format (also Apache's)::

      $remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent"

  and returns None for a line it cannot read (counted ``unparsed``).
* :func:`classify` returns the kinds a request matches, looking at the
  request line percent-decoded up to twice (double encoding is a classic way
  around naive filters) and lower-cased, and at the user agent:

  ============== ===============================================================
  path_traversal ``../`` or ``..\\`` after decoding, ``/etc/passwd``, ``/proc/self/``, ``win.ini``
  sql_injection  ``union select``, ``' or 1=1``, ``sleep(N)``, ``benchmark(``, ``information_schema``, ``waitfor delay``
  xss            ``<script``, ``javascript:``, ``onerror=``, ``onload=``
  command_injection ``;`` / ``|`` / ``&&`` followed by a shell command, ``$(``, backticks, ``/bin/sh``, ``cmd.exe``
  log4shell      ``${jndi:`` anywhere (request or user agent)
  shellshock     ``() {`` in the user agent or referer
  sensitive_file ``/.env``, ``/.git/``, ``.htpasswd``, ``wp-config.php``, ``/.aws/``, ``/.ssh/``, ``id_rsa``
  cms_probe      ``wp-login.php``, ``xmlrpc.php``, ``phpmyadmin``, ``/cgi-bin/``, ``/actuator``, ``/boaform``
  scanner_agent  a user agent of a known scanner (sqlmap, nikto, nmap, masscan, zgrab, wpscan, ...)
  malformed      a request line that is not ``METHOD TARGET HTTP/x`` (TLS on port 80, binary probes)
  ============== ===============================================================

* :class:`Scanner` accumulates lines and gives a JSON-ready :meth:`Scanner.report`:
  lines read, unparsed, suspicious (requests matching at least one kind),
  counts per kind, the 10 clients with most suspicious requests, and up to 3
  sample request lines per kind (truncated to 200 characters).  Memory stays
  bounded whatever the log's size: only counters and the samples are kept.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import unquote_plus

__all__ = ["LogLine", "parse_line", "classify", "Scanner", "KINDS"]

_COMBINED = re.compile(
    r'^(?P<addr>\S+) \S+ \S+ \[(?P<time>[^\]]*)\] "(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}|-) (?P<bytes>\d+|-)'
    r'(?: "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)")?'
)
_REQUEST_LINE = re.compile(r"^[A-Z]{3,10} \S+ HTTP/\d(?:\.\d)?$")

_RULES: dict[str, re.Pattern[str]] = {
    "path_traversal": re.compile(r"\.\.[/\\]|/etc/(?:passwd|shadow)|/proc/self/|win\.ini|boot\.ini"),
    "sql_injection": re.compile(
        r"union(?:\s|/\*.*?\*/)+(?:all(?:\s|/\*.*?\*/)+)?select|'\s*or\s+'?\w+'?\s*=\s*'?\w+|\bor\s+1\s*=\s*1\b"
        r"|\bsleep\s*\(\s*\d+\s*\)|benchmark\s*\(|information_schema|waitfor\s+delay|;\s*drop\s+table|'\s*--"
    ),
    "xss": re.compile(r"<\s*script|javascript:|\bonerror\s*=|\bonload\s*=|<\s*svg[^>]*on\w+\s*="),
    "command_injection": re.compile(
        r"(?:;|\||&&|%0a)\s*(?:wget|curl|cat|id|uname|whoami|nc|bash|sh|chmod|rm)\b|\$\(|`[^`]*`|/bin/(?:ba)?sh|cmd\.exe"
    ),
    "log4shell": re.compile(r"\$\{\s*jndi\s*:"),
    "sensitive_file": re.compile(r"/\.env\b|/\.git/|\.htpasswd|wp-config\.php|/\.aws/|/\.ssh/|id_rsa|/\.ds_store"),
    "cms_probe": re.compile(r"wp-login\.php|xmlrpc\.php|phpmyadmin|/cgi-bin/|/actuator\b|/boaform|/hnap1|/manager/html"),
}
_SCANNERS = re.compile(
    r"sqlmap|nikto|nmap|masscan|zgrab|wpscan|dirbuster|gobuster|feroxbuster|nuclei|acunetix|nessus|openvas|w3af"
    r"|zmeu|jorgee|hydra|fimap|havij|netsparker|censysinspect|l9explore|ffuf",
    re.IGNORECASE,
)
_SHELLSHOCK = re.compile(r"\(\s*\)\s*\{")
KINDS = tuple(_RULES) + ("shellshock", "scanner_agent", "malformed")


@dataclass(frozen=True)
class LogLine:
    address: str
    request: str
    status: int | None
    referer: str
    agent: str


def parse_line(line: str) -> LogLine | None:
    match = _COMBINED.match(line)
    if match is None:
        return None
    status = match["status"]
    return LogLine(match["addr"], match["request"], None if status == "-" else int(status),
                   match["referer"] or "", match["agent"] or "")


def _decoded(text: str) -> str:
    once = unquote_plus(text, errors="replace")
    twice = unquote_plus(once, errors="replace")
    return twice.lower()


def classify(entry: LogLine) -> set[str]:
    kinds = set()
    request = _decoded(entry.request)
    for kind, rule in _RULES.items():
        if rule.search(request):
            kinds.add(kind)
    if "${jndi:" in entry.agent.lower() or "${jndi:" in entry.referer.lower():
        kinds.add("log4shell")
    if _SHELLSHOCK.search(entry.agent) or _SHELLSHOCK.search(entry.referer):
        kinds.add("shellshock")
    if _SCANNERS.search(entry.agent):
        kinds.add("scanner_agent")
    if not _REQUEST_LINE.match(entry.request):
        kinds.add("malformed")
    return kinds


class Scanner:
    SAMPLES = 3
    SAMPLE_CHARS = 200
    TOP_CLIENTS = 10

    def __init__(self) -> None:
        self.lines = 0
        self.unparsed = 0
        self.suspicious = 0
        self.kinds: Counter[str] = Counter()
        self.clients: Counter[str] = Counter()
        self.samples: dict[str, list[str]] = {}

    def feed(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.lines += 1
            entry = parse_line(line.rstrip("\n"))
            if entry is None:
                self.unparsed += 1
                continue
            kinds = classify(entry)
            if not kinds:
                continue
            self.suspicious += 1
            self.clients[entry.address] += 1
            for kind in kinds:
                self.kinds[kind] += 1
                samples = self.samples.setdefault(kind, [])
                if len(samples) < self.SAMPLES:
                    samples.append(entry.request[: self.SAMPLE_CHARS])
            # Bound the client counter on a log full of distinct attackers: keep the heaviest.
            if len(self.clients) > 10_000:
                self.clients = Counter(dict(self.clients.most_common(1_000)))

    def report(self) -> dict:
        return {
            "lines": self.lines,
            "unparsed": self.unparsed,
            "suspicious": self.suspicious,
            "kinds": {kind: self.kinds.get(kind, 0) for kind in KINDS},
            "top_clients": dict(self.clients.most_common(self.TOP_CLIENTS)),
            "samples": self.samples,
        }
