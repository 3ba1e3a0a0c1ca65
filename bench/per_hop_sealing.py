"""Benchmark: what least knowledge costs per hop, against the tenant-key envelope it replaces, in one run.

In-process, no broker. Each case seals a payload and opens it, as the two ends of one hop do:

* ``tenant key``: ``envelope.seal`` / ``open`` under the tenant's data key, how an answer and a stage's
  hand-off travelled before (any site serving the tenant could open them);
* ``answer key``: ``seal_pair`` to a client's answer key / ``open_pair`` as that client, how an answer travels
  now;
* ``site pair``: ``seal_pair`` from one site for another / ``open_pair`` there, how a hand-off, a hand-back and
  a forward travel now;
* ``first contact``: deriving the pairwise key with a peer seen for the first time (X25519 + HKDF), paid once
  per client and executor site while the peer stays among the ``PairKeys`` kept.

At 1 KB (an answer) and 16 KB (an intermediate tensor). Writes ``per_hop_sealing.json`` and ``.md`` to
``bench/results/`` (or ``--out``).

    python -m din.bench.per_hop_sealing [--messages 5000] [--out bench/results]
"""

from __future__ import annotations

import os

from din.bench import in_process_main, machine_facts, per_call_us, where_measured
from din.shared import envelope
from din.shared.envelope import DataKey, Identity, Keyring, PairKeys, open_pair, seal_pair

ROUNDS = 5
SIZES = (1024, 16 * 1024)
AAD = {"rid": "0123456789abcdef0123456789abcdef", "tenant": "acme"}


def _case_figures(seal, open_, messages: int) -> dict[str, float]:
    sealed = seal()
    return {"seal_us": per_call_us(lambda _: seal(), messages, ROUNDS),
            "open_us": per_call_us(lambda _: open_(sealed), messages, ROUNDS)}


def _cases(payload: bytes, keyring: Keyring, site: PairKeys, other: PairKeys, client: PairKeys,
           messages: int) -> dict[str, dict[str, float]]:
    publics = {p.identity.name: p.identity.public.x25519 for p in (site, other)}
    answer_public, other_public = client.identity.public.x25519, publics[other.identity.name]

    def tenant_seal():
        return envelope.seal(payload, reader="tenant-acme", aad=AAD, keyring=keyring, sender=site.identity.name)

    def answer_seal():
        return seal_pair(payload, pairs=site, reader="answer", reader_x25519=answer_public, aad=AAD)

    def site_seal():
        return seal_pair(payload, pairs=site, reader=other.identity.name, reader_x25519=other_public, aad=AAD)

    return {
        "tenant key": _case_figures(tenant_seal, lambda s: envelope.open(s, keyring=keyring,
                                                                          expected_reader="tenant-acme"), messages),
        "answer key": _case_figures(answer_seal, lambda s: open_pair(s, pairs=client, expected_reader="answer",
                                                                      sender_x25519=publics.get), messages),
        "site pair": _case_figures(site_seal, lambda s: open_pair(s, pairs=other, expected_reader=other.identity.name,
                                                                   sender_x25519=publics.get), messages),
    }


def measure(messages: int) -> dict:
    keyring = Keyring()
    keyring.install(DataKey.generate("tenant-acme", 1))
    site, other = PairKeys(Identity.generate("site-cloud")), PairKeys(Identity.generate("site-factory"))
    client = PairKeys(Identity.generate("answer"))
    rows = []
    for size in SIZES:
        cases = _cases(os.urandom(size), keyring, site, other, client, messages)
        before = cases["tenant key"]
        for name, figures in cases.items():
            rows.append({"size": size, "case": name, **{k: round(v, 2) for k, v in figures.items()},
                         "ratio": round((figures["seal_us"] + figures["open_us"])
                                        / (before["seal_us"] + before["open_us"]), 3)})
    peers = [Identity.generate(f"peer-{i}").public.x25519 for i in range(min(messages, 2000))]
    first = per_call_us(lambda i: PairKeys(site.identity).key(peers[i % len(peers)], 0), len(peers), ROUNDS)
    return {"messages": messages, "rounds": ROUNDS, **machine_facts(), "rows": rows,
            "first_contact_us": round(first, 2)}


def markdown(report: dict) -> str:
    lines = [
        "# Least knowledge: per-hop sealing against the tenant-key envelope",
        "",
        f"In-process, {report['messages']} calls per round, {where_measured(report)}.",
        "",
        "| payload | case | seal µs | open µs | seal + open against the tenant key |",
        "|---:|---|---:|---:|---:|",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['size'] // 1024} KB | {row['case']} | {row['seal_us']} | {row['open_us']} | "
                     f"{row['ratio']:.2f}x |")
    lines += ["", f"First contact with a peer (X25519 + HKDF, once per client and site): "
              f"**{report['first_contact_us']} µs**."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return in_process_main(argv, __doc__, "per_hop_sealing", measure, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
