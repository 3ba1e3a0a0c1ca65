"""Every service that answers clients signs its errors for the reply subject they answer (``error_answer``).

The classifier opens no payload but holds its site's identity to sign the errors it answers; with security off
nothing is signed. A signature covers the reply subject and the body: the same error on another subject, or a
changed body, does not verify.
"""

from __future__ import annotations

import pytest

from din.services.classifier.main import Classifier
from din.services.classifier.settings import ClassifierSettings
from din.shared import envelope
from din.shared.errors import DinError, ErrorCode
from din.shared.security import SIGNER_HEADER, init_keys, key_file, site_principal
from din.shared.security.headers import signed_headers
from din.shared.security.payload import error_digest

REPLY = "_INBOX.acme.cloud.abcdefghijklmnopqrstuv.token"


@pytest.fixture
def classifier_settings(tmp_path, test_topology, zoo_dir):
    topology_file = tmp_path / "topology.yaml"
    topology_file.write_text(test_topology.model_dump_json())
    store = init_keys(tmp_path / "keys", test_topology)
    settings = dict(nats_url="nats://127.0.0.1:1", kafka_bootstrap="127.0.0.1:1", site="cloud", topology=topology_file,
                    model_repo=zoo_dir)
    return store, settings, key_file(tmp_path / "keys", site_principal("cloud"))


def verifies(public, reply: str, body: bytes, headers: dict[str, str]) -> bool:
    try:
        envelope.verify_result(public, error_digest(reply, body), signed_headers(headers),
                               headers[envelope.SIGNATURE_HEADER])
    except envelope.InvalidToken:
        return False
    return True


def test_the_classifier_signs_its_errors_with_its_sites_identity(classifier_settings):
    store, settings, keys = classifier_settings
    runtime = Classifier(ClassifierSettings(**settings, key_file=keys)).runtime
    body, headers = runtime.error_answer(REPLY, DinError(ErrorCode.DEADLINE_EXCEEDED, "expired on the way"), "r-1")
    assert headers[SIGNER_HEADER] == site_principal("cloud")
    public = store.publics[site_principal("cloud")]
    assert verifies(public, REPLY, body, headers)
    assert not verifies(public, REPLY + "x", body, headers), "bound to its reply subject"
    assert not verifies(public, REPLY, body.replace(b"expired", b"EXPIRED"), headers), "bound to its body"
    assert not verifies(store.publics[site_principal("factory")], REPLY, body, headers)


def test_with_security_off_errors_go_unsigned(classifier_settings):
    _, settings, _ = classifier_settings
    runtime = Classifier(ClassifierSettings(**settings, security=False)).runtime
    _, headers = runtime.error_answer(REPLY, DinError(ErrorCode.INTERNAL, "no policy"), "r-2")
    assert SIGNER_HEADER not in headers and envelope.SIGNATURE_HEADER not in headers
