"""Loading policy files: strict schema, errors with file:line and field path, typography."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.policy import PolicyError, PolicyKind, load_policies, load_policy_file
from weft.policy.typography import normalize, scan

SEED = Path("/work/shared/seed/000_693dd55d752a8819.txt")

CNP_HEAD = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: p
spec:
  endpointSelector:
    matchLabels:
      app: web
"""

# The seed's example policy, with its web typography repaired and its indentation restored.
SEED_CANONICAL = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-genai-to-blobstorage
spec:
  endpointSelector:
    matchLabels:
      app: genai_backend
  egress:
  - toEndpoints:
    - matchLabels:
        "k8s:io.kubernetes.pod.namespace": kube-system
        "k8s:k8s-app": kube-dns
    toPorts:
    - ports:
      - port: "53"
        protocol: ANY
      rules:
        dns:
        - matchPattern: "*.myblobstorage.com"
  - toFQDNs:
    - matchName: app1.myblobstorage.com
"""


def problems(text: str, filename: str = "policy.yaml") -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policies(text, filename)
    return [str(p) for p in info.value.problems]


def cnp(body: str) -> str:
    return CNP_HEAD + textwrap.indent(textwrap.dedent(body), "  ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            cnp("""
                egress:
                - toPorts:
                  - ports:
                    - port: "ab_c"
                """),
            'policy.yaml:13 spec.egress[0].toPorts[0].ports[0].port: "ab_c" is not a port number or name',
            id="bad-port-name",
        ),
        pytest.param(
            cnp("""
                egress:
                - toPorts:
                  - ports:
                    - port: 70000
                """),
            "policy.yaml:13 spec.egress[0].toPorts[0].ports[0].port: 70000 is not a port number (0-65535)",
            id="port-too-big",
        ),
        pytest.param(
            cnp("""
                egress:
                - toPorts:
                  - ports:
                    - port: "80-90"
                """),
            "write a range as port and endPort",
            id="port-range-in-string",
        ),
        pytest.param(
            cnp("""
                egress:
                - toPorts:
                  - ports:
                    - port: "Http"
                """),
            'port names are lower case ("http")',
            id="port-name-case",
        ),
        pytest.param(
            cnp("""
                egress:
                - toPorts:
                  - ports:
                    - port: "my--port"
                """),
            '"my--port" is not a port number or name',
            id="port-name-double-hyphen",
        ),
        pytest.param(
            cnp("""
                egress:
                - toPorts:
                  - ports:
                    - port: "80"
                      endPort: 70
                """),
            "policy.yaml:14 spec.egress[0].toPorts[0].ports[0].endPort: endPort 70 is below port 80",
            id="endport-below-port",
        ),
        pytest.param(
            cnp("""
                egress:
                - toPorts:
                  - ports:
                    - port: http
                      endPort: 90
                """),
            'endPort cannot be used with a named port ("http")',
            id="endport-named",
        ),
        pytest.param(
            cnp("""
                egress:
                - toPort:
                  - ports: []
                """),
            'policy.yaml:11 spec.egress[0].toPort: unknown field "toPort"; did you mean "toPorts"?',
            id="typo-toPort",
        ),
        pytest.param(
            cnp("""
                ingres:
                - {}
                """),
            'policy.yaml:10 spec.ingres: unknown field "ingres"; did you mean "ingress"?',
            id="typo-ingres",
        ),
        pytest.param(
            cnp("""
                egress:
                - toPorts:
                  - ports:
                    - port: "80"
                      protocol: tcp
                """),
            'spec.egress[0].toPorts[0].ports[0].protocol: "tcp" is not a protocol; write it in upper case: TCP',
            id="protocol-lowercase",
        ),
        pytest.param(
            cnp("""
                egress:
                - toPorts:
                  - ports:
                    - port: "80"
                      protocol: ICMP
                """),
            'match ICMP with an "icmps" rule',
            id="protocol-icmp",
        ),
        pytest.param(
            cnp("""
                egress:
                - toCIDR:
                  - 10.0.0.300/8
                """),
            'policy.yaml:12 spec.egress[0].toCIDR[0]: "10.0.0.300/8" is not a CIDR',
            id="bad-cidr",
        ),
        pytest.param(
            cnp("""
                egress:
                - toCIDRSet:
                  - cidr: 10.0.0.0/8
                    except:
                    - 192.168.0.0/16
                """),
            "policy.yaml:14 spec.egress[0].toCIDRSet[0].except[0]: 192.168.0.0/16 is not inside 10.0.0.0/8",
            id="except-outside",
        ),
        pytest.param(
            cnp("""
                egress:
                - toCIDRSet:
                  - cidr: 10.0.0.0/8
                    except: ["fd00::/8"]
                """),
            "fd00::/8 is not inside 10.0.0.0/8",
            id="except-other-family",
        ),
        pytest.param(
            cnp("""
                ingress:
                - fromEndpoints:
                  - matchExpressions:
                    - key: app
                      operator: in
                      values: [a]
                """),
            "policy.yaml:14 spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator: 'in' is not an operator",
            id="operator-case",
        ),
        pytest.param(
            cnp("""
                ingress:
                - fromEndpoints:
                  - matchExpressions:
                    - key: app
                      operator: Exists
                      values: [a]
                """),
            "matchExpressions[0].values: operator Exists takes no values",
            id="exists-with-values",
        ),
        pytest.param(
            cnp("""
                ingress:
                - fromEndpoints:
                  - matchExpressions:
                    - key: app
                      operator: In
                """),
            "policy.yaml:13 spec.ingress[0].fromEndpoints[0].matchExpressions[0].values: operator In needs a non-empty",
            id="in-without-values",
        ),
        pytest.param(
            cnp("""
                ingress:
                - fromEndpoints:
                  - matchLabels:
                      "foo:app": x
                """),
            'unknown label source "foo:"',
            id="unknown-source",
        ),
        pytest.param(
            cnp("""
                ingress:
                - fromEndpoints:
                  - matchLabels:
                      app: 1
                """),
            'quote label values ("1")',
            id="label-value-int",
        ),
        pytest.param(
            cnp("""
                ingress:
                - fromEntities: [wrld]
                """),
            "spec.ingress[0].fromEntities[0]: 'wrld' is not an entity",
            id="bad-entity",
        ),
        pytest.param(
            cnp("""
                ingress:
                - fromRequires:
                  - matchLabels: {env: prod}
                """),
            "fromRequires/toRequires are not supported by weft",
            id="fromRequires",
        ),
        pytest.param(
            cnp("""
                egress:
                - toServices:
                  - k8sService: {serviceName: x}
                """),
            "toServices is not supported by weft",
            id="toServices",
        ),
        pytest.param(
            cnp("""
                ingress:
                - toPorts:
                  - ports: [{port: "53", protocol: UDP}]
                    rules:
                      dns: [{matchName: example.com}]
                """),
            "spec.ingress[0].toPorts[0].rules.dns: DNS rules are only allowed on egress",
            id="dns-on-ingress",
        ),
        pytest.param(
            cnp("""
                ingress:
                - toPorts:
                  - ports: [{port: "80", protocol: UDP}]
                    rules:
                      http: [{method: GET}]
                """),
            "HTTP rules need protocol: TCP",
            id="http-on-udp",
        ),
        pytest.param(
            cnp("""
                ingressDeny:
                - toPorts:
                  - ports: [{port: "80", protocol: TCP}]
                    rules:
                      http: [{method: GET}]
                """),
            "deny rules cannot have L7 rules",
            id="l7-in-deny",
        ),
        pytest.param(
            cnp("""
                egress:
                - icmps: [{fields: [{type: 8}]}]
                  toPorts: [{ports: [{port: "80"}]}]
                """),
            "icmps and toPorts cannot be in the same rule",
            id="icmps-and-toPorts",
        ),
        pytest.param(
            cnp("""
                egress:
                - icmps: [{fields: [{type: PacketTooBig}]}]
                """),
            '"PacketTooBig" is not an IPv4 ICMP type name',
            id="icmp-name-family",
        ),
        pytest.param(
            cnp("""
                egress:
                - icmps: [{fields: [{type: 300, family: IPv4}]}]
                """),
            "300 is not an ICMP type (0-255)",
            id="icmp-type-range",
        ),
        pytest.param(
            cnp("""
                egress:
                - icmps: [{fields: [{type: 8, family: IPv5}]}]
                """),
            "spec.egress[0].icmps[0].fields[0].family:",
            id="icmp-family",
        ),
        pytest.param(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\nspec:\n  ingress: []\n",
            "policy.yaml:5 spec.endpointSelector: required field is missing",
            id="no-endpointSelector",
        ),
        pytest.param(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {}\nspec:\n  endpointSelector: {}\n",
            "policy.yaml:3 metadata.name: required field is missing",
            id="no-name",
        ),
        pytest.param(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: Bad_Name}\n"
            "spec:\n  endpointSelector: {}\n",
            "metadata.name: 'Bad_Name' is not a valid name",
            id="bad-name",
        ),
        pytest.param(
            "apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n",
            'policy.yaml:2 kind: "cilium.io/v1" "CiliumNetworkPolicy" is not a policy kind weft knows',
            id="bad-apiVersion",
        ),
        pytest.param(
            "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p, namespace: x}\n"
            "spec:\n  endpointSelector: {}\n",
            "a CiliumClusterwideNetworkPolicy is not namespaced",
            id="ccnp-namespace",
        ),
        pytest.param(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n",
            "a Cilium policy needs spec or specs",
            id="no-spec",
        ),
        pytest.param(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"
            "spec:\n  endpointSelector: {}\n  nodeSelector: {}\n",
            "nodeSelector (host policy) is not supported by weft",
            id="nodeSelector",
        ),
        pytest.param(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"
            "spec:\n  endpointSelector: {}\n  endpointSelector: {}\n",
            "policy.yaml:6 spec.endpointSelector: duplicate key",
            id="duplicate-key",
        ),
        pytest.param(
            "a: [1, 2\n",
            "policy.yaml:2:1: YAML syntax:",
            id="yaml-syntax",
        ),
        pytest.param("- 1\n- 2\n", "a policy document must be a mapping", id="not-a-mapping"),
    ],
)
def test_schema_errors(text: str, expected: str) -> None:
    got = problems(text)
    assert any(expected in p for p in got), got


NETPOL_HEAD = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: np
  namespace: x
spec:
"""


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            "  ingress: []\n", "policy.yaml:6 spec.podSelector: required field is missing", id="no-podSelector"
        ),
        pytest.param(
            "  podSelector: {}\n  ingress:\n  - from:\n    - {}\n",
            "policy.yaml:10 spec.ingress[0].from[0]: a peer needs podSelector, namespaceSelector or ipBlock",
            id="empty-peer",
        ),
        pytest.param(
            "  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8}\n      podSelector: {}\n",
            "ipBlock cannot be combined",
            id="ipblock-combined",
        ),
        pytest.param(
            "  podSelector: {}\n  ingress:\n  - ports:\n    - protocol: ANY\n",
            "'ANY' is not a protocol; use TCP, UDP or SCTP",
            id="netpol-any",
        ),
        pytest.param(
            "  podSelector: {}\n  policyTypes: [Ingress, Egres]\n",
            "spec.policyTypes[1]:",
            id="policyTypes-typo",
        ),
        pytest.param(
            "  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/7]}\n",
            "10.0.0.0/7 is not inside 10.0.0.0/8",
            id="except-wider",
        ),
        pytest.param(
            "  podSelector: {}\n  egress:\n  - ports:\n    - port: 80\n      endPort: 79\n",
            "endPort 79 is below port 80",
            id="netpol-endport",
        ),
        pytest.param(
            "  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {'k8s:app': x}}\n",
            "is not a valid label key",
            id="netpol-source-prefix",
        ),
    ],
)
def test_netpol_schema_errors(body: str, expected: str) -> None:
    got = problems(NETPOL_HEAD + body)
    assert any(expected in p for p in got), got


def test_all_problems_reported_and_file_rejected_whole() -> None:
    good = cnp("ingress:\n- fromEntities: [world]\n")
    bad = cnp("ingress:\n- fromEntities: [wrld]\negress:\n- toCIDR: [nope]\n")
    with pytest.raises(PolicyError) as info:
        load_policies(good + "---\n" + bad.replace("name: p", "name: q"), "two.yaml")
    msgs = [str(p) for p in info.value.problems]
    assert len(msgs) == 2, msgs
    assert all("(document 2)" in m for m in msgs)
    assert msgs[0].startswith("two.yaml:21")
    assert msgs[1].startswith("two.yaml:23")


def test_duplicate_policy_in_file() -> None:
    text = cnp("ingress: [{}]\n")
    got = problems(text + "---\n" + text)
    assert any("appears twice in this file" in p for p in got)


def test_json_input_with_lines_and_tabs() -> None:
    doc = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "j"},
        "spec": {"endpointSelector": {}, "egress": [{"toPorts": [{"ports": [{"port": "99999"}]}]}]},
    }
    text = json.dumps(doc, indent="\t")
    got = problems(text, "p.json")
    assert len(got) == 1
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "99999" in ln)
    assert got[0].startswith(f"p.json:{line} ")
    assert "spec.egress[0].toPorts[0].ports[0].port" in got[0]
    doc["spec"]["egress"][0]["toPorts"][0]["ports"][0]["port"] = "443"  # type: ignore[index]
    [policy] = load_policies(json.dumps(doc, indent="\t"), "p.json")
    assert policy.kind is PolicyKind.CNP and policy.namespace == "default"


def test_list_kinds_and_namespaces() -> None:
    text = textwrap.dedent("""\
        apiVersion: v1
        kind: List
        items:
        - apiVersion: networking.k8s.io/v1
          kind: NetworkPolicy
          metadata: {name: a, namespace: x}
          spec: {podSelector: {}}
        - apiVersion: cilium.io/v2
          kind: CiliumClusterwideNetworkPolicy
          metadata: {name: b}
          spec: {endpointSelector: {}, ingress: [{}]}
        - apiVersion: cilium.io/v2
          kind: CiliumNetworkPolicy
          metadata: {name: c}
          spec: {endpointSelector: {}, ingress: [{}]}
        """)
    a, b, c = load_policies(text, "list.yaml", default_namespace="dev")
    assert a.key == ("NetworkPolicy", "x", "a")
    assert b.key == ("CiliumClusterwideNetworkPolicy", "", "b") and b.namespace is None
    assert c.key == ("CiliumNetworkPolicy", "dev", "c")
    bad = text.replace("{name: b}", "{name: b, bogus: 1}")
    got = problems(bad)
    assert got == ['policy.yaml:10 items[1].metadata.bogus: unknown field "bogus"']


def test_load_policy_file(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(SEED_CANONICAL)
    [policy] = load_policy_file(f)
    assert policy.source == f"{f}:1"
    with pytest.raises(PolicyError, match="No such file"):
        load_policy_file(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------- typography


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "spec:\n  egress:\n  \u2013 toEndpoints: []\n",
            'policy.yaml:3:3: en dash "\u2013" used as a list marker; YAML needs "-"',
            id="en-dash-marker",
        ),
        pytest.param(
            "spec:\n  egress:\n  \u2014 toEndpoints: []\n",
            'policy.yaml:3:3: em dash "\u2014" used as a list marker',
            id="em-dash-marker",
        ),
        pytest.param(
            "items:\n\u2022 a\n", 'policy.yaml:2:1: bullet "\u2022" used as a list marker', id="bullet-marker"
        ),
        pytest.param(
            "metadata:\n  name: \u201cweb\u201d\n",
            'policy.yaml:2:9: left double quotation mark "\u201c" is not a YAML quote; use "',
            id="curly-double",
        ),
        pytest.param(
            "metadata:\n  name: \u2018web\u2019\n",
            "policy.yaml:2:9: left single quotation mark",
            id="curly-single",
        ),
        pytest.param(
            "metadata:\n  name:\u00a0web\n",
            "policy.yaml:2:8: non-breaking space (U+00A0); YAML needs a plain space",
            id="nbsp",
        ),
        pytest.param(
            "metadata:\n\u00a0\u00a0name: web\n",
            "policy.yaml:2:1: non-breaking space",
            id="nbsp-indent",
        ),
        pytest.param(
            "metadata:\n\tname: web\n", "policy.yaml:2:1: tab in indentation; YAML needs spaces", id="tab-indent"
        ),
        pytest.param("metadata:\n  name:\tweb\n", "policy.yaml:2:8: tab in the line", id="tab-after-colon"),
        pytest.param("a:\n  b: x\u200by\n", "zero-width space (U+200B)", id="zero-width"),
        pytest.param('a:\n  "k8s:app":web\n', 'policy.yaml:2:12: no space after ":"', id="glued-colon"),
        pytest.param("ports:\n- port: 80\u201390\n", 'en dash "\u2013" inside a value', id="dash-in-value"),
        pytest.param("a\uff1a b\n", "full-width colon", id="fullwidth-colon"),
        pytest.param(
            "metadata:\nname: x\n",
            '"metadata:" has no value and the next line is not indented; was the indentation lost?',
            id="lost-indentation",
        ),
    ],
)
def test_typography(text: str, expected: str) -> None:
    got = problems(text)
    assert any(expected in p for p in got), got
    assert not any("YAML syntax" in p for p in got)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('description: "It\u2019s fine \u2013 really"\n', id="inside-double-quotes"),
        pytest.param("description: It\u2019s the web tier \u2013 public\n", id="apostrophe-and-spaced-dash"),
        pytest.param("a: b  # \u201ccomment\u201d \u2013 \t\n", id="in-comment"),
        pytest.param("  description: Allow \u201cweb\u201d traffic\n", id="quotes-in-description-prose"),
        pytest.param("a: 'tab\there'\n", id="tab-in-quotes"),
        pytest.param(
            "description: |\n  Notes:\n  It\u2019s \u201cquoted\u201d \u2013 fine\n  \twith a tab\nname: x\n",
            id="block-scalar-prose",
        ),
    ],
)
def test_typography_allowed(text: str) -> None:
    assert scan(text) == []


def seed_policy_block() -> str:
    lines = SEED.read_text(encoding="utf-8").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("apiVersion:"))
    end = next(i for i, ln in enumerate(lines) if "matchPattern" in ln)
    return "\n".join(lines[start : end + 1]) + "\n"


def test_seed_policy_typography_is_explained() -> None:
    block = seed_policy_block()
    got = problems(block, "seed.yaml")
    assert not any("YAML syntax" in p for p in got)
    by_line: dict[int, list[str]] = {}
    for p in got:
        m = re.match(r"seed\.yaml:(\d+):\d+: (.*)", p)
        assert m, p
        by_line.setdefault(int(m.group(1)), []).append(m.group(2))
    lines = block.splitlines()
    for no, line in enumerate(lines, 1):
        if line.startswith("\u2013"):
            assert any("used as a list marker" in msg for msg in by_line[no]), (no, line)
        if "\u201c" in line:
            assert any("is not a YAML quote" in msg for msg in by_line[no]), (no, line)
    assert any("was the indentation lost" in p for p in got)
    # Line 12 is `\u201ck8s:io.kubernetes.pod.namespace\u201d:kube-system`: quotes and the glued colon.
    assert any('no space after ":"' in msg for msg in by_line[12])


def test_seed_canonical_policy_validates() -> None:
    [policy] = load_policies(SEED_CANONICAL, "seed.yaml")
    assert policy.key == ("CiliumNetworkPolicy", "default", "allow-genai-to-blobstorage")
    assert not any("not enforced" in n for n in policy.notes)  # DNS rules go through the DNS proxy
    # The repair the typography scan suggests fixes every character problem of the seed.
    assert not any("quote" in i.message or "list marker" in i.message for i in scan(normalize(seed_policy_block())))


def test_to_dict_round_trip() -> None:
    [policy] = load_policies(SEED_CANONICAL, "seed.yaml")
    again = load_policies(json.dumps(policy.to_dict()), "again.json")
    assert again[0].to_dict() == policy.to_dict()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab: -\n\t\"'[]{}#\u2013\u201c\u00a0,0123")), max_size=80))
def test_loader_fuzz_only_raises_policy_error(text: str) -> None:
    try:
        load_policies(text, "fuzz.yaml")
    except PolicyError as exc:
        assert exc.problems
