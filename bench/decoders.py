"""Pages/s with this process's decoder versus a vLLM server's, side by side, through the served path.

Both decoders serve the same model through the same app and scheduler (``create_app`` in-process,
closed-loop clients); only ``RTPRUNE_DECODER`` differs. For each concurrency and retention, the two
runs follow each other (order alternating), so the machine's drift hits both alike. Positions are
compact in both (the only scheme vLLM can decode), so the text is the same.

On a GPU, with the full-size random-weight architecture:

    python -m bench.decoders --write-checkpoint /data/random-full          # once: 6.7 GB, v1 layout
    vllm serve /data/random-full --served-model-name random-full --enable-prompt-embeds \\
        --limit-mm-per-prompt '{"image":0}' --no-enable-prefix-caching --gpu-memory-utilization 0.5 \\
        --logits_processors vllm.model_executor.models.deepseek_ocr:NGramPerReqLogitsProcessor &
    python -m bench.decoders --model /data/random-full --vllm-url http://127.0.0.1:8000 --device cuda \\
        --out bench/results/decoders_h100.json

On CPU (checks the script; tiny pages are too small to say anything about speed):

    python -m bench.decoders --model tiny --vllm-url http://127.0.0.1:8200 --concurrency 1,4 --pages 8
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from bench.batching import page_png, percentile, served
from bench.common import machine_label, write_json
from service.engine import OCREngine
from service.engine.decode.vllm_decoder import VllmServer
from service.settings import ServiceSettings


async def closed_loop(engine: OCREngine, decoder: str, concurrency: int, pages: int, form: dict) -> dict:
    settings = ServiceSettings(
        model=engine.name,
        log_json=False,
        warmup=False,
        decoder=decoder,
        vllm_url=engine.decoder.url if engine.decoder else None,
        max_batch_size=max(concurrency, 1),
        queue_size=max(256, concurrency),
        request_timeout_s=3600,
    )
    png = page_png()
    latencies: list[float] = []
    async with served(engine, settings, timeout_s=3600) as client:
        remaining = pages
        started = time.perf_counter()

        async def user() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                sent = time.perf_counter()
                response = await client.post("/v1/ocr", files={"file": ("p.png", png)}, data=form)
                response.raise_for_status()
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*[user() for _ in range(concurrency)])
        wall = time.perf_counter() - started
    return {
        "decoder": decoder,
        "concurrency": concurrency,
        "retention": form["retention"],
        "pages": pages,
        "wall_s": wall,
        "pages_per_s": pages / wall,
        "p50_s": percentile(latencies, 0.5),
        "p95_s": percentile(latencies, 0.95),
    }


def write_checkpoint(out: Path, device: str, dtype: str) -> None:
    """The full-size random-weight model in the official layout, for a vLLM server to load."""
    from service.engine.weights.presets import reference_config, save_v1_checkpoint

    engine = OCREngine.load("random-full", device=device, dtype=dtype)
    raw = reference_config()
    raw["_name_or_path"] = "rtprune-ocr/random-full"
    save_v1_checkpoint(engine.model.model, raw, out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="preset or checkpoint directory (vLLM must serve the same)")
    parser.add_argument("--vllm-url", help="the vLLM server decoding the same checkpoint")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--mode", default="base")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--retentions", default="1.0,0.8425")
    parser.add_argument("--pages", type=int, default=64, help="pages per run")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--write-checkpoint", type=Path, help="write random-full to this directory and exit")
    parser.add_argument("--out", default="bench/results/decoders.json")
    args = parser.parse_args()
    if args.write_checkpoint:
        write_checkpoint(args.write_checkpoint, args.device or "cpu", args.dtype or "bf16")
        return
    if not args.vllm_url:
        parser.error("--vllm-url is required (a vLLM server serving --model)")
    local = OCREngine.load(args.model, device=args.device, dtype=args.dtype)
    server = VllmServer(args.vllm_url)
    server.connect(wait_s=60)
    remote = OCREngine(local.model, server)  # the same weights on this side; only the decoding moves
    local.warmup()
    remote.warmup()
    label = f"{machine_label(local.device)}, model {args.model}, mode {args.mode}, {args.pages} pages per run"
    print(f"# {label}\n{'c':>3} {'ret':>7} {'decoder':>12} {'pages/s':>8} {'p50 s':>7} {'p95 s':>7}")
    records = []
    for index, (concurrency, retention) in enumerate(
        (int(c), r) for c in args.concurrency.split(",") for r in args.retentions.split(",")
    ):
        form = {
            "mode": args.mode,
            "retention": retention,
            "positions": "compact",
            "max_new_tokens": str(args.max_new_tokens),
        }
        order = [("transformers", local), ("vllm", remote)]
        runs = {}
        for name, engine in order if index % 2 == 0 else order[::-1]:
            runs[name] = asyncio.run(closed_loop(engine, name, concurrency, args.pages, form))
        for name in ("transformers", "vllm"):
            run = runs[name]
            ratio = f" | vllm x{run['pages_per_s'] / runs['transformers']['pages_per_s']:.2f}" if name == "vllm" else ""
            print(
                f"{concurrency:>3} {retention:>7} {name:>12} {run['pages_per_s']:>8.2f} "
                f"{run['p50_s']:>7.2f} {run['p95_s']:>7.2f}{ratio}"
            )
            records.append(run)
    write_json(args.out, {"machine": label, "args": vars(args) | {"write_checkpoint": None}, "records": records})


if __name__ == "__main__":
    main()
