"""Key files on disk: the master key, the key manager's store, and one credentials file per principal.

``init_keys`` (run by ``din up`` and ``din keys init``) writes them all; see the package docstring for the layout.
"""

from __future__ import annotations

import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from din.shared import envelope
from din.shared.bus.files import write_secret
from din.shared.envelope import Identity, InvalidToken, PublicIdentity, SiteIdentity
from din.shared.naming import token
from din.shared.security import b64url
from din.shared.security.principals import KEYMANAGER, principals_of, site_of
from din.shared.topology import Topology

KEYS_BUCKET = "DIN_KEYS"
KEY_FILE_FORMAT = "din.keys.principal.v1"
KEYSTORE_FORMAT = "din.keys.store.v1"
MASTER_KEY_FILE = "master.key"
KEYSTORE_FILE = "keystore.json"
_UNLOCK_LABEL = b"din.keys.v1/unlock\x00"


def unlock_key(master_key: bytes, principal: str) -> bytes:
    """The key a principal's identity is wrapped under, derived from the master key."""
    return hmac.digest(master_key, _UNLOCK_LABEL + token(principal, what="principal").encode("ascii"), "sha256")


def read_master_key(path: Path) -> bytes:
    """The master key in ``path`` (base64url, 32 bytes); raises ``ValueError`` naming the file."""
    try:
        key = b64url.decode(Path(path).read_text().strip())
    except (OSError, ValueError) as exc:
        raise ValueError(f"master key file {path} unusable ({exc.__class__.__name__}): rerun `din keys init`") from None
    if len(key) != 32:
        raise ValueError(f"master key file {path} does not hold 32 bytes: rerun `din keys init`")
    return key


@dataclass(frozen=True)
class PrincipalKeys:
    """One principal's credentials, loaded from its key file: its identity and the key manager to trust."""

    identity: Identity
    keymanager: PublicIdentity
    bucket: str = KEYS_BUCKET
    kv_domain: str | None = None

    @property
    def principal(self) -> str:
        """The principal these credentials belong to."""
        return self.identity.name

    @classmethod
    def load(cls, path: Path) -> PrincipalKeys:
        """Read a key file written by ``init_keys``; raises ``ValueError`` with a one-line message."""
        try:
            doc = json.loads(Path(path).read_text())
            if doc.get("format") != KEY_FILE_FORMAT:
                raise ValueError("format")
            identity = envelope.unwrap_private(b64url.decode(doc["identity"]), b64url.decode(doc["unlock"]))
            if identity.name != doc["principal"]:
                raise ValueError("principal")
            return cls(identity, PublicIdentity.from_dict(doc["keymanager"]), doc["bucket"], doc.get("kv_domain"))
        except FileNotFoundError:
            raise ValueError(
                f"key file {path} not found: start the stack with `din up` or run `din keys init`"
            ) from None
        except (OSError, ValueError, KeyError, TypeError, InvalidToken) as exc:
            raise ValueError(f"key file {path} is not a usable DIN key file ({exc.__class__.__name__})") from None

    def document(self, unlock: bytes) -> dict[str, object]:
        """The key file's content, the identity wrapped under ``unlock``."""
        return {
            "format": KEY_FILE_FORMAT,
            "principal": self.principal,
            "bucket": self.bucket,
            "kv_domain": self.kv_domain,
            "keymanager": self.keymanager.to_dict(),
            "identity": b64url.encode(envelope.wrap_private(self.identity, unlock)),
            "unlock": b64url.encode(unlock),
        }


@dataclass
class KeyStore:
    """The key manager's store: every principal's public identity and its private keys wrapped under the master key."""

    publics: dict[str, PublicIdentity]
    wrapped: dict[str, bytes]
    bucket: str = KEYS_BUCKET
    kv_domain: str | None = None

    def identity(self, principal: str, master_key: bytes) -> Identity:
        """Unwrap ``principal``'s identity; raises ``InvalidToken`` under a wrong master key."""
        return envelope.unwrap_private(self.wrapped[principal], unlock_key(master_key, principal))

    def save(self, path: Path) -> None:
        """Write the store (mode 0600)."""
        doc = {
            "format": KEYSTORE_FORMAT,
            "bucket": self.bucket,
            "kv_domain": self.kv_domain,
            "principals": {
                name: {"public": self.publics[name].to_dict(), "identity": b64url.encode(self.wrapped[name])}
                for name in self.publics
            },
        }
        write_secret(Path(path), json.dumps(doc, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        """Read ``keystore.json``; raises ``ValueError`` with a one-line message."""
        try:
            doc = json.loads(Path(path).read_text())
            if doc.get("format") != KEYSTORE_FORMAT:
                raise ValueError("format")
            entries = doc["principals"]
            return cls(
                {name: PublicIdentity.from_dict(e["public"]) for name, e in entries.items()},
                {name: b64url.decode(e["identity"]) for name, e in entries.items()},
                doc["bucket"],
                doc.get("kv_domain"),
            )
        except FileNotFoundError:
            raise ValueError(f"keystore {path} not found: run `din keys init` or start with `din up`") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"keystore {path} is not a usable DIN keystore ({exc.__class__.__name__})") from None


def key_file_name(principal: str) -> str:
    """File name of ``principal``'s key file."""
    return f"{token(principal, what='principal')}.json"


def key_file(keys_dir: Path, principal: str) -> Path:
    """Where ``init_keys`` writes ``principal``'s key file."""
    return Path(keys_dir) / key_file_name(principal)


def init_keys(keys_dir: Path, topology: Topology, *, master_key: bytes | None = None) -> KeyStore:
    """Create identities for every principal of ``topology`` and write the key files (see the package docstring)."""
    keys_dir = Path(keys_dir)
    master = master_key or secrets.token_bytes(32)
    identities: dict[str, Identity] = {}
    for principal in principals_of(topology):
        cls = SiteIdentity if site_of(principal) is not None else Identity
        identities[principal] = cls.generate(principal)
    keymanager = identities[KEYMANAGER].public
    store = KeyStore(
        {name: ident.public for name, ident in identities.items()},
        {name: envelope.wrap_private(ident, unlock_key(master, name)) for name, ident in identities.items()},
        KEYS_BUCKET,
        topology.hub.name,
    )
    write_secret(keys_dir / MASTER_KEY_FILE, b64url.encode(master) + "\n")
    store.save(keys_dir / KEYSTORE_FILE)
    for name, ident in identities.items():
        if name == KEYMANAGER:
            continue
        creds = PrincipalKeys(ident, keymanager, KEYS_BUCKET, topology.hub.name)
        write_secret(key_file(keys_dir, name), json.dumps(creds.document(unlock_key(master, name)), indent=2) + "\n")
    return store
