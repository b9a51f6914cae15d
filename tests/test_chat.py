"""OpenAI-compatible chat completions, driven by the official `openai` client against a real uvicorn."""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest

from service.api.app import create_app
from service.settings import ServiceSettings
from tests.helpers import live_server, stopped_before_its_budget, text_page

PAGE = text_page((600, 800))


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def messages(text: str = "Free OCR.", image=PAGE, url: str | None = None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url or data_url(image)}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


RECIPE = {  # DeepSeek-OCR's vLLM recipe, as the openai client sends it through extra_body
    "skip_special_tokens": False,
    "vllm_xargs": {"ngram_size": 30, "window_size": 90, "whitelist_token_ids": [128821, 128822]},
    "rtprune": {"mode": "tiny", "retention": 0.5},
}


@pytest.fixture(scope="module")
def server(tiny_engine):
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False)
    with live_server(create_app(settings, load_engine=lambda: tiny_engine)) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def ocr_text(server: str, **form) -> dict:
    response = httpx.post(f"{server}/v1/ocr", files={"file": ("p.png", png(PAGE))}, data=form, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["pages"][0]


def test_the_vllm_recipe_body_works_unchanged_and_matches_v1_ocr(client, server):
    completion = client.chat.completions.create(
        model="tiny", messages=messages(), max_tokens=12, temperature=0.0, extra_body=RECIPE
    )
    page = ocr_text(server, mode="tiny", task="free", retention="0.5", max_new_tokens="12")
    assert completion.choices[0].message.content == page["text"]  # the same walk, the same tokens
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 12
    assert completion.usage.prompt_tokens == page["stats"]["prompt_tokens"]  # the pruned prompt
    extra = completion.model_extra["rtprune"]
    assert extra["retention"] == 0.5 and extra["visual_tokens"] == 73


def test_streaming_sends_the_same_text_as_deltas_and_ends_with_usage(client, server):
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages(),
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=RECIPE,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ocr_text(server, mode="tiny", task="free", retention="0.5", max_new_tokens="10")["text"]
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really incremental
    *text_chunks, finish, usage = chunks  # as OpenAI: the usage chunk comes last, with no choice
    assert finish.choices[0].finish_reason == "length" and finish.usage is None
    assert usage.choices == [] and usage.usage.completion_tokens == 10
    assert all(c.usage is None for c in text_chunks)


def test_a_grounding_prompt_with_its_own_placeholder(client):
    completion = client.chat.completions.create(
        model="tiny",
        messages=messages("<image>\n<|grounding|>Convert the document to markdown."),
        max_tokens=4,
        extra_body={"rtprune": {"mode": "tiny"}},
    )
    assert completion.choices[0].message.role == "assistant" and completion.usage.completion_tokens == 4


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        ({"temperature": 0.7}, 400, "greedy"),  # 400 on the OpenAI-compatible routes, as OpenAI and vLLM answer
        ({"messages": [{"role": "user", "content": "Free OCR."}]}, 400, "no text-only request"),
        ({"messages": [*messages(), *messages()]}, 400, "roles are ['user', 'user']"),
        ({"messages": [{"role": "assistant", "content": "hi"}, *messages()]}, 400, "roles are ['assistant', 'user']"),
        ({"messages": [*messages(), {"role": "system", "content": "OCR."}]}, 400, "roles are ['user', 'system']"),
        (
            {"messages": [messages()[0], {"role": "user", "content": [messages()[0]["content"][0]] * 2}][1:]},
            400,
            "exactly one image_url part in the user turn; it has 2",
        ),
        (
            {"messages": [{"role": "system", "content": messages()[0]["content"]}, *messages()]},
            400,
            "messages[0] (system) may hold text only",
        ),
        ({"vllm_xargs": {"whitelist_token_ids": [5]}}, 400, "whitelist_token_ids"),
        ({"messages": messages(url="https://example.invalid/p.png")}, 400, "fetching http(s) URLs is off"),
        ({"rtprune": {"mode": "huge"}}, 400, "mode"),
    ],
)
def test_what_cannot_be_honoured_is_a_clear_4xx(server, change, status, needle):
    body = {"model": "tiny", "messages": messages(), "max_tokens": 2, **change}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert needle in response.text


def test_an_oversized_data_url_is_413(tiny_engine):
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False, max_upload_bytes=200_000)
    with live_server(create_app(settings, load_engine=lambda: tiny_engine)) as base:
        big = "data:image/png;base64," + base64.b64encode(b"\0" * 150_000).decode()
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}]}
        response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "upload_too_large"


def test_the_api_key_works_as_an_openai_bearer_token(tiny_engine):
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False, api_key="s3cret")
    with live_server(create_app(settings, load_engine=lambda: tiny_engine)) as base:
        assert [m.id for m in openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret").models.list().data] == ["tiny"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong").models.list()


# --- Mistral's OCR shape (what LiteLLM's OCR call sends) on /v1/ocr -----------------------------------


def test_a_litellm_shaped_ocr_request_gets_pages_with_markdown(server):
    from tests.helpers import text_pdf

    pdf = text_pdf(3, lines=3)
    url = "data:application/pdf;base64," + base64.b64encode(pdf).decode()
    body = {
        "model": "mistral-ocr-latest",
        "document": {"type": "document_url", "document_url": url},
        "pages": [0, 2],
        "include_image_base64": False,
        "rtprune": {"mode": "tiny"},
        "max_new_tokens": 6,
    }
    response = httpx.post(f"{server}/v1/ocr", json=body, timeout=60)
    assert response.status_code == 200, response.text
    out = response.json()
    assert [p["index"] for p in out["pages"]] == [0, 2]
    assert out["pages"][0]["dimensions"] == {"dpi": 144, "height": 1584, "width": 1224}
    assert out["usage_info"] == {"pages_processed": 2, "doc_size_bytes": len(pdf)}
    form = httpx.post(
        f"{server}/v1/ocr",
        files={"file": ("d.pdf", pdf)},
        data={"mode": "tiny", "pages": "3", "max_new_tokens": "6"},
        timeout=60,
    ).json()
    assert out["pages"][1]["markdown"] == form["pages"][0]["markdown"]  # the same walk as the form
    assert out["rtprune"]["pages"][1]["prompt_tokens"] == form["pages"][0]["stats"]["prompt_tokens"]


def test_the_json_shape_takes_an_image_too_and_refuses_what_it_cannot_do(server):
    url = data_url(PAGE)
    ok = httpx.post(
        f"{server}/v1/ocr",
        json={"document": {"type": "image_url", "image_url": url}, "rtprune": {"mode": "tiny"}, "max_new_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["pages"][0]["dimensions"]["width"] == 600
    bad = httpx.post(f"{server}/v1/ocr", json={"document": {"type": "image_url", "image_url": url}, "pages": [3]})
    assert bad.status_code == 422 and "outside the document" in bad.json()["error"]["message"]
    http = httpx.post(f"{server}/v1/ocr", json={"document": {"type": "document_url", "document_url": "http://x/y"}})
    assert http.status_code == 422 and "fetching http(s) URLs is off" in http.json()["error"]["message"]


def test_a_client_that_leaves_a_stream_cancels_the_work(tiny_engine):

    settings = ServiceSettings(model="tiny", log_json=False, warmup=False, random_max_new_tokens=8192)
    app = create_app(settings, load_engine=lambda: tiny_engine)
    with live_server(app) as base:
        body = {
            "messages": messages(),
            "max_tokens": 8192,
            "stream": True,
            "vllm_xargs": {"ngram_size": 0},
            "rtprune": {"mode": "tiny"},
        }
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk: the page is running
        stopped_before_its_budget(app)  # the stream's page stopped when the client left


def test_streamed_deltas_add_up_to_the_whole_text_across_multi_byte_characters(tiny_engine):
    from service.api.chat import Reply

    tokenizer = tiny_engine.model.tokenizer
    text = "Grüße — 数学 ✓ <td>x</td> naïve"
    tokens = tokenizer.encode(text, add_special_tokens=False)
    reply = Reply("tiny", tiny_engine.detokenizer(skip_special_tokens=False))
    sent, shown = [], 0
    for i in range(1, len(tokens) + 1):
        delta, shown = reply.delta(tokens[:i], shown)
        sent.append(delta)
        assert "\ufffd" not in delta
    assert "".join(sent) == tokenizer.decode(tokens) == text
    assert shown == len(tokens)


def test_the_mistral_route_refuses_an_empty_page_list_and_measures_only_the_pages_asked_for(tiny_engine):
    import base64

    from tests.helpers import client_for, text_pdf

    pdf = text_pdf(3, lines=3, size=(612, 792))  # a letter page renders to 1.9 MP at 144 DPI
    with client_for(tiny_engine, max_document_pixels=3_000_000) as (client, _):  # one page fits, three do not
        url = "data:application/pdf;base64," + base64.b64encode(pdf).decode()
        body = {"document": {"type": "document_url", "document_url": url}, "max_new_tokens": 1}
        empty = client.post("/v1/ocr", json={**body, "pages": []})
        assert empty.status_code == 422 and "pages" in empty.json()["error"]["message"]
        assert client.post("/v1/ocr", json=body).status_code == 413  # the whole document is over the budget
        one = client.post("/v1/ocr", json={**body, "pages": [1]})
        assert one.status_code == 200 and [p["index"] for p in one.json()["pages"]] == [1]


def test_a_system_instruction_before_an_image_only_user_turn_is_read_as_the_closest_task(client, server):
    """What OCR pipelines send: the instruction as a system turn, the page alone in the user turn."""
    image_only = [{"role": "user", "content": [messages()[0]["content"][0]]}]
    cases = {
        "Convert the document to markdown. Return only the markdown.": "markdown",
        "You are an OCR engine: extract all the text of the page.": "free",
    }
    for instruction, task in cases.items():
        completion = client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "system", "content": instruction}, *image_only],
            max_tokens=4,
            temperature=0,
        )
        answer = completion.model_dump()
        assert completion.choices[0].message.content == ocr_text(server, task=task, max_new_tokens="4")["text"]
        assert any(f"read as DeepSeek-OCR's {task!r} task" in w for w in answer["warnings"])
    # text parts in a developer turn, and a user turn with its own prompt: that prompt wins
    completion = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "developer", "content": [{"type": "text", "text": "Describe it."}]}, *messages()],
        max_tokens=4,
    )
    assert completion.choices[0].message.content == ocr_text(server, task="free", max_new_tokens="4")["text"]
    assert any("the system turn was not used" in w for w in completion.model_dump()["warnings"])


def test_models_retrieve_answers_for_every_id_chat_accepts(client):
    for model_id in ("tiny", "deepseek-ocr", "deepseek-ai/DeepSeek-OCR"):
        card = client.models.retrieve(model_id)
        assert card.id == model_id and card.model_dump()["root"] == "tiny"
        assert client.chat.completions.create(model=model_id, messages=messages(), max_tokens=1).model == "tiny"


def test_a_stream_past_its_deadline_ends_with_an_error_event_not_silence(tiny_engine):
    settings = ServiceSettings(
        model="tiny", log_json=False, warmup=False, request_timeout_s=1.0, random_max_new_tokens=8192
    )
    with live_server(create_app(settings, load_engine=lambda: tiny_engine)) as base:
        body = {
            "messages": messages(),
            "max_tokens": 8192,
            "stream": True,
            "rtprune": {"mode": "tiny"},
            "vllm_xargs": {"ngram_size": 0},
        }
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] != "data: [DONE]"
    error = json.loads(lines[-1].removeprefix("data: "))["error"]
    assert error["code"] == "deadline_exceeded", error
