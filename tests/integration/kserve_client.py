"""KServe's own Python clients against DIN's gateway, run by ``test_gateway.py`` as a process of their own.

``kserve`` and ``tritonclient`` both register the Open Inference Protocol's protobuf messages (``inference.*``) in
protobuf's default pool, so one process cannot import both. This script is what a KServe user would run:
``InferenceRESTClient`` (OIP v2: health, model readiness, an inference with a JSON body and with the binary tensor
extension, a refused token) and ``InferenceGRPCClient`` (readiness, an inference, no token). It prints what it saw
as one JSON object.

Usage: ``python -m tests.integration.kserve_client HTTP_URL GRPC_ADDRESS TOKEN PIXELS.npy``
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import httpx
import kserve
import numpy as np

MODEL = "digits-small"


def request(pixels: np.ndarray, binary: bool, request_id: str) -> kserve.InferRequest:
    tensor = kserve.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels.astype(np.float32), binary_data=binary)
    return kserve.InferRequest(model_name=MODEL, infer_inputs=[tensor], request_id=request_id)


def answer(response: kserve.InferResponse) -> dict:
    labels = next(out for out in response.outputs if out.name == "label").as_numpy()
    return {"id": response.id, "labels": labels.tolist()}


async def rest(url: str, token: str, pixels: np.ndarray) -> dict:
    seen: dict = {}
    async with kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", retries=0, timeout=30)) as client:
        seen["live"] = await client.is_server_live(url)
        seen["ready"] = await client.is_server_ready(url)
        seen["model_ready"] = await client.is_model_ready(url, MODEL)
        for form, binary in (("json", False), ("binary", True)):
            response = await client.infer(url, request(pixels, binary, f"kserve-rest-{form}"), model_name=MODEL,
                                          headers={"Authorization": f"Bearer {token}"})
            seen[form] = answer(response)
        try:
            await client.infer(url, request(pixels, False, "kserve-rest-refused"), model_name=MODEL,
                               headers={"Authorization": "Bearer not-a-token"})
        except httpx.HTTPStatusError as refused:
            seen["refused"] = refused.response.status_code
    return seen


async def grpc_client(address: str, token: str, pixels: np.ndarray) -> dict:
    seen: dict = {}
    client = kserve.InferenceGRPCClient(address, timeout=30)
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        seen["ready"] = await client.is_server_ready(headers=metadata)
        seen["model_ready"] = await client.is_model_ready(MODEL, headers=metadata)
        seen["infer"] = answer(await client.infer(request(pixels, True, "kserve-grpc"), headers=metadata))
        try:
            await client.infer(request(pixels, True, "kserve-grpc-refused"))
        except grpc.RpcError as refused:
            seen["refused"] = refused.code().name
    finally:
        await client.close()
    return seen


async def main(url: str, address: str, token: str, pixels_file: str) -> dict:
    pixels = np.load(pixels_file)
    return {"rest": await rest(url, token, pixels), "grpc": await grpc_client(address, token, pixels)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:]))))
