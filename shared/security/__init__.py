"""Who holds which key, how keys reach them, and how each hop of a request is sealed.

``shared.envelope`` is the crypto; this package wires it into DIN. It imports no
``cryptography.hazmat``: every primitive goes through ``shared.envelope``. Import
every name from ``shared.security``; the modules hold one concern each:

``principals``  who is who, and who holds each reader's data key (``key_holders``)
``policy``      the operator's per-path crypto policy (``CryptoPolicy``, ``Level``)
``keyfiles``    the master key, the key store and the principal key files (``init_keys``)
``bucket``      names and signed values of the ``DIN_KEYS`` bucket entries
``agent``       ``KeyAgent``: a principal's view of the bucket, fed by a JetStream watch
``bindings``    what each hop's seal binds (``request_binding``, ``stage_binding``, ``result_binding``)
``headers``     the envelope and signature headers on a message
``payload``     ``PayloadSecurity``: seal, open, sign and verify as one process
``jobfacts``    ``JobFacts``: the job header (routing facts) tagged at every hop and verified by the next
``commands``    operator key commands, signed and verified
``control``     control messages (heartbeats, pressure, summaries, rosters, completions, probes, load
                commands) signed by their sender, and who may sign which (``CONTROL_RULES``)
``settings``    ``SecuredServiceSettings``, the settings of every service that seals

Principals
    ``site-<site>`` (a site's executors; the hub site's admission and scheduler),
    ``tenant-<tenant>`` (a tenant's clients), ``audit`` (reads recorded payloads),
    ``operator`` (signs key commands) and ``keymanager`` (the key authority).
    Each has an ``Identity`` (X25519 + Ed25519).

Key files (``init_keys``, run by ``din up`` and ``din keys init``)
    ``keys/master.key``      the key manager's 32-byte master key (mode 0600)
    ``keys/keystore.json``   every identity, its private keys wrapped under
                             ``unlock(master, principal)`` = HMAC-SHA256(master,
                             ``"din.keys.v1/unlock\\0" || principal``): the key manager's store
    ``keys/<principal>.json`` one principal's credentials (mode 0600): its wrapped
                             identity and unlock key, the key manager's public key
                             to pin, the bucket and JetStream domain. A service is
                             given only its own file, so it holds only its own identity.

Data keys (DEKs) and readers
    A payload is sealed to a *reader*; the reader's DEK (``shared.envelope.Keyring``)
    opens it. ``key_holders`` decides who receives each reader's DEK:
    ``site-<s>``: the site and the hub site (whose scheduler seals jobs to it);
    ``tenant-<t>``: the tenant, the hub site and every other control-plane site
    that may serve the tenant (nothing on the inference path is sealed to it any
    more: requests go pairwise to their entry site); a site that only executes
    holds no tenant's key;
    ``audit``: the auditor and the hub site. The key manager holds
    every DEK too, wrapped to itself, so it recovers its state from the bucket.

Pairwise keys and answer keys (least knowledge)
    What one site sends to one reader is sealed under the key only the two share
    (``envelope.seal_pair``: X25519 of their identities, no DEK), and every answer
    to the client's *answer key* (``answer_keys``): a key pair each client makes,
    whose public half it binds into every request (``ANSWER_KEY_FIELD``), carried
    on by every hop's seal. So a site opens the jobs placed there and the
    intermediates handed to it, and nothing served elsewhere; no site opens an
    answer; a client opens only its own.

The key-value bucket ``DIN_KEYS`` (JetStream at the hub site), every value signed by the key manager
    ``pub.<principal>``                  a public identity
    ``dek.<holder>.<reader>.<version>``  a DEK wrapped to ``holder`` (``wrap_dek_for``),
                                         with its state: pending, active, or retired at ``not_after``
    ``revoked``                          revoked principals
    ``policy``                           the per-path crypto policy, resolved per site
    ``sites.<tenant>``                   where a tenant's requests may be served
    ``manifest``                         every live entry's ``issued_ms`` and the revocations,
                                         signed for the stream sequence it is stored at
    A value is ``{"body": <canonical JSON text>, "sig": <Ed25519 over body and key name>}``;
    each body carries ``issued_ms`` so an older value cannot replace a newer one, and the manifest
    tells a process that just started which values are current (``Manifest``).
    Holders watch the bucket (``KeyAgent``) and install DEKs as they appear. Every other site's
    JetStream holds a mirror of it (``KeysMirror``, kept by the key manager); an agent reads its
    own server's copy first, so a site cut off from the hub still hands its processes their keys.

Rotation is two-phase: a new version is published *pending* (every holder can open
it), activated ``activation_delay_s`` later (holders seal with it), and the old
version is accepted until ``not_after`` (the grace window), so nothing in flight is lost.

Hops (wire headers: ``Din-Env-*`` from ``shared.envelope``; ``Din-Signer`` and ``Din-Sig`` on results)
    client -> admission      sealed by the tenant for its entry site alone (pairwise: the site whose
                             admission takes requests sent where the client connects, from the signed
                             ``sites.<tenant>`` entry); AAD = ``request_binding`` (request id, tenant,
                             model, reply subject, tensor headers) and the client's answer key.
                             Forwarded to classifier and scheduler as it is.
    scheduler -> executor    opened and re-sealed to ``site-<s>`` with the same AAD,
                             encrypted or, where the operator's policy allows for that
                             site's link, integrity-only (sensitive data is always encrypted).
    executor -> client       the result sealed to the client's answer key (pairwise, AAD
                             ``result_binding``) and signed by the site (Ed25519 over SHA-256 of the
                             body and the envelope headers); the client verifies, then opens.
    executor -> scheduler    a job handed back is sealed for the scheduler's site alone (pairwise).
    scheduler -> scheduler   a job forwarded to another site is sealed for that site alone (pairwise).
    executor -> executor     a multi-stage job's intermediate tensor or decode state, sealed for the
                             next stage's site alone (pairwise; only the previous stage's site is
                             accepted as its sender) with AAD ``stage_binding``: request, stage, the next
                             stage's site, reply subject, tensor headers, answer key; the receiving
                             executor refuses one bound to another site. Token stream chunks go to the
                             client like results.
    every job hop            the ``Din-Job-V1`` header (tenant, model, labels, sensitivity, allowed sites,
                             SLA class, deadline, plan, placement) carries a ``Din-Job-Tag`` for its receiver:
                             a MAC under the receiving site's key, or the sending site's signature where the
                             sender does not hold that key (``jobfacts``). The client's option headers
                             (``Din-Labels``, ``Din-Sla-Class``, ``Din-Deadline-Ms``, ...) are in the AAD of
                             its seal, so admission refuses a request whose options changed after sealing.
    Kafka                    payloads recorded for audit are sealed with ``seal_for_audit``.
    A tenant named in the policy's ``plaintext_ingress`` may send unsealed requests (raw
    NATS clients); admission seals them at once, for its own site, and the executor answers unsealed.
"""

from din.shared.security.agent import AGENT_GRACE_S, DekState, KeyAgent
from din.shared.security.bindings import (
    ANSWER_FIELD,
    ANSWER_KEY_FIELD,
    ANSWER_PLAIN,
    BOUND_HEADER_PREFIXES,
    check_binding,
    request_binding,
    result_binding,
    stage_binding,
)
from din.shared.security.bucket import EntryKeys, Manifest, read_entry, read_manifest, sign_entry, sign_manifest
from din.shared.security.commands import new_key_command, sign_key_command, verify_key_command
from din.shared.security.control import (
    CONTROL_RULES,
    ControlRefused,
    ControlSigner,
    ControlVerifier,
    Refusal,
    claims_refusal,
    may_sign,
    verify_reply,
)
from din.shared.security.headers import ENVELOPE_PREFIX, SIGNER_HEADER, is_sealed, payload_size, without_envelope
from din.shared.security.jobfacts import JOB_TAG_HEADER, JobFacts
from din.shared.security.keyfiles import (
    KEY_FILE_FORMAT,
    KEYS_BUCKET,
    KEYSTORE_FILE,
    KEYSTORE_FORMAT,
    MASTER_KEY_FILE,
    KeyStore,
    PrincipalKeys,
    init_keys,
    key_file,
    key_file_name,
    read_master_key,
    unlock_key,
)
from din.shared.security.payload import (
    ANSWER_READER,
    Opened,
    PayloadSecurity,
    answer_keys,
    decode_answer_key,
    encode_answer_key,
    seal_for_audit,
    seal_to_site,
)
from din.shared.security.policy import LOCAL_PATH, CryptoPolicy, Level, PayloadProtection
from din.shared.security.principals import (
    AUDIT,
    KEYMANAGER,
    OPERATOR,
    SITE_PREFIX,
    TENANT_PREFIX,
    TenantSites,
    audit_reader,
    held_readers,
    key_holders,
    principals_of,
    serving_sites,
    site_of,
    site_principal,
    tenant_principal,
)
from din.shared.security.settings import SecuredServiceSettings

__all__ = [
    "AGENT_GRACE_S",
    "ANSWER_FIELD",
    "ANSWER_KEY_FIELD",
    "ANSWER_PLAIN",
    "ANSWER_READER",
    "AUDIT",
    "BOUND_HEADER_PREFIXES",
    "CONTROL_RULES",
    "ControlRefused",
    "ControlSigner",
    "ControlVerifier",
    "CryptoPolicy",
    "DekState",
    "ENVELOPE_PREFIX",
    "EntryKeys",
    "Manifest",
    "KEYMANAGER",
    "KEYSTORE_FILE",
    "KEYSTORE_FORMAT",
    "KEYS_BUCKET",
    "KEY_FILE_FORMAT",
    "KeyAgent",
    "KeyStore",
    "LOCAL_PATH",
    "Level",
    "MASTER_KEY_FILE",
    "OPERATOR",
    "Opened",
    "PayloadProtection",
    "PayloadSecurity",
    "JobFacts",
    "JOB_TAG_HEADER",
    "PrincipalKeys",
    "Refusal",
    "SIGNER_HEADER",
    "SITE_PREFIX",
    "SecuredServiceSettings",
    "TENANT_PREFIX",
    "check_binding",
    "claims_refusal",
    "init_keys",
    "is_sealed",
    "key_file",
    "key_file_name",
    "audit_reader",
    "held_readers",
    "key_holders",
    "may_sign",
    "new_key_command",
    "payload_size",
    "principals_of",
    "read_entry",
    "read_manifest",
    "read_master_key",
    "request_binding",
    "result_binding",
    "seal_for_audit",
    "seal_to_site",
    "answer_keys",
    "decode_answer_key",
    "encode_answer_key",
    "TenantSites",
    "serving_sites",
    "sign_entry",
    "sign_manifest",
    "sign_key_command",
    "site_of",
    "site_principal",
    "stage_binding",
    "tenant_principal",
    "unlock_key",
    "verify_reply",
    "verify_key_command",
    "without_envelope",
]
