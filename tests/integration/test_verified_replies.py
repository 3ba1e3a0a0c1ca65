"""The client verifies every reply: a party on the bus that answers first cannot fail or fake a request.

A party with the run's widest NATS login (the operator's: it sees every request and may publish into every inbox,
as a compromised service could) answers each of acme's requests at once with forgeries: an unsigned
``rate_limited`` error, an error signed by a key nobody was given, a genuine signed error replayed from another
request, and an unsealed result. Acme's client refuses each one, counts it, and goes on waiting: every request is
answered by the network, correctly. An error the network really gives (an unknown model) still arrives as that
error, signed by the site that answered it.

A compromised hub (it holds every tenant's key) answering acme's ``pii`` requests, which only the factory may
serve, with results it sealed and signed itself is refused the same way: the key manager tells each tenant's
clients where its requests may be served.
"""

from __future__ import annotations

import asyncio
import json

import nats
import numpy as np
import pytest

from din.client import DinRequestError
from din.shared.bus.connect import nats_servers
from din.shared.contracts.inference import InferResponseV1, RequestHeaders, ServedByV1
from din.shared.envelope import SIGNATURE_HEADER, SiteIdentity, sign_result
from din.shared.errors import DIN_ERROR_HEADER, DinError, ErrorCode, error_reply
from din.shared.security import (
    ANSWER_KEY_FIELD,
    SIGNER_HEADER,
    KeyAgent,
    PayloadSecurity,
    PrincipalKeys,
    key_file,
    result_binding,
    site_principal,
)
from tests.integration.network import running_network
from tests.support import wait_for

pytestmark = pytest.mark.integration

REQUESTS = 20


@pytest.fixture(scope="module")
def network(kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized") as net:
        yield net



async def test_forged_answers_are_refused_and_the_real_answer_awaited(network, digits, local_labels):
    x, _ = digits
    attacker = await nats.connect(nats_servers(network.hub_url), **network.stack.nats_options())
    stranger = SiteIdentity.generate(site_principal("cloud"))
    genuine: list = []
    forged = 0

    async def capture(msg) -> None:
        if msg.headers and DIN_ERROR_HEADER in msg.headers and SIGNER_HEADER in msg.headers:
            genuine.append(msg)

    async def forge(msg) -> None:
        nonlocal forged
        if not msg.reply:
            return
        body, headers = error_reply(DinError(ErrorCode.RATE_LIMITED, "slow down", retry_after_ms=10**9), None)
        answers = [(body, headers)]
        answers.append((body, {**headers, SIGNER_HEADER: stranger.name,
                               SIGNATURE_HEADER: sign_result(stranger, body, {SIGNER_HEADER: stranger.name})}))
        answers += [(m.data, dict(m.headers)) for m in genuine[:1]]
        answers.append((b'{"id": "x", "model_name": "digits-small", "outputs": []}', {}))
        for data, hdrs in answers:
            await attacker.publish(msg.reply, data, headers=hdrs)
            forged += 1

    await attacker.subscribe("_INBOX.acme.>", cb=capture)
    try:
        async with network.client("acme") as client:
            with pytest.raises(DinRequestError) as unknown:
                await client.infer("no-such-model", {"input": x[:1]})
            assert unknown.value.error.code == ErrorCode.UNKNOWN_MODEL, "a real error still arrives"
            await attacker.flush()
            assert genuine, "the network's error answer carries its signer"

            await attacker.subscribe("din.v1.infer.acme.>", cb=forge)
            await attacker.flush()
            before = sum(client.security.refusals.values())
            results = await asyncio.gather(*(client.infer("digits-small", {"input": x[i : i + 1]})
                                             for i in range(REQUESTS)))
            refused = sum(client.security.refusals.values()) - before
    finally:
        await attacker.close()

    labels = np.concatenate([r.outputs["label"] for r in results])
    np.testing.assert_array_equal(labels, local_labels(x[:REQUESTS]))
    assert all(r.signer is not None and r.signer.startswith("site-") for r in results)
    assert forged >= 4 * REQUESTS
    assert refused >= REQUESTS, "the forgeries that arrived before the real answers were refused and counted"


async def test_a_compromised_hubs_results_for_data_it_may_not_serve_are_refused(network, digits, local_labels):
    x, _ = digits
    attacker = await nats.connect(nats_servers(network.hub_url), **network.stack.nats_options())
    hub = PayloadSecurity(KeyAgent(PrincipalKeys.load(key_file(network.stack.keys_dir, site_principal("cloud")))))
    await hub.start(attacker)
    forged = 0

    async def forge(msg) -> None:
        nonlocal forged
        request_id = (msg.headers or {}).get(RequestHeaders.REQUEST_ID)
        if not msg.reply or not request_id:
            return
        fake = InferResponseV1(
            id=request_id, model_name="digits-small", model_version="2", outputs=[],
            served_by=ServedByV1(site="factory", executor="factory-1", model="digits-small", model_version="2",
                                 degraded=False, batch_size=1),
        ).model_dump_json().encode()
        answer_key = json.loads(msg.headers["Din-Env-Aad"])[ANSWER_KEY_FIELD]   # in clear on the request
        sealed = hub.seal_answer(fake, answer_key=answer_key, aad=result_binding(request_id, "acme"))
        await attacker.publish(msg.reply, sealed.body, headers=hub.sign_answer(sealed.body, sealed.to_headers()))
        forged += 1

    await attacker.subscribe("din.v1.infer.acme.>", cb=forge)
    await attacker.flush()
    try:
        async with network.client("acme") as client:
            await wait_for(lambda: client.security.agent.sites is not None, 10, "acme's client knowing its sites")
            before = client.security.refusals.get("wrong_site", 0)
            results = await asyncio.gather(*(client.infer("digits-small", {"input": x[i : i + 1]}, labels=["pii"])
                                             for i in range(REQUESTS)))
            refused = client.security.refusals.get("wrong_site", 0) - before
    finally:
        await hub.stop()
        await attacker.close()

    assert {r.signer for r in results} == {site_principal("factory")}, "acme's pii data is served at the factory"
    labels = np.concatenate([r.outputs["label"] for r in results])
    np.testing.assert_array_equal(labels, local_labels(x[:REQUESTS]))
    assert forged == REQUESTS and refused >= 1
