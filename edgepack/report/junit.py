"""JUnit XML from gate results: what `edgepack check --junit` and a build's junit.xml are written with.

One <testsuite> per named group of gates and one <testcase> per gate: classname `<suite>.<subject>`
(a `/` in the subject becomes `.`), name the gate's name. A failed gate carries a <failure> whose message
is the gate's message; a gate that could not be evaluated (passed None) is <skipped>; every case has a
<system-out> with the figure, limit and conditions.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping

from edgepack.core.gates import GateResult

# stage -> <failure type>; CI reporters show the type next to the message
FAILURE_TYPES = {"check": "BudgetExceeded"}


def junit_xml(suites: Mapping[str, Iterable[GateResult]], name: str = "edgepack") -> str:
    """`suites` maps a testsuite name to its gates, in the order they are written."""
    suites = {suite: list(gates) for suite, gates in suites.items()}
    every = [gate for gates in suites.values() for gate in gates]
    root = ET.Element("testsuites", name=name, tests=str(len(every)), failures=str(sum(g.failed for g in every)))
    for suite, gates in suites.items():
        ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(gates)), failures=str(sum(g.failed for g in gates)),
                           errors="0", skipped=str(sum(g.passed is None for g in gates)))
        for gate in gates:
            classname = f"{suite}.{gate.subject.replace('/', '.')}" if gate.subject else suite
            case = ET.SubElement(ts, "testcase", classname=classname, name=gate.name, time="0")
            detail = gate.describe()
            if gate.failed:
                failure = ET.SubElement(case, "failure", message=gate.message, type=FAILURE_TYPES.get(gate.stage, "GateFailed"))
                failure.text = detail
            elif gate.passed is None:
                ET.SubElement(case, "skipped", message=gate.message)
            ET.SubElement(case, "system-out").text = detail
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
