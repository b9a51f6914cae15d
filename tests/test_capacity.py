"""The row cap: a constant on the CPU, measured from the decode step's cost on a GPU."""

from __future__ import annotations

from service.scheduler.capacity import CPU_ROWS, choose_row_cap, default_row_cap, measure_step_ms


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
