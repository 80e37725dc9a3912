"""Each API surface reads the API key in its own scheme and refuses in its own shape (pure)."""

from __future__ import annotations

import json

from dynvllm.frontend.surface import Surface, key_matches
from dynvllm.settings import FrontendSettings, Settings
from dynvllm_plugins.surfaces.anthropic import AnthropicSurface

KEYS = [b"k1", b"k2"]
SETTINGS = Settings(frontend=FrontendSettings(max_request_bytes=1))


def test_openai_scheme_is_bearer():
    s = Surface(None, SETTINGS)  # type: ignore[arg-type]
    assert key_matches(s.presented_key({b"authorization": b"Bearer k2"}), KEYS)
    assert not key_matches(s.presented_key({b"authorization": b"Basic k2"}), KEYS)
    assert not key_matches(s.presented_key({b"x-api-key": b"k2"}), KEYS)
    assert not key_matches(s.presented_key({}), KEYS)
    denied = s.unauthorized()
    assert denied.status_code == 401 and json.loads(denied.body)["error"]["code"] == "invalid_api_key"


def test_anthropic_scheme_is_x_api_key_or_bearer():
    s = AnthropicSurface(None, SETTINGS)
    assert key_matches(s.presented_key({b"x-api-key": b"k1"}), KEYS)
    assert key_matches(s.presented_key({b"authorization": b"Bearer k1"}), KEYS)
    assert not key_matches(s.presented_key({b"x-api-key": b"nope"}), KEYS)
    body = json.loads(s.unauthorized().body)
    assert body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
    }
