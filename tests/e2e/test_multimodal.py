"""Images through real vLLM on a tiny BLIP-2 (built by the test): data URI, file and http sources,
the prompt template, the encode role (same output as agg, embeddings reused), hostile inputs."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import OfflineReference, free_port, start_agg, start_service, stop_in_background, wait_http

TEMPLATE = "Question: <prompt> Answer:"
QUESTION = "what is this"
PARAMS = {"max_tokens": 8, "temperature": 0}


def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 255, (56, 56, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(_png(i))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory):
    from dynvllm.models.tiny_vision import build_tiny_vision_model

    return build_tiny_vision_model(tmp_path_factory.mktemp("vision") / "model")


@pytest.fixture(scope="module")
def plain_vision_model(vision_model, tmp_path_factory):
    """The same model without a chat template: its text goes through --mm-prompt-template."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("vision-plain") / "model"
    shutil.copytree(vision_model, path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    cfg = path / "tokenizer_config.json"
    cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items() if k != "chat_template"}))
    return path


@pytest.fixture(scope="module")
def expected_job(vision_model, media):
    reqs = [
        {
            "kind": "completion",
            "input": TEMPLATE.replace("<prompt>", QUESTION),
            "params": PARAMS,
            "image": str(p),
        }
        for p in (media / "img0.png", media / "img1.png")
    ]
    job = OfflineReference(vision_model, reqs, {"max_model_len": 512})
    yield job
    job.close()


@pytest.fixture(scope="module")
def expected(expected_job):
    return [texts[0] for texts in expected_job.result()]


@pytest.fixture(scope="module")
def image_server(media):
    """A local HTTP server for the http(s) source (private addresses allowed for the test)."""
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(media))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _args(media: Path) -> list[str]:
    return [
        "--allowed-local-media-path",
        str(media),
        "--allow-private-media-urls",
        "--max-model-len",
        "512",
        "--max-images-per-request",
        "2",
    ]


@pytest.fixture(scope="module")
def services(vision_model, plain_vision_model, media, expected_job, tmp_path_factory):
    """agg alone on the model as `dynvllm model tiny --vision` writes it (its chat template places
    the text), and agg + an encode worker on the same weights without a chat template
    (--mm-prompt-template places the text), side by side (their engines start while vLLM's
    offline one computes `expected`)."""
    log = tmp_path_factory.mktemp("mm")
    cache = tmp_path_factory.mktemp("encoder-cache")  # named, so a test can read what is handed over
    agg_url, agg = start_agg(vision_model, log / "agg.log", "mm-agg", *_args(media))
    enc_url, enc = start_agg(
        plain_vision_model,
        log / "enc.log",
        "mm-enc",
        *_args(media),
        "--mm-prompt-template",
        TEMPLATE,
        "--roles",
        "agg=1,encode=1",
        "--encoder-cache-dir",
        str(cache),
    )
    try:
        wait_http(agg_url + "/health", lambda b: b.get("workers") == 1, agg, timeout=400)
        wait_http(enc_url + "/health", lambda b: b.get("workers") == 2, enc, timeout=400)
        yield {"agg": agg_url, "enc": enc_url, "enc_proc": enc, "model": vision_model, "cache": cache}
    finally:
        stop_in_background([agg, enc])


def _chat(url: str, image_url: str | list[str], text: str = QUESTION) -> httpx.Response:
    urls = image_url if isinstance(image_url, list) else [image_url]
    content = [
        *({"type": "image_url", "image_url": {"url": u}} for u in urls),
        {"type": "text", "text": text},
    ]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], **PARAMS}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_images_from_every_source_give_the_engines_output(services, media, expected, image_server):
    url = services["agg"]
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    from transformers import AutoTokenizer

    from dynvllm.models.tiny_vision import NUM_QUERY_TOKENS

    n_prompt = len(
        AutoTokenizer.from_pretrained(services["model"])(TEMPLATE.replace("<prompt>", QUESTION)).input_ids
    )
    for i in (0, 1):
        r = client.chat.completions.create(
            model="tiny",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _data_uri(_png(i))}},
                        {"type": "text", "text": QUESTION},
                    ],
                }
            ],
            **PARAMS,
        )
        assert r.choices[0].message.content == expected[i]  # the template, token for token
        # The engine's image tokens (8 query tokens) are counted, as vLLM's server counts them.
        assert r.usage.prompt_tokens == n_prompt + NUM_QUERY_TOKENS
    assert expected[0] != expected[1]  # the output follows the image
    assert _chat(url, (media / "img1.png").as_uri()).json()["choices"][0]["message"]["content"] == expected[1]
    assert _chat(url, image_server + "/img0.png").json()["choices"][0]["message"]["content"] == expected[0]


def test_the_encode_role_gives_the_same_output_and_reuses_embeddings(services, expected):
    url = services["enc"]
    for i in (0, 1):
        r = _chat(url, _data_uri(_png(i)))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected[i]
        assert r.headers["x-dynvllm-encode"].startswith("remote:")
    again = _chat(url, _data_uri(_png(0)))
    assert again.json()["choices"][0]["message"]["content"] == expected[0]
    assert again.headers["x-dynvllm-encode"].startswith("cached:")
    text = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert text.status_code == 200 and text.headers.get("x-dynvllm-encode", "no_images") == "no_images"
    metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    assert 'dynvllm_encode_total{model="tiny",outcome="remote"} 2.0' in metrics
    assert 'dynvllm_encode_total{model="tiny",outcome="cached"} 1.0' in metrics


def test_the_encode_worker_hands_over_the_models_own_embedding_of_each_image(services):
    """What the language worker loads for an image, under that image's content key, is the
    model's own embedding of it (BLIP-2's Q-Former output projected into the language model),
    here computed by transformers from the same pixels: the right image, shape and values."""
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import Blip2ForConditionalGeneration
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from dynvllm.router.hashing import image_hash, image_uuid

    data = _png(5)
    r = _chat(services["enc"], _data_uri(data))
    assert r.status_code == 200 and r.headers["x-dynvllm-encode"].startswith("remote:"), r.text
    handed = services["cache"] / image_uuid(image_hash(data)) / "encoder_cache.safetensors"
    stored = load_file(handed)["ec_cache"]
    model = Blip2ForConditionalGeneration.from_pretrained(services["model"]).eval()
    pixels = BlipImageProcessorPil.from_pretrained(services["model"])

    def embedding(png: bytes) -> torch.Tensor:
        px = pixels(Image.open(io.BytesIO(png)).convert("RGB"), return_tensors="pt").pixel_values
        with torch.no_grad():
            return model.get_image_features(pixel_values=px).pooler_output[0]

    ref, other = embedding(data), embedding(_png(6))
    assert stored.shape == ref.shape  # 8 query tokens x the language model's width
    scale = ref.abs().max().item()
    # The engine runs the tower in its own dtype: equal up to that dtype's rounding, and far from
    # another image's embedding.
    assert (stored.float() - ref).abs().max().item() < 0.02 * scale
    assert (stored.float() - other).abs().max().item() > 0.2 * scale


@pytest.mark.parametrize(
    ("image_url", "status", "needle"),
    [
        ("data:image/png;base64,!!!", 400, "not valid base64"),
        ("data:image/png,rawbytes", 400, "base64"),
        ("ftp://example.com/a.png", 400, "scheme 'ftp'"),
        ("file:///etc/passwd", 400, "outside the allowed media folders"),
        ("BROKEN", 400, "cannot be decoded"),
        ("TRAVERSAL", 400, "outside the allowed media folders"),
        ("LINK", 400, "outside the allowed media folders"),
        ("http://127.0.0.1:9/x.png", 400, "cannot fetch the image"),
    ],
)
def test_hostile_images_are_400s_naming_the_reason(services, media, image_url, status, needle):
    if image_url == "BROKEN":
        image_url = (media / "broken.png").as_uri()
    elif image_url == "TRAVERSAL":
        image_url = "file://" + str(media) + "/../../../etc/hostname"
    elif image_url == "LINK":
        link = media / "escape.png"
        if not link.exists():
            os.symlink("/etc/hostname", link)
        image_url = link.as_uri()
    r = _chat(services["agg"], image_url)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_too_many_images_and_text_only_models(services, media, agg_service):
    r = _chat(services["agg"], [_data_uri(_png(0))] * 3)
    assert r.status_code == 400 and "3 images" in r.json()["error"]["message"]
    text_url, _ = agg_service  # the tiny text model, served as "tiny" too
    r = _chat(text_url, _data_uri(_png(0)))
    assert r.status_code == 400 and "model 'tiny' takes text only" in r.json()["error"]["message"]
    assert httpx.get(services["agg"] + "/health").status_code == 200  # still serving


def test_private_addresses_are_refused_by_default(vision_model, media, image_server, tmp_path):
    """Without --allow-private-media-urls a URL to a loopback server is refused (no fetch)."""
    import asyncio

    from dynvllm.frontend.media import MediaPolicy, fetch
    from dynvllm.frontend.openai.schema import APIError

    with pytest.raises(APIError, match="non-public address"):
        asyncio.run(fetch(image_server + "/img0.png", MediaPolicy()))


def test_role_conflicts_are_refused_at_start_up(tiny_model, vision_model, tmp_path):
    port = free_port()
    enc_text = start_service(
        ["serve", "agg"],
        tmp_path / "a.log",
        "--roles",
        "agg=1,encode=1",
        model=tiny_model,
        engine_args=(),
        http_port=port,
    )
    assert enc_text.p.wait(60) == 2
    assert "the encode role needs a multimodal model" in enc_text.tail()
    only_enc = start_service(
        ["serve", "agg"],
        tmp_path / "b.log",
        "--roles",
        "encode=1",
        model=vision_model,
        engine_args=(),
        http_port=port,
    )
    assert only_enc.p.wait(60) == 2
    assert "no role of the topology (encode=1) ends a request" in only_enc.tail()
    joiner = start_service(
        ["serve", "encode"],
        tmp_path / "c.log",
        model=vision_model,
        engine_args=(),
        nats_url="nats://127.0.0.1:1",
        http=False,
    )
    assert joiner.p.wait(60) == 2
    assert "needs --encoder-cache-dir" in joiner.tail()


def test_router_keys_images_as_the_engine_does(services):
    """The router's predicted cached tokens vs vLLM's reported ones, images in the block keys:
    the same text with another image shares nothing, the same image again shares every full
    block; once the router's own predictions expire, the worker's relayed events (keyed from
    vLLM's `extra_keys`) give the same count."""
    import time

    url = services["agg"]
    text = " ".join(["which colours and shapes can be seen in the picture"] * 6)

    def ask(seed: int) -> tuple[int, int, int]:
        r = _chat(url, _data_uri(_png(seed)), text)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return int(r.headers["x-dynvllm-predicted-cached-tokens"]), cached, usage["prompt_tokens"]

    assert ask(20)[:2] == (0, 0)
    assert ask(21)[:2] == (0, 0)  # same text, another image: no shared prefix, in vLLM either
    time.sleep(11)  # the router's predictions of those two (--router-predict-ttl 10) expire
    for seed in (20, 21):  # each image again: now known from the worker's events alone
        predicted, reported, prompt = ask(seed)
        assert reported > 0 and prompt > 64
        # vLLM recomputes a whole last block when the prompt fills it exactly.
        assert predicted == reported or (prompt % 32 == 0 and predicted == reported + 32)
