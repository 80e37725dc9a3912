"""A `vllm serve` command line run by `dynvllm serve agg` on simulated workers: positional model,
--config, several served names, --chat-template, --uvicorn-log-level and HTTPS with a self-signed
certificate."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
import time

import httpx
import openai
import pytest

from tests.helpers import Proc, free_port, stop_in_background

TEMPLATE = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"


def _self_signed(folder) -> tuple[str, str]:
    """(key file, certificate file) for 127.0.0.1, made with `cryptography` (or `openssl`)."""
    key_file, cert_file = folder / "key.pem", folder / "cert.pem"
    try:
        from cryptography import x509
    except ImportError:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
            + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1"]
            + ["-keyout", str(key_file), "-out", str(cert_file)],
            check=True,
            capture_output=True,
        )
        return str(key_file), str(cert_file)
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_file), str(cert_file)


@pytest.fixture(scope="module")
def https_service(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("https")
    key, cert = _self_signed(folder)
    port = free_port()
    config = folder / "serve.yaml"
    # The file's names lose to the command line's; its log level and body limit hold.
    config.write_text(
        "served-model-name: [tiny, from-file]\nuvicorn-log-level: info\nmax-request-bytes: 20000\n"
    )
    proc = Proc(
        [
            "serve",
            "agg",
            str(tiny_model),
            "--config",
            str(config),
            "--served-model-name",
            "tiny",
            "t2",
            "--engine",
            "sim",
            "--namespace",
            "cmdline",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--ssl-keyfile",
            key,
            "--ssl-certfile",
            cert,
            "--chat-template",
            TEMPLATE,
        ],
        folder / "serve.log",
    )
    url = f"https://127.0.0.1:{port}"
    tls = ssl.create_default_context(cafile=cert)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.p.poll() is None, proc.tail()
            try:
                if httpx.get(url + "/health", verify=tls, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, proc.tail()
            time.sleep(0.3)
        yield url, tls, proc
    finally:
        stop_in_background([proc])


def test_https_serves_the_named_models_with_the_servers_template(https_service):
    url, tls, proc = https_service
    models = httpx.get(url + "/v1/models", verify=tls).json()
    assert {m["id"] for m in models["data"]} == {"tiny", "t2"}
    with pytest.raises(httpx.HTTPError):  # https only
        httpx.get(url.replace("https", "http") + "/health", timeout=5)
    client = openai.OpenAI(
        base_url=url + "/v1", api_key="none", max_retries=0, http_client=httpx.Client(verify=tls)
    )
    messages = [{"role": "user", "content": "red river"}, {"role": "user", "content": "blue"}]
    r = client.chat.completions.create(model="t2", messages=messages, max_tokens=3)
    assert r.model == "t2" and r.usage.completion_tokens == 3
    ids = httpx.post(url + "/tokenize", json={"model": "tiny", "messages": messages}, verify=tls).json()
    text = httpx.post(url + "/detokenize", json={"model": "tiny", "tokens": ids["tokens"]}, verify=tls).json()
    assert text["prompt"] == "<<red river>><<blue>>" and r.usage.prompt_tokens == ids["count"]
    too_big = httpx.post(url + "/v1/completions", content=b"x" * 30000, verify=tls)
    assert too_big.status_code == 413
    assert "Uvicorn running on https://" in proc.tail(200000)
