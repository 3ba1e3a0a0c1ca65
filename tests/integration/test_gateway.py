"""The HTTP gateway over a real stack, with the clients people have: tritonclient (JSON and binary, and over gRPC),
KServe's own clients (``kserve.InferenceRESTClient`` JSON and binary, ``kserve.InferenceGRPCClient``), and the
OpenAI client (whole and streamed completions).

One module-scoped stack: one site, one executor serving digits-small and charlm (with its prefill part). Tenant
``acme`` may send in clear (the gateway holds no keys); ``sealed`` may not, so the gateway's requests for it are
refused by admission, the one door.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import nats
import numpy as np
import openai
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from din.client import decode_answer
from din.shared.bus.permissions import tenant_user
from din.shared.credentials import request_proof
from din.shared.naming import Subjects
from din.shared.security import CryptoPolicy
from din.shared.tensors import tensors_to_arrays
from din.stack.brokers import REPO_ROOT
from tests.integration.network import running_network
from tests.support import wait_for

pytestmark = pytest.mark.integration

GATEWAY_TOPOLOGY = {
    "name": "gateway-tests",
    "sites": [{"name": "cloud", "role": "hub", "executors": [
        {"id": "gw-1", "models": ["digits-small", "charlm-prefill", "charlm"], "capacity": 2}]}],
    "links": [],
    "tenants": [
        {"name": "acme", "rate_per_s": 5000, "burst": 5000},
        {"name": "sealed", "rate_per_s": 5000, "burst": 5000},
    ],
}


@pytest.fixture(scope="module")
def network(kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized",
                         security_policy=CryptoPolicy(plaintext_ingress=["acme"]),
                         topology_spec=GATEWAY_TOPOLOGY, gateway=True) as net:
        yield net


@pytest.fixture(scope="module")
def base_url(network) -> str:
    return f"127.0.0.1:{network.stack.ports.gateway_port(0)}"


@pytest.fixture(scope="module")
def auth(network) -> dict[str, str]:
    """The acme token header (tritonclient adds its own headers to the dict it is given: pass a copy)."""
    return {"Authorization": f"Bearer {network.token('acme')}"}



def _inputs(pixels: np.ndarray, binary: bool) -> list:
    tensor = triton.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels.astype(np.float32), binary_data=binary)
    return [tensor]


def test_health_and_model_metadata(base_url):
    client = triton.InferenceServerClient(base_url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits-small") and client.is_model_ready("digits-small", "2")
    metadata = client.get_model_metadata("digits-small")
    assert metadata["versions"] == ["1", "2"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "label"]
    assert not client.is_model_ready("charlm-prefill"), "an internal part is not listed"
    for missing in ("charlm-prefill", "no-such-model"):
        response = requests.get(f"http://{base_url}/v2/models/{missing}")
        assert response.status_code == 404 and response.json()["code"] == "unknown_model"
    assert requests.get(f"http://{base_url}/v2/models/digits-small/versions/9").status_code == 404


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infers_like_the_model(base_url, auth, digits, local_labels, binary):
    pixels = digits[0][:5]
    client = triton.InferenceServerClient(base_url)
    outputs = [triton.InferRequestedOutput("label", binary_data=binary),
               triton.InferRequestedOutput("probabilities", binary_data=binary)]
    result = client.infer("digits-small", _inputs(pixels, binary), outputs=outputs, headers=dict(auth),
                          request_id="triton-1", model_version="2")
    np.testing.assert_array_equal(result.as_numpy("label"), local_labels(pixels))
    assert result.as_numpy("probabilities").shape == (5, 10)
    response = result.get_response()
    assert response["id"] == "triton-1" and response["model_version"] == "2"
    assert response["served_by"]["site"] == "cloud"


def test_tritonclient_binary_without_requested_outputs(base_url, auth, digits, local_labels):
    """No outputs named: tritonclient asks for every output in binary (binary_data_output), and DIN's compact
    binary form carries the one input to admission."""
    pixels = digits[0][:3]
    result = triton.InferenceServerClient(base_url).infer("digits-small", _inputs(pixels, True), headers=dict(auth))
    np.testing.assert_array_equal(result.as_numpy("label"), local_labels(pixels))
    assert result.get_output("label")["parameters"]["binary_data_size"] == 3 * 8


def test_refusals_are_structured_http_errors(base_url, auth, network, digits):
    client = triton.InferenceServerClient(base_url)
    pixels = digits[0][:1]
    cases = [
        ({}, pixels, "digits-small", "401", "unauthenticated"),
        ({"Authorization": "Bearer din1.acme.99999999999.00"}, pixels, "digits-small", "401", "unauthenticated"),
        ({"Authorization": f"Bearer {network.token('sealed')}"}, pixels, "digits-small", "401", "unauthenticated"),
        (auth, pixels[:, :10], "digits-small", "400", "bad_tensor"),
        (auth, pixels, "charlm-prefill", "404", "unknown_model"),
    ]
    for headers, data, model, status, code in cases:
        with pytest.raises(InferenceServerException) as excinfo:
            client.infer(model, _inputs(data, False), headers=dict(headers))
        assert excinfo.value.status() == status and excinfo.value.message().startswith(code), (model, headers)
    response = requests.post(f"http://{base_url}/v2/models/digits-small/infer", data=b"{not json", headers=dict(auth))
    assert response.status_code == 400 and response.json()["code"] == "bad_request"


def test_kserve_body_with_model_name_and_input_parameters(base_url, auth, digits, local_labels):
    """The body KServe's client sends (model_name, per-input parameters), over HTTP; a model_name that is not
    the URL's is refused."""
    pixels = digits[0][:2]
    body = {"model_name": "digits-small", "id": "k-1", "inputs": [
        {"name": "input", "shape": [2, 64], "datatype": "FP32", "data": pixels.reshape(-1).tolist(),
         "parameters": {"content_type": "np"}}], "outputs": [{"name": "label"}]}
    response = requests.post(f"http://{base_url}/v2/models/digits-small/infer", json=body, headers=dict(auth))
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == local_labels(pixels).tolist()
    wrong = requests.post(f"http://{base_url}/v2/models/digits-small/infer",
                          json={**body, "model_name": "digits-large"}, headers=dict(auth))
    assert wrong.status_code == 400 and wrong.json()["code"] == "bad_request"


def test_kserve_clients_rest_and_grpc(network, base_url, digits, local_labels, tmp_path):
    """KServe's own clients, in a process of their own (``kserve_client.py``): REST health, model readiness and an
    inference with a JSON body and with the binary extension, a refused token as HTTP 401; gRPC readiness, an
    inference, and no token as ``UNAUTHENTICATED``."""
    pixels = digits[0][:3]
    np.save(tmp_path / "pixels.npy", pixels)
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.kserve_client", f"http://{base_url}",
         f"127.0.0.1:{network.stack.ports.gateway_grpc_port(0)}", network.token("acme"), str(tmp_path / "pixels.npy")],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    labels = local_labels(pixels).tolist()
    rest, grpc = seen["rest"], seen["grpc"]
    assert rest["live"] and rest["ready"] and rest["model_ready"]
    assert rest["json"] == {"id": "kserve-rest-json", "labels": labels}
    assert rest["binary"] == {"id": "kserve-rest-binary", "labels": labels}
    assert rest["refused"] == 401
    assert grpc["ready"] and grpc["model_ready"]
    assert grpc["infer"] == {"id": "kserve-grpc", "labels": labels}
    assert grpc["refused"] == "UNAUTHENTICATED"

async def test_kserve_body_over_nats(network, digits, local_labels):
    """The same full OIP body straight on the request subject: admission takes model_name, model_version and
    per-input parameters."""
    pixels = digits[0][:2]
    proof = request_proof(network.token("acme"), "digits-small", "kn-1")
    body = {"model_name": "digits-small", "model_version": "2", "inputs": [
        {"name": "input", "shape": [2, 64], "datatype": "FP32", "data": pixels.reshape(-1).tolist(),
         "parameters": {"content_type": "np"}}], "parameters": {"token": proof}}
    nc = await nats.connect(network.hub_url, **network.stack.nats_options(user=tenant_user("acme")))
    try:
        msg = await nc.request(Subjects.infer("acme", "digits-small"), json.dumps(body).encode(), timeout=10,
                               headers={"Content-Type": "application/json", "Din-Request-Id": "kn-1"})
    finally:
        await nc.close()
    response = decode_answer(msg.data, msg.headers)
    assert response.model_version == "2" and response.id == "kn-1"
    np.testing.assert_array_equal(tensors_to_arrays(response.outputs)["label"], local_labels(pixels))


def test_openai_completions_whole_and_streamed(base_url, network):
    client = openai.OpenAI(base_url=f"http://{base_url}/v1", api_key=network.token("acme"), max_retries=0)
    whole = client.completions.create(model="charlm", prompt="def ", max_tokens=12)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens == 4
    events = list(client.completions.create(model="charlm", prompt="def ", max_tokens=12, stream=True))
    streamed = "".join(e.choices[0].text for e in events)
    assert streamed == whole.choices[0].text, "greedy decoding: the stream makes the same text"
    assert events[-1].choices[0].finish_reason == "length" and events[-1].usage.completion_tokens == 12
    assert sum(1 for e in events if e.choices[0].text) == 12
    with pytest.raises(openai.AuthenticationError):
        client.with_options(api_key="nope").completions.create(model="charlm", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="digits-small", prompt="x", max_tokens=2)


async def test_nothing_answers_by_the_deadline_is_504(base_url, auth, network, digits):
    """Admission frozen: the gateway answers 504 deadline_exceeded at the request's deadline, once."""
    admission = network.kill("admission", signal.SIGSTOP)
    try:
        response = requests.post(
            f"http://{base_url}/v2/models/digits-small/infer", headers={**auth, "Din-Timeout-Ms": "300"},
            json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                              "data": digits[0][0].tolist()}]}, timeout=10)
    finally:
        network.kill(admission.name, signal.SIGCONT)
    assert response.status_code == 504 and response.json()["code"] == "deadline_exceeded"

    async def admission_answers() -> bool:
        try:
            return (await network.health("admission")).ready
        except Exception:  # noqa: BLE001 - no answer yet
            return False

    await wait_for(admission_answers, 10.0, "admission answering again after SIGCONT")
    assert requests.get(f"http://{base_url}/v2/health/ready").status_code == 200


def test_tritonclient_grpc(network, auth, digits, local_labels):
    """The same over gRPC (inference.GRPCInferenceService): metadata, readiness, inference, a refusal."""
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{network.stack.ports.gateway_grpc_port(0)}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits-small")
    assert not client.is_model_ready("charlm-prefill")
    metadata = client.get_model_metadata("digits-small", as_json=True)
    assert metadata["versions"] == ["1", "2"] and metadata["inputs"][0]["shape"] == ["-1", "64"]
    pixels = digits[0][:4].astype(np.float32)
    tensor = triton_grpc.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    headers = {"authorization": auth["Authorization"]}
    result = client.infer("digits-small", [tensor], headers=headers, request_id="g-1")
    np.testing.assert_array_equal(result.as_numpy("label"), local_labels(pixels))
    assert result.get_response().id == "g-1" and result.as_numpy("probabilities").shape == (4, 10)
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("digits-small", [tensor], headers={"authorization": "Bearer nope"})
    assert excinfo.value.status() == "StatusCode.UNAUTHENTICATED"
    assert excinfo.value.message().startswith("unauthenticated")
