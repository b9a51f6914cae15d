"""Upload bytes -> a :class:`Document` of pages, with the limits a public service needs.

Images: PNG, JPEG, WebP, TIFF, BMP, GIF (first frame), EXIF orientation applied later by
preprocessing. PDFs: rendered page by page with pypdfium2 (Apache-2.0/BSD) at 144 DPI,
like the official scripts. The pixel limit is checked from the header (a PDF page's size
from its page box), before any pixel is decoded, so a decompression bomb costs nothing.

PDF pages are rendered **lazily**, when the scheduler is about to run them, so a long
document does not hold every rendered page in memory while it waits. PDFium is not
thread-safe (concurrent renders crash the process or return blank pages), so every call
into it holds :data:`PDFIUM_LOCK`: request threads that open and measure a PDF and the
scheduler that renders its pages take turns.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
import threading
import warnings
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from service.errors import InvalidParameter, PayloadTooLarge, UploadError

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")
PDF_DPI = 144
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_PDF_PAGES = 50


class PageRangeOutside(UploadError):
    """A page range past the document's end; ``n_pages`` is how many pages it has (a door that numbers pages
    otherwise, e.g. 0-based, says it in its own terms)."""

    def __init__(self, status: int, code: str, message: str, n_pages: int = 0) -> None:
        super().__init__(status, code, message)
        self.n_pages = n_pages


PDFIUM_LOCK = threading.Lock()  # every pypdfium2 call in this process holds it
# Decoding an image holds all its pixels (160 MB for 40 megapixels in RGBA): sixteen uploads checked at once
# would hold 2.5 GB. At most this many decode at once in the process; the others wait their turn.
DECODE_SLOTS = threading.BoundedSemaphore(2)


@dataclass
class Document:
    """The pages of one upload, in order; ``page(i)`` gives the i-th as a PIL image.

    ``numbers`` are the pages' 1-based numbers in the uploaded file (a PDF page range
    starts later than 1); ``pixels`` each page's size in pixels as it will be decoded or rendered.
    Nothing is held decoded while the document waits: an uploaded image keeps its encoded bytes
    (checked once when it arrived) and is decoded again when its page is taken, PDF pages render
    on demand. (Images made in memory, by tests and benchmarks, are kept as they are.)
    """

    numbers: list[int]
    _images: list[Image.Image] = field(default_factory=list, repr=False)
    _pdf: bytes | None = field(default=None, repr=False)
    _encoded: bytes | None = field(default=None, repr=False)
    pixels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.pixels and self._images:
            self.pixels = [image.width * image.height for image in self._images]

    def __len__(self) -> int:
        return len(self.numbers)

    def page(self, index: int) -> Image.Image:
        if self._pdf is not None:
            return render_pdf_page(self._pdf, self.numbers[index] - 1)
        if self._encoded is not None:
            return _open_image(self._encoded, max_pixels=self.pixels[index])
        return self._images[index]

    def select(self, positions: list[int]) -> Document:
        """The same upload restricted to some of its pages (0-based positions, in the order given)."""
        images = [self._images[p] for p in positions] if self._images else []
        pixels = [self.pixels[p] for p in positions] if self.pixels else []
        return Document([self.numbers[p] for p in positions], images, self._pdf, self._encoded, pixels)

    def pages(self) -> list[Image.Image]:
        """Every page at once (the CLI and the evaluation harness; the service renders lazily)."""
        return [self.page(i) for i in range(len(self))]


def render_pdf_page(data: bytes, index: int) -> Image.Image:
    """Render one page (0-based) at :data:`PDF_DPI`; the document is opened for this page only."""
    import pypdfium2 as pdfium

    with PDFIUM_LOCK:
        pdf = pdfium.PdfDocument(data)
        try:
            bitmap = pdf[index].render(scale=PDF_DPI / 72)
            try:
                return bitmap.to_pil().convert("RGB")  # a copy that owns its pixels
            finally:
                bitmap.close()
        except pdfium.PdfiumError as exc:
            raise UploadError(422, "corrupt_file", f"PDF page {index + 1} could not be rendered: {exc}") from None
        finally:
            pdf.close()


PageRange = tuple[int, int | None]  # 1-based, inclusive; None: to the end
PAGE_RANGE = re.compile(r"^\s*\d{1,5}\s*(-\s*\d{0,5}\s*)?$")  # '3', '2-5', '2-' (whitespace allowed)
PAGE_RANGE_HELP = "a page or a range of pages, 1-based: '3', '2-5' or '2-' (to the end)"


def parse_page_range(text: str) -> PageRange:
    """A PDF page range as the form and the CLI write it; ValueError (one sentence) if it is not one."""
    if not PAGE_RANGE.match(text):
        raise ValueError(f"pages must be {PAGE_RANGE_HELP}; got {text[:40]}")
    first, dash, last = "".join(text.split()).partition("-")
    if not dash:  # a single page
        return int(first), int(first)
    return int(first), int(last) if last else None


def is_pdf(data: bytes) -> bool:
    return data[:1024].lstrip().startswith(b"%PDF")


def open_document(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_pdf_pages: int = DEFAULT_MAX_PDF_PAGES,
    max_document_pixels: int | None = None,
    page_range: tuple[int, int | None] | None = None,
    selection: list[tuple[int, int]] | None = None,
) -> Document:
    """Check an upload and make it a :class:`Document` (1-based inclusive ``page_range`` for PDFs, or a
    ``selection`` of such ranges, sorted and apart: only the pages selected count against the limits).

    Every limit is checked here, before any PDF page is rendered."""
    if not data:
        raise UploadError(422, "empty_file", "the file is empty")
    if is_pdf(data):
        numbers, pixels = _measure_pdf(
            data,
            max_pixels=max_pixels,
            max_pages=max_pdf_pages,
            max_total=max_document_pixels,
            page_range=page_range,
            selection=selection,
        )
        return Document(numbers, _pdf=data, pixels=pixels)
    if page_range not in (None, (1, 1), (1, None)):
        raise UploadError(422, "invalid_page_range", "a page range applies to PDFs only; an image has one page")
    image = _open_image(data, max_pixels=max_pixels)  # every check, the pixels decoded once ...
    size = image.width * image.height
    image.close()  # ... and dropped: a queued page holds its encoded bytes only
    return Document([1], _encoded=data, pixels=[size])


def _open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Open, check the size from the header, then decode; every failure is an UploadError (4xx)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise UploadError(
            415,
            "unsupported_media_type",
            f"not a supported image or PDF; send one of {', '.join(IMAGE_FORMATS)} or PDF",
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(413, "image_too_large", "the image is a decompression bomb (too many pixels)") from None
    except Exception as exc:  # a header PIL recognised but cannot parse (truncated, bad chunk, depth 0, ...)
        raise _corrupt(data, exc) from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise UploadError(
            413,
            "image_too_large",
            f"the image has {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}",
        )
    try:
        with DECODE_SLOTS, warnings.catch_warnings():  # a few full decodes at a time, whatever the traffic
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.seek(0)
            image.load()
    except Exception as exc:  # PIL raises many types for truncated or corrupt pixel data
        raise _corrupt(data, exc, image.format) from None
    return image


def _corrupt(data: bytes, exc: Exception, image_format: str | None = None) -> UploadError:
    """A 422 that names the format and the problem (PIL's message, which never echoes the data)."""
    kind = image_format or _sniff_format(data)
    detail = str(exc).strip() or type(exc).__name__
    return UploadError(422, "corrupt_file", f"the {kind} image could not be decoded: {detail[:200]}")


def _sniff_format(data: bytes) -> str:
    signatures = {
        b"\x89PNG": "PNG",
        b"\xff\xd8": "JPEG",
        b"RIFF": "WebP",
        b"II*\x00": "TIFF",
        b"MM\x00*": "TIFF",
        b"BM": "BMP",
        b"GIF8": "GIF",
    }
    return next((name for magic, name in signatures.items() if data.startswith(magic)), "file's")


def _measure_pdf(
    data: bytes,
    *,
    max_pixels: int,
    max_pages: int,
    max_total: int | None = None,
    page_range: tuple[int, int | None] | None,
    selection: list[tuple[int, int]] | None = None,
) -> tuple[list[int], list[int]]:
    """The 1-based numbers of the pages to OCR and their pixels, after checking the range (or selection),
    page count and page sizes. Ranges are counted, never expanded, before the count is checked."""
    import pypdfium2 as pdfium

    with PDFIUM_LOCK:
        try:
            pdf = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as exc:
            raise UploadError(422, "corrupt_file", f"the PDF could not be opened: {exc}") from None
        try:
            n_pages = len(pdf)
            first, last = page_range or (1, None)
            last = n_pages if last is None else last
            ranges = [(first, last)] if selection is None else selection  # sorted and apart
            if not ranges or not 1 <= ranges[0][0] <= ranges[0][1] or ranges[-1][1] > n_pages:
                asked = f"page range {first}-{last} is" if selection is None else "pages are"
                raise PageRangeOutside(
                    422, "invalid_page_range", f"{asked} outside the document's {n_pages} pages", n_pages
                )
            count = sum(high - low + 1 for low, high in ranges)
            if count > max_pages:
                raise UploadError(
                    413,
                    "too_many_pages",
                    f"{count} pages requested; the limit is {max_pages} per request (use a page range)",
                )
            scale = PDF_DPI / 72
            total = 0
            sizes = []
            for index in (page - 1 for low, high in ranges for page in range(low, high + 1)):
                width, height = pdf[index].get_size()
                pixels = int(width * scale) * int(height * scale)
                if pixels > max_pixels:
                    raise UploadError(
                        413,
                        "image_too_large",
                        f"page {index + 1} renders to {pixels:,} pixels at {PDF_DPI} DPI; the limit is {max_pixels:,}",
                    )
                total += pixels
                sizes.append(pixels)
                if max_total is not None and total > max_total:
                    raise UploadError(
                        413,
                        "document_too_large",
                        f"pages {ranges[0][0]}-{index + 1} already render to {total:,} pixels at {PDF_DPI} DPI; "
                        f"the limit for one document is {max_total:,} (send fewer pages with a page range)",
                    )
            return [page for low, high in ranges for page in range(low, high + 1)], sizes
        except pdfium.PdfiumError as exc:
            raise UploadError(422, "corrupt_file", f"the PDF could not be read: {exc}") from None
        finally:
            pdf.close()


# --- URLs: the JSON doors (chat, Mistral) name their image by URL ------------------------------------


def bytes_of_url(url: str, max_bytes: int, allow_fetch: bool, timeout_s: float, policy=None) -> bytes:
    """The bytes a data URL holds, or an http(s) URL serves when fetching is allowed (see
    :mod:`service.outbound`: public addresses only unless allowed, no redirects, one deadline, a size
    cap). Runs in a worker thread (a fetch blocks). InvalidParameter (422) or PayloadTooLarge (413)."""
    if url.startswith("data:"):
        return _data_url_bytes(url, max_bytes)
    if url.startswith(("http://", "https://")):
        if not allow_fetch:
            raise InvalidParameter("image_url: fetching http(s) URLs is off on this server; send a data URL")
        return _fetch(url, max_bytes, timeout_s, policy)
    raise InvalidParameter("image_url must be a data URL (or http(s) where the server allows fetching)")


def _data_url_bytes(url: str, max_bytes: int) -> bytes:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise InvalidParameter("image_url: a data URL must be base64 (data:image/png;base64,...)")
    if len(payload) * 3 // 4 > max_bytes:
        raise PayloadTooLarge(f"the image exceeds the {max_bytes:,}-byte upload limit")
    try:
        return decode_base64(payload)
    except (binascii.Error, ValueError):
        raise InvalidParameter("image_url: the data URL is not valid base64") from None


def decode_base64(text: str) -> bytes:
    """Base64 as browsers and tools emit it: line-wrapped (MIME), unpadded, or in the URL-safe alphabet;
    any other character is an error."""
    text = "".join(text.split()).replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


FETCH_FAILED = "image_url could not be fetched"  # one answer for every failure: no port scanner


def _fetch(url: str, limit: int, timeout_s: float, policy) -> bytes:
    from service.outbound import OutboundRefused, OutboundTooLarge, Policy, request

    try:
        data = request(url, policy or Policy(), deadline_s=timeout_s, max_bytes=limit)
    except OutboundTooLarge:
        raise PayloadTooLarge(f"the image exceeds the {limit:,}-byte upload limit") from None
    except OutboundRefused as exc:
        log.info("image fetch refused or failed: %s", exc)
        raise InvalidParameter(FETCH_FAILED) from None
    return data
