"""DIN's own certificate authority: one CA per deployment, a server certificate per broker.

The CA signs the certificate of every NATS server (its leafnode port and, where
clients leave the machine, its client port) and of the Kafka broker. Leaves,
services, ``din`` commands and clients verify servers against ``ca.pem``.
Private keys are written 0600; certificates are public.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from din.shared.bus.files import write_secret

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
TLS_DIR = "tls"
CA_DAYS = 3650
SERVER_DAYS = 825
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DIN"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _alt_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


@dataclass(frozen=True)
class ServerCert:
    """A server's certificate and key files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class BusCA:
    """The deployment's CA in folder ``root`` (``ca.pem``, ``ca-key.pem``, ``tls/<server>.pem``)."""

    root: Path

    @property
    def cert_path(self) -> Path:
        return self.root / CA_CERT

    @classmethod
    def load_or_create(cls, root: Path) -> BusCA:
        """The CA in ``root``, created on first use (an existing one is kept: certificates stay valid)."""
        ca = cls(Path(root))
        if not ca.cert_path.exists() or not (ca.root / CA_KEY).exists():
            key = ec.generate_private_key(ec.SECP256R1())
            now = dt.datetime.now(dt.UTC)
            cert = (
                x509.CertificateBuilder()
                .subject_name(_name("DIN bus CA"))
                .issuer_name(_name("DIN bus CA"))
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256())
            )
            write_secret(ca.root / CA_KEY, _pem_key(key))
            ca.cert_path.write_text(cert.public_bytes(serialization.Encoding.PEM).decode())
        return ca

    def server_cert(self, name: str, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> ServerCert:
        """The certificate of server ``name`` for ``hosts`` (IP addresses or DNS names), issued once."""
        out = ServerCert(self.root / TLS_DIR / f"{name}.pem", self.root / TLS_DIR / f"{name}-key.pem")
        if out.cert.exists() and out.key.exists() and self._covers(out.cert, hosts):
            return out
        ca_key = serialization.load_pem_private_key((self.root / CA_KEY).read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_secret(out.key, _pem_key(key))
        out.cert.write_text(cert.public_bytes(serialization.Encoding.PEM).decode())
        return out

    @staticmethod
    def _covers(cert_path: Path, hosts: tuple[str, ...]) -> bool:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = {str(v) for v in names.get_values_for_type(x509.IPAddress)} | set(
            names.get_values_for_type(x509.DNSName))
        return set(hosts) <= have


def client_context(ca_file: Path | str) -> ssl.SSLContext:
    """A TLS client context that trusts only DIN's CA and checks the server's name."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
