"""The Playground's routes and files, without a browser or a model (a bare FastAPI app)."""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.testclient import TestClient

from starchat.chat_template import SYSTEM_PROMPTS
from starchat.server.playground import STATIC_DIR, mount_playground
from starchat.server.settings import ServerSettings

VENDORED = ("marked.min.js", "purify.min.js", "highlight.min.js", "highlight-github.min.css")


def client_for(settings: ServerSettings) -> TestClient:
    app = FastAPI()
    mount_playground(app, settings)
    return TestClient(app)


def test_page_is_served_with_a_strict_content_security_policy():
    client = client_for(ServerSettings(served_model_name="starchat-test"))
    response = client.get("/playground")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert client.get("/playground/", follow_redirects=False).status_code in (307, 308)


def test_every_file_the_page_links_is_served_locally():
    client = client_for(ServerSettings(served_model_name="starchat-test"))
    html = client.get("/playground").text
    links = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert links and all(link.startswith("playground/static/") for link in links), links  # no CDN
    for link in links:
        assert client.get("/" + link).status_code == 200, link
    for module in ("playground-api.js", "playground-markdown.js", "playground-settings.js"):
        assert client.get(f"/playground/static/{module}").status_code == 200
    assert "fonts.googleapis" not in (STATIC_DIR / "playground.css").read_text()


def test_vendored_libraries_are_present_and_licensed():
    licenses = (STATIC_DIR / "vendor" / "LICENSES.md").read_text(encoding="utf-8")
    for name in VENDORED:
        assert (STATIC_DIR / "vendor" / name).stat().st_size > 1000, name
        assert f"`{name}`" in licenses, name
    for text in ("MIT", "Apache License", "BSD 3-Clause"):
        assert text in licenses


def test_config_tells_the_page_about_auth_prompts_and_defaults_but_nothing_secret():
    open_config = client_for(ServerSettings(served_model_name="starchat-test")).get("/playground/config.json").json()
    assert open_config["auth_required"] is False
    assert open_config["system_prompts"] == SYSTEM_PROMPTS
    assert open_config["default_system_prompt"] in SYSTEM_PROMPTS
    assert open_config["generation_defaults"] == {"temperature": 0.2, "top_p": 0.95, "top_k": 50, "max_tokens": 512,
                                                  "repetition_penalty": 1.2, "seed": None}

    settings = ServerSettings(model="/srv/models/private-checkpoint", api_key="s3cret")
    response = client_for(settings).get("/playground/config.json")
    assert response.json()["auth_required"] is True
    assert "s3cret" not in response.text and "private-checkpoint" not in response.text
