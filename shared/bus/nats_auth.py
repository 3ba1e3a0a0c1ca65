"""NATS decentralized auth for DIN: an operator, the DIN and system accounts, and a signed user per party.

Every NATS server (hub and leaves) trusts one operator and preloads the two
account JWTs (``resolver: MEMORY``); users are JWTs signed by the DIN account
key, each carrying its own publish/subscribe permissions
(``shared.bus.permissions``). So a site verifies every connection offline, and
adding an executor or tenant is issuing a credentials file, not reconfiguring
a server. Files under ``<bus>/nats/``: ``operator.jwt``, ``accounts/<name>.jwt``,
the signing seeds (``*.nk``, 0600) and one ``users/<user>.creds`` per user
(0600; the JWT and seed in NATS's standard creds format, read by nats-py's
``user_credentials`` and the ``nats`` CLI's ``--creds``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import nkeys

from din.shared.bus.files import write_secret
from din.shared.bus.permissions import Permissions

NATS_DIR = "nats"
DIN_ACCOUNT = "DIN"
SYSTEM_ACCOUNT = "SYS"
SYSTEM_USER = "system"
"""The operator's user in the system account: ``nats server report|list|info`` (``users/system.creds``)."""
_JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_UNLIMITED = -1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_seed(prefix: int) -> bytes:
    """A fresh nkey seed for an operator, account or user (``nkeys.PREFIX_BYTE_*``)."""
    return nkeys.encode_seed(os.urandom(32), prefix)


def public_key(seed: bytes) -> str:
    """The public nkey (``O…``, ``A…``, ``U…``) of ``seed``."""
    return nkeys.from_seed(bytearray(seed)).public_key.decode()


def encode_jwt(claims: dict, issuer_seed: bytes) -> str:
    """``claims`` as a NATS JWT signed with ``issuer_seed`` (``iss`` and ``jti`` filled in)."""
    kp = nkeys.from_seed(bytearray(issuer_seed))
    body = {**claims, "iss": kp.public_key.decode(), "iat": claims.get("iat", int(time.time())), "jti": ""}
    body["jti"] = base64.b32encode(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()).decode()
    signing_input = f"{_b64(json.dumps(_JWT_HEADER).encode())}.{_b64(json.dumps(body).encode())}"
    return f"{signing_input}.{_b64(kp.sign(signing_input.encode()))}"


def decode_jwt(token: str) -> dict:
    """The claims of a NATS JWT (its signature is the server's to check)."""
    return json.loads(_unb64(token.split(".")[1]))


def creds_text(user_jwt: str, seed: bytes) -> str:
    """A user's JWT and seed in the standard NATS creds file format."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed.decode()}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def _account_claims(name: str, account_pub: str, *, jetstream: bool) -> dict:
    limits = {"subs": _UNLIMITED, "data": _UNLIMITED, "payload": _UNLIMITED, "imports": _UNLIMITED,
              "exports": _UNLIMITED, "wildcards": True, "conn": _UNLIMITED, "leaf": _UNLIMITED}
    if jetstream:
        limits |= {"mem_storage": _UNLIMITED, "disk_storage": _UNLIMITED, "streams": _UNLIMITED,
                   "consumer": _UNLIMITED}
    return {"name": name, "sub": account_pub, "nats": {"limits": limits, "type": "account", "version": 2}}


def user_claims(name: str, user_pub: str, account_pub: str, permissions: Permissions) -> dict:
    """The claims of user ``name``: its permissions and no other limit."""
    nats_claims = {**permissions.claims(), "subs": _UNLIMITED, "data": _UNLIMITED, "payload": _UNLIMITED,
                   "type": "user", "version": 2}
    return {"name": name, "sub": user_pub, "nats": nats_claims}


def read_creds(path: Path | str) -> tuple[str, str]:
    """``(user JWT, seed)`` of a creds file: the line after each ``-----BEGIN ...-----`` marker (a JWT is
    base64url, so it may itself hold a run of dashes)."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    blocks = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith("---") and "BEGIN" in line]
    if len(blocks) < 2 or not all(blocks[:2]):
        raise ValueError(f"{path} is not a NATS credentials file")
    return blocks[0], blocks[1]


def creds_user(path: Path | str) -> str:
    """The user name a creds file's JWT carries."""
    return decode_jwt(read_creds(path)[0])["name"]


def user_permissions(path: Path | str) -> dict:
    """The permission claims of a creds file's JWT (as ``Permissions.claims`` writes them)."""
    claims = decode_jwt(read_creds(path)[0])["nats"]
    return {key: claims[key] for key in ("pub", "sub", "resp") if key in claims}


@dataclass(frozen=True)
class NatsAuthority:
    """The operator and accounts of one deployment, in ``root`` (``<bus>/nats``); issues user credentials."""

    root: Path

    @classmethod
    def load_or_create(cls, root: Path) -> NatsAuthority:
        """The authority in ``root``, created on first use (kept afterwards: issued credentials stay valid)."""
        authority = cls(Path(root))
        if not (authority.root / "operator.jwt").exists():
            authority._create()
        if not authority.trust_file.exists():
            authority.trust_file.write_text(authority.server_config() + "\n")
        return authority

    @property
    def trust_file(self) -> Path:
        """The trust section every server includes (``trust.conf``: operator, system account, accounts)."""
        return self.root / "trust.conf"

    def _create(self) -> None:
        operator_seed = new_seed(nkeys.PREFIX_BYTE_OPERATOR)
        seeds = {name: new_seed(nkeys.PREFIX_BYTE_ACCOUNT) for name in (DIN_ACCOUNT, SYSTEM_ACCOUNT)}
        for name, seed in seeds.items():
            write_secret(self.root / "accounts" / f"{name}.nk", seed.decode() + "\n")
            claims = _account_claims(name, public_key(seed), jetstream=name == DIN_ACCOUNT)
            (self.root / "accounts" / f"{name}.jwt").write_text(encode_jwt(claims, operator_seed) + "\n")
        operator_pub = public_key(operator_seed)
        claims = {"name": "DIN", "sub": operator_pub,
                  "nats": {"system_account": public_key(seeds[SYSTEM_ACCOUNT]), "type": "operator", "version": 2}}
        write_secret(self.root / "operator.nk", operator_seed.decode() + "\n")
        (self.root / "operator.jwt").write_text(encode_jwt(claims, operator_seed) + "\n")

    def _account_seed(self, name: str = DIN_ACCOUNT) -> bytes:
        return (self.root / "accounts" / f"{name}.nk").read_text().strip().encode()

    def account_public_key(self, name: str = DIN_ACCOUNT) -> str:
        return public_key(self._account_seed(name))

    def creds_path(self, user: str) -> Path:
        """Where user ``user``'s credentials file is (``users/<user>.creds``)."""
        return self.root / "users" / f"{user}.creds"

    def issue(self, user: str, permissions: Permissions, account_name: str = DIN_ACCOUNT) -> Path:
        """Write (or rewrite, with these permissions) the credentials of ``user`` in account ``account_name``;
        return its path."""
        seed = new_seed(nkeys.PREFIX_BYTE_USER)
        account = self._account_seed(account_name)
        token = encode_jwt(user_claims(user, public_key(seed), public_key(account), permissions), account)
        path = self.creds_path(user)
        write_secret(path, creds_text(token, seed))
        return path

    def ensure(self, user: str, permissions: Permissions, account_name: str = DIN_ACCOUNT) -> Path:
        """``user``'s credentials in ``account_name`` with exactly ``permissions``: kept when they already say so,
        else reissued."""
        path = self.creds_path(user)
        if (path.exists() and user_permissions(path) == permissions.claims()
                and decode_jwt(read_creds(path)[0])["iss"] == self.account_public_key(account_name)):
            return path
        return self.issue(user, permissions, account_name)

    def server_config(self) -> str:
        """The trust section of every server's config: the operator, the system account, both accounts preloaded."""
        operator = (self.root / "operator.jwt").read_text().strip()
        preload = "\n".join(
            f'    {self.account_public_key(name)}: "{(self.root / "accounts" / f"{name}.jwt").read_text().strip()}"'
            for name in (DIN_ACCOUNT, SYSTEM_ACCOUNT))
        return "\n".join([
            f'operator: "{operator}"',
            f'system_account: "{self.account_public_key(SYSTEM_ACCOUNT)}"',
            "resolver: MEMORY",
            "resolver_preload: {",
            preload,
            "}",
        ])
