"""The gateway with TLS: a second gateway process on the test stack, with a self-signed certificate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.integration.invariants import eventually
from vitrine.services.gateway.client import GatewayClient
from vitrine.services.stack import Stack
from vitrine.services.stack.components import local_gateway_settings, settings_env
from vitrine.services.stack.launcher import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "gateway.crt", folder / "gateway.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


async def test_tls_gateway_serves_trusting_clients_and_refuses_plaintext(stack: Stack, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    gateway = stack.settings.gateway.model_copy(update={
        "port": free_port(), "metrics_port": free_port(), "tls_cert": cert, "tls_key": key})
    settings = stack.settings.model_copy(update={"gateway": gateway})
    process = subprocess.Popen([sys.executable, "-m", "vitrine", "gateway", "run"], env={**os.environ, **settings_env(local_gateway_settings(settings))},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async with GatewayClient(gateway.address, "vitrine-demo-storefront", cert.read_bytes()) as client:
            async def answered() -> bool | None:
                if process.poll() is not None:
                    raise AssertionError(process.stderr.read().decode()[-2000:])
                try:
                    return True if (await client.recommend("tls-user", k=3)).items else None
                except grpc.aio.AioRpcError:
                    return None

            await eventually(answered, 30, "an answer over TLS")
        async with GatewayClient(gateway.address, "vitrine-demo-storefront") as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await plaintext.recommend("tls-user", k=3, timeout_s=2)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    assert process.returncode == 0
