import asyncio

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as triton

from vitrine.export import smoke
from vitrine.services.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.fixture
async def client(stack: Stack):
    client = triton.InferenceServerClient(stack.settings.triton.grpc_url)
    yield client
    await client.close()


@pytest.fixture(scope="module")
def reference(stack: Stack) -> ort.InferenceSession:
    path = stack.settings.triton.model_repository / smoke.NAME / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


async def _infer(client: triton.InferenceServerClient, batch: np.ndarray) -> np.ndarray:
    tensor = triton.InferInput(smoke.INPUT, list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    result = await client.infer(smoke.NAME, [tensor], outputs=[triton.InferRequestedOutput(smoke.OUTPUT)])
    return result.as_numpy(smoke.OUTPUT)


@pytest.mark.asyncio
async def test_serves_with_the_cpu_config_through_the_python_backend(client) -> None:
    config = (await client.get_model_config(smoke.NAME, as_json=True))["config"]
    assert config["backend"] == "python"
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert await client.is_model_ready(smoke.NAME)


@pytest.mark.asyncio
@pytest.mark.parametrize("batch_size", [1, 7, 64, 128])
async def test_outputs_equal_onnxruntime_in_process(client, reference: ort.InferenceSession, batch_size: int) -> None:
    batch = np.random.default_rng(batch_size).standard_normal((batch_size, smoke.FEATURES)).astype(np.float32)
    served = await _infer(client, batch)
    expected = reference.run([smoke.OUTPUT], {smoke.INPUT: batch})[0]
    assert served.shape == (batch_size, smoke.OUTPUTS)
    np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.asyncio
async def test_concurrent_requests_merged_by_dynamic_batching_each_get_their_own_rows(
    client, reference: ort.InferenceSession
) -> None:
    rng = np.random.default_rng(7)
    batches = [rng.standard_normal((int(n), smoke.FEATURES)).astype(np.float32) for n in rng.integers(1, 9, size=32)]
    served = await asyncio.gather(*(_infer(client, b) for b in batches))
    for batch, answer in zip(batches, served, strict=True):
        np.testing.assert_allclose(answer, reference.run([smoke.OUTPUT], {smoke.INPUT: batch})[0], rtol=1e-6, atol=1e-6)


@pytest.mark.asyncio
async def test_a_request_of_the_wrong_shape_fails_alone(client, reference: ort.InferenceSession) -> None:
    bad = triton.InferInput(smoke.INPUT, [2, smoke.FEATURES + 1], "FP32")
    bad.set_data_from_numpy(np.zeros((2, smoke.FEATURES + 1), np.float32))
    with pytest.raises(Exception, match="(?i)shape|dims"):
        await client.infer(smoke.NAME, [bad])
    good = np.ones((3, smoke.FEATURES), np.float32)
    np.testing.assert_allclose(await _infer(client, good), reference.run(None, {smoke.INPUT: good})[0], rtol=1e-6)
