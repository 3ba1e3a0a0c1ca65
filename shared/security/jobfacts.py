"""A job's routing facts, bound at every hop: the ``Din-Job-V1`` header is authenticated by a ``Din-Job-Tag``.

The job header says where a request may run and how: tenant, model, labels, sensitivity, allowed sites, SLA
class, deadline, reply subject, plan and placement. Every hop that hands a job on (admission, classifier,
scheduler, executor) tags the exact header it sends, for the site it sends it to; every hop that takes a job
(classifier, scheduler, executor) refuses one whose tag does not verify, before it reads anything else from it
or answers anyone. A header changed or added after tagging therefore changes nothing: the job is dead-lettered
and counted (``job_refused_<reason>``), never served and never answered (its reply subject is not trusted).

Two forms, the cheaper one wherever it can be used:

``mac;<reader>;<version>;<tag>``
    HMAC-SHA256 under the receiving site's data key (``site-<site>``), whose holders are that site and the hub
    (``principals.key_holders``): every hop within a site and every hop from the hub. A few microseconds.
``sig;<signer>;<signature>``
    The sending site's Ed25519 signature, for a hop whose sender does not hold the receiver's site key (an edge
    scheduler forwarding to another site, an edge executor handing a job back to the hub or on to the next
    stage). The receiver checks the signer is a known, unrevoked site.

Neither form lets a tenant vouch for a job: tenants hold no site key and no site identity, so a request reaches a
scheduler or an executor only through an admission that checked its token, quota and seal. The header itself is
covered byte for byte (no re-serialisation), together with the reader or signer it is tagged for.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, MutableMapping

from din.shared.contracts.job import HEADER_PREFIX
from din.shared.envelope import InvalidToken, Reason, SealRefused, verify_result
from din.shared.security import b64url
from din.shared.security.payload import PayloadSecurity
from din.shared.security.principals import site_of, site_principal

JOB_HEADER = HEADER_PREFIX + "V1"
JOB_TAG_HEADER = HEADER_PREFIX + "Tag"
"""The authentication of a job's ``Din-Job-V1`` header (``mac;…`` or ``sig;…``)."""
MAC_FORM = "mac"
SIG_FORM = "sig"
_LABEL = b"din.job.v1\x00"
_MAC_BYTES = 32


def _covered(bound_to: str, header: str) -> bytes:
    return _LABEL + bound_to.encode() + b"\x00" + header.encode()


class JobFacts:
    """Tags the job headers a process sends and verifies the ones it takes, as the principal of ``site``.

    Verification accepts a MAC under this site's data key or a signature by a known, unrevoked site. Refusals
    are counted by reason (``detail``).
    """

    def __init__(self, security: PayloadSecurity, site: str) -> None:
        self.security = security
        self.site = site
        self.reader = site_principal(site)
        self.refusals: Counter[str] = Counter()
        self.signed = 0

    def tag(self, headers: MutableMapping[str, str], to_site: str) -> MutableMapping[str, str]:
        """Add the ``Din-Job-Tag`` of ``headers``' job header for a hop to ``to_site``; returns ``headers``."""
        header = headers[JOB_HEADER]
        agent = self.security.agent
        reader = site_principal(to_site)
        try:
            key = agent.keyring.sealing_key(reader, sender=agent.principal)
        except SealRefused:
            key = None
        if key is not None:
            mac = key.mac(_covered(reader, header), b"")
            headers[JOB_TAG_HEADER] = f"{MAC_FORM};{reader};{key.version};{b64url.encode(mac)}"
        else:
            self.signed += 1
            digest = hashlib.sha256(_covered(agent.principal, header)).digest()
            headers[JOB_TAG_HEADER] = f"{SIG_FORM};{agent.principal};{agent.sign(digest, {})}"
        return headers

    def verify(self, headers: Mapping[str, str] | None) -> str:
        """The principal the job header of ``headers`` is vouched for by (this site's reader for a MAC, the
        signing site for a signature); ``InvalidToken`` (counted) when it is not authentic."""
        try:
            return self._verify(headers or {})
        except InvalidToken as refused:
            self.refusals[refused.reason.value] += 1
            raise

    def _verify(self, headers: Mapping[str, str]) -> str:
        header, tag = headers.get(JOB_HEADER), headers.get(JOB_TAG_HEADER)
        if header is None or tag is None:
            raise InvalidToken(Reason.MALFORMED)
        form, _, rest = tag.partition(";")
        agent = self.security.agent
        if form == MAC_FORM:
            reader, version, mac = _split(rest, 3)
            if reader != self.reader or not version.isdigit() or len(version) > 9:
                raise InvalidToken(Reason.WRONG_READER if reader != self.reader else Reason.MALFORMED)
            key = agent.keyring.opening_key(reader, int(version), sender=reader)
            key.verify_mac(_covered(reader, header), b"", _mac_bytes(mac))
            return reader
        if form == SIG_FORM:
            signer, signature = _split(rest, 2)
            public = agent.publics.get(signer)
            if public is None or site_of(signer) is None:
                raise InvalidToken(Reason.UNKNOWN_KEY)
            if signer in agent.revoked:
                raise InvalidToken(Reason.REVOKED)
            verify_result(public, hashlib.sha256(_covered(signer, header)).digest(), {}, signature)
            return signer
        raise InvalidToken(Reason.MALFORMED)

    def detail(self) -> dict[str, str]:
        """Health detail: jobs refused by reason, and how many tags needed a signature."""
        out = {"job_refused": str(sum(self.refusals.values())), "job_tags_signed": str(self.signed)}
        out.update({f"job_refused_{reason}": str(n) for reason, n in sorted(self.refusals.items())})
        return out


def _mac_bytes(text: str) -> bytes:
    try:
        mac = b64url.decode(text)
    except ValueError:
        raise InvalidToken(Reason.MALFORMED) from None
    if len(mac) != _MAC_BYTES:
        raise InvalidToken(Reason.MALFORMED)
    return mac


def _split(rest: str, parts: int) -> list[str]:
    fields = rest.split(";")
    if len(fields) != parts or not all(fields):
        raise InvalidToken(Reason.MALFORMED)
    return fields
