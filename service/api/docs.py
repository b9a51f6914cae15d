"""``/docs`` served without internet: Swagger UI's assets come from the swagger-ui-bundle package.

FastAPI's default page loads them from a CDN, which leaves ``/docs`` blank on an offline or
air-gapped host, the kind of host that often runs a GPU service. ReDoc has no packaged
bundle, so ``/redoc`` is not offered.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

ASSETS = "/static/swagger"


def attach(app: FastAPI) -> None:
    """Mount the packaged assets and the page; the app must be built with ``docs_url=None``."""
    app.mount(ASSETS, StaticFiles(directory=swagger_ui_path), name="swagger")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} - API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )
