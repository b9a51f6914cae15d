"""The clients users already have, installed from the package index and used with their defaults against a
real uvicorn serving `tiny`: Mistral's SDK, OpenAI's, LiteLLM's. No request is shaped by hand here."""

from __future__ import annotations

import io
import json
import os
import subprocess

import httpx
import openai
import pytest
from mistralai.client import Mistral
from mistralai.client.errors import HTTPValidationError

from service.api.app import create_app
from service.settings import ServiceSettings
from tests.helpers import data_url, live_server, text_page, text_pdf

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM reads its price list from disk, not the web
PAGE = text_page((600, 800))
PDF = text_pdf(4, lines=3)


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE_URL = data_url(png(PAGE), "image/png")
PDF_URL = data_url(PDF, "application/pdf")
FAST = {"mode": "tiny"}  # rtprune's own knobs, as extra fields


@pytest.fixture(scope="module")
def server(tiny_engine):
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False)
    with live_server(create_app(settings, load_engine=lambda: tiny_engine)) as base:
        yield base


ANSWERS: list = []  # the raw HTTP answers Mistral's SDK got (its models drop our `rtprune` field)


@pytest.fixture(scope="module")
def mistral(server):
    import httpx2  # the SDK's own HTTP client, with a hook that keeps each answer

    def keep(response) -> None:
        response.read()
        ANSWERS.append(response)

    return Mistral(api_key="unused", server_url=server, client=httpx2.Client(event_hooks={"response": [keep]}))


def rtprune_warnings() -> list[str]:
    """The warnings of the SDK's last answer."""
    return ANSWERS[-1].json()["rtprune"]["warnings"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def image_message(text: str = "Free OCR.") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": IMAGE_URL}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


# --- Mistral's SDK ------------------------------------------------------------------------------------------


def test_mistral_sdk_ocr_process_works_with_its_defaults(mistral):
    """`ocr.process` always sends include_blocks=true: accepted, and named in a warning."""
    response = mistral.ocr.process(
        model="mistral-ocr-latest", document={"type": "image_url", "image_url": IMAGE_URL}
    )
    assert len(response.pages) == 1 and response.pages[0].index == 0
    assert response.pages[0].dimensions.width == 600 and response.usage_info.pages_processed == 1
    assert response.model == "tiny"  # the model that ran, not the id the client sent
    warnings = rtprune_warnings()
    assert any(w.startswith("include_blocks has no effect here") for w in warnings), warnings


def test_mistral_sdk_string_page_ranges_are_0_based(mistral):
    response = mistral.ocr.process(
        model="any", document={"type": "document_url", "document_url": PDF_URL}, pages="0,2-3", image_limit=2
    )
    assert [p.index for p in response.pages] == [0, 2, 3]
    assert any(w.startswith("image_limit has no effect") for w in rtprune_warnings())


def test_mistral_sdk_image_url_as_an_object(mistral):
    response = mistral.ocr.process(
        model="any", document={"type": "image_url", "image_url": {"url": IMAGE_URL}}, include_blocks=False
    )
    assert response.pages[0].dimensions.height == 800
    assert not any("include_blocks" in w for w in rtprune_warnings())  # false asks nothing


def test_mistral_sdk_reads_why_a_request_cannot_be_honoured(mistral):
    """A 422 in the shape Mistral's SDK parses (FastAPI's `detail`), with a sentence that says why."""
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with pytest.raises(HTTPValidationError) as refused:
        mistral.ocr.process(
            model="any", document={"type": "image_url", "image_url": IMAGE_URL}, document_annotation_format=schema
        )
    assert refused.value.status_code == 422
    (detail,) = refused.value.data.detail
    assert detail.loc == ["body", "document_annotation_format"]
    assert "annotations need a model that follows a JSON schema" in detail.msg
    with pytest.raises(HTTPValidationError) as backwards:
        mistral.ocr.process(model="any", document={"type": "document_url", "document_url": PDF_URL}, pages="3-1")
    assert "runs backwards" in backwards.value.data.detail[0].msg
    with pytest.raises(HTTPValidationError) as beyond:
        mistral.ocr.process(model="any", document={"type": "document_url", "document_url": PDF_URL}, pages="2-99999")
    message = beyond.value.data.detail[0].msg  # one short sentence, not 99,996 page numbers
    assert message == "pages 4, 5, 6, 7, 8 and 99991 more are outside the document's 4 pages (0-based)", message
    with pytest.raises(HTTPValidationError) as stored:
        mistral.ocr.process(model="any", document={"type": "file", "file_id": "f-1"})
    assert "send the document inline" in stored.value.data.detail[0].msg


# --- OpenAI's client ----------------------------------------------------------------------------------------

NEUTRAL = {
    "user": "docling",
    "metadata": {"job": "42"},
    "store": False,
    "stop": [],
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logprobs": False,
    "response_format": {"type": "text"},
    "seed": 7,
    "temperature": 0,
    "top_p": 1,
    "n": 1,
}


@pytest.mark.parametrize(("field", "value"), NEUTRAL.items())
def test_openai_neutral_fields_that_frameworks_send_are_accepted(client, field, value):
    completion = client.chat.completions.create(
        model="gpt-4o", messages=image_message(), max_tokens=2, extra_body={"rtprune": FAST}, **{field: value}
    )
    assert completion.usage.completion_tokens == 2
    assert completion.model == "tiny"  # any id is accepted; the answer names the model that ran


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("frequency_penalty", 0.5, "penalties are not supported"),
        ("stop", ["\n\n"], "stop sequences are not supported"),
        ("logprobs", True, "logprobs are not returned"),
        ("response_format", {"type": "json_object"}, "only response_format type text"),
        ("store", True, "not stored"),
        ("temperature", 0.7, "decoding is greedy"),
    ],
)
def test_openai_a_value_that_cannot_be_honoured_is_a_typed_400_naming_the_field(client, field, value, needle):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=image_message(), max_tokens=2, **{field: value})
    error = refused.value
    assert error.status_code == 400 and error.type == "invalid_request_error" and error.param == field
    assert needle in error.message


def test_openai_invalid_knob_reads_as_a_sentence_with_its_param(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny", messages=image_message(), max_tokens=2, extra_body={"rtprune": {"retention": 1.5}}
        )
    body = refused.value.body
    assert refused.value.param == "rtprune.retention"
    assert body["message"] == "retention must be a number in (0, 1] or 'auto'; got 1.5"
    with pytest.raises(openai.BadRequestError) as misspelt:
        client.chat.completions.create(model="tiny", messages=image_message(), extra_body={"max_token": 2})
    assert misspelt.value.param == "max_token" and "did you mean `max_tokens`?" in misspelt.value.message


def test_openai_models_retrieve_and_list(client):
    (listed,) = client.models.list().data
    model = client.models.retrieve("tiny")
    assert model.id == listed.id == "tiny" and model.created == listed.created > 1_700_000_000
    assert client.models.retrieve("gpt-4o").id == "gpt-4o"  # chat accepts any id: so does retrieve


@pytest.mark.parametrize("skip", [True, False])
def test_openai_one_request_one_text_streamed_or_plain(client, skip):
    """With skip_special_tokens (what docling sends) or without, the stream adds up to the plain answer."""
    asked = {"max_tokens": 12, "extra_body": {"rtprune": FAST, "skip_special_tokens": skip}}
    plain = client.chat.completions.create(model="tiny", messages=image_message(), **asked)
    chunks = list(client.chat.completions.create(model="tiny", messages=image_message(), stream=True, **asked))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content


def test_one_text_when_the_output_has_grounding_tags(tiny_engine):
    """Random weights seldom write special tokens, so the rule is checked on a grounded answer's tokens:
    the plain message and the stream decode them the same way (tags dropped with skip_special_tokens)."""
    from service.api.chat import Reply
    from service.engine import PageResult

    tokenizer = tiny_engine.model.tokenizer
    text = "<|ref|>title<|/ref|><|det|>[[10, 20, 300, 40]]<|/det|>\n# Title"
    tokens = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    for skip, expected in [(True, "title[[10, 20, 300, 40]]\n# Title"), (False, text)]:
        reply = Reply("tiny", tiny_engine.detokenizer(skip))
        page = PageResult.model_construct(text=text)
        page._tokens = tokens
        streamed, shown = "", 0
        for i in range(1, len(tokens) + 1):
            delta, shown = reply.delta(tokens[:i], shown)
            streamed += delta
        assert reply.text(page.tokens) == streamed == expected


def test_the_401_names_both_ways_to_send_the_key_and_challenges_with_bearer(tiny_engine):
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False, api_key="s3cret")
    with live_server(create_app(settings, load_engine=lambda: tiny_engine)) as base:
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        assert refused.value.type == "authentication_error"
        assert "Authorization: Bearer" in refused.value.message and "X-API-Key" in refused.value.message
        assert refused.value.response.headers["www-authenticate"].startswith("Bearer")


# --- LiteLLM's SDK --------------------------------------------------------------------------------------------


def test_litellm_completion_through_the_openai_provider(server):
    import litellm

    response = litellm.completion(
        model="openai/deepseek-ocr",
        api_base=f"{server}/v1",
        api_key="unused",
        messages=image_message(),
        max_tokens=3,
        user="someone",
        extra_body={"rtprune": FAST},
    )
    assert response.usage.completion_tokens == 3 and response.choices[0].message.content


def test_litellm_ocr_through_the_mistral_provider(server):
    import litellm

    response = litellm.ocr(
        model="mistral/mistral-ocr-latest",
        api_base=f"{server}/v1",
        api_key="unused",
        document={"type": "document_url", "document_url": PDF_URL},
        pages=[1],
        image_limit=0,
    )
    assert [p.index for p in response.pages] == [1]


def test_an_unknown_field_on_the_form_names_the_expected_one(server):
    refused = httpx.post(f"{server}/v1/ocr", files={"image": ("p.png", png(PAGE))}, timeout=60).json()["error"]
    assert refused["message"] == "`image` is not a field of this request; did you mean `file`?"
    assert refused["param"] == "image" and refused["type"] == "invalid_request_error"


def test_langchain_chat_openai_with_a_system_instruction_and_an_image(server):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model="deepseek-ocr", base_url=f"{server}/v1", api_key="unused", max_tokens=4, temperature=0)
    messages = [
        SystemMessage("Convert the document to markdown."),
        HumanMessage(content=[{"type": "image_url", "image_url": {"url": IMAGE_URL}}]),
    ]
    answer = chat.invoke(messages)
    streamed = "".join(chunk.content for chunk in chat.stream(messages))
    expected = httpx.post(
        f"{server}/v1/ocr", files={"file": ("p.png", png(PAGE))}, data={"task": "markdown", "max_new_tokens": "4"}
    ).json()["pages"][0]["text"]
    assert answer.content == streamed == expected
    assert answer.usage_metadata["output_tokens"] == 4


NODE_CLIENT = os.environ.get("RTPRUNE_NODE_CLIENT_DIR")  # a folder with node_modules/openai (.ci/run makes one)


def test_openai_node_client_with_a_system_instruction_streamed_with_usage(server):
    if not NODE_CLIENT:
        reason = "set RTPRUNE_NODE_CLIENT_DIR to a folder where `npm install openai` ran (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    script = os.path.join(os.path.dirname(__file__), "clients", "openai_node.cjs")
    env = {**os.environ, "NODE_PATH": os.path.join(NODE_CLIENT, "node_modules")}
    done = subprocess.run(
        ["node", script, server, IMAGE_URL], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["plain"] == answer["streamed"] and answer["usage"]["completion_tokens"] == 4
    assert answer["model"] == "deepseek-ocr"
