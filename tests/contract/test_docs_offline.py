"""Issue 18 item 6: /docs, where keys are pasted, serves Swagger UI from the service itself
and works offline: the page references no other host, and a browser that may reach
nothing but the service renders it, Authorize button included."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from .live import LiveApi, spawn_api, stop

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def docs_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    from app.config import Settings
    from app.migrate import upgrade

    settings = Settings(_env_file=None, STATE_DIR=tmp_path_factory.mktemp("docs"))
    upgrade(settings.database_url)
    live, proc = spawn_api(settings)
    try:
        yield live
    finally:
        stop(proc)


def test_the_docs_page_references_no_other_host(docs_api: LiveApi) -> None:
    page = httpx.get(f"{docs_api.url}/docs", timeout=10)
    assert page.status_code == 200
    html = page.text
    assert "SwaggerUIBundle" in html
    assert not re.search(r"(https?:)?//", html), "the page names another host"
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(assets) == 3, assets  # the script, the stylesheet, the icon
    for asset in assets:
        assert asset.startswith("/static/swagger/"), asset
        answer = httpx.get(f"{docs_api.url}{asset}", timeout=10)  # no key needed
        assert answer.status_code == 200 and len(answer.content) > 100, asset
    # The validator badge would send the schema's URL to validator.swagger.io.
    assert '"validatorUrl": null' in html
    # ReDoc (a CDN page) is not offered.
    assert httpx.get(f"{docs_api.url}/redoc", timeout=10).status_code == 404


def test_the_docs_render_in_a_browser_that_reaches_nothing_else(docs_api: LiveApi) -> None:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: scripts/setup.sh installs it with apt-get")
    sync_api = pytest.importorskip("playwright.sync_api")
    service = urlsplit(docs_api.url).netloc
    elsewhere: list[str] = []

    def only_the_service(route: Any) -> None:
        if urlsplit(route.request.url).netloc == service:
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            page.route("**/*", only_the_service)
            page.goto(f"{docs_api.url}/docs")
            page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
            title = page.inner_text(".swagger-ui .info .title")
            assert page.locator(".swagger-ui .btn.authorize").count() == 1
            assert page.locator(".swagger-ui .opblock").count() > 10  # the operations
        finally:
            browser.close()
    assert "CNN training and inference service" in title
    assert elsewhere == []
