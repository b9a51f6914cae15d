"""The row cap: a constant on the CPU, measured from the decode step's cost on a GPU."""

from __future__ import annotations

from service.scheduler.capacity import CPU_ROWS, VLLM_ROWS, choose_row_cap, default_row_cap, measure_step_ms


def test_the_cap_is_the_most_rows_whose_step_stays_within_twice_one_rows():
    flat_then_steep = {1: 5.0, 8: 5.2, 32: 5.6, 64: 6.5, 128: 9.5, 256: 21.0}  # a GPU's shape: flat, then bound
    cap, curve = choose_row_cap(flat_then_steep.__getitem__, kv_budget=None)
    assert cap == 128 and set(curve) == set(flat_then_steep)


def test_the_kv_budget_bounds_the_cap():
    cap, curve = choose_row_cap(lambda rows: 5.0, kv_budget=40 * 1024)  # 40 rows of a typical width
    assert cap == 32 and max(curve) == 32  # larger batches are not even measured


def test_a_cpus_steps_grow_with_the_rows_so_its_cap_stays_small():
    cap, _ = choose_row_cap(lambda rows: 3.0 * rows, kv_budget=None)
    assert cap == 1


def test_the_cpu_keeps_its_constant_and_the_measurement_runs_on_any_device(tiny_engine):
    assert default_row_cap(tiny_engine, kv_budget=None) == CPU_ROWS
    assert measure_step_ms(tiny_engine, rows=3, width=32) > 0


def test_pages_decoding_on_vllm_take_vllms_limits_and_nothing_is_measured_locally(preset_cache):
    """The vLLM decoder releases the local decoder layers: a step timed through them cannot run, so the cap
    must come from vLLM's side (its default max_num_seqs), on any device."""
    import pytest

    from service.engine import OCREngine

    loaded = OCREngine.load("tiny", device="cpu", cache_dir=preset_cache)
    loaded.model.release_decoder_layers()
    on_vllm = OCREngine(loaded.model, decoder=object())
    with pytest.raises(AttributeError):  # what a measurement meets: the cache has no layers to fill
        measure_step_ms(on_vllm, rows=1, width=8)
    assert default_row_cap(on_vllm, kv_budget=None) == VLLM_ROWS != CPU_ROWS
