import pytest

from explain.sweep import plan
from explain.sweep.prompts import parse_prompts


def test_prompt_seed_is_a_fixed_function_of_sweep_seed_and_row_id():
    # pinned: a change here would silently change every sweep's images
    assert plan.prompt_seed(0, "p1") == plan.prompt_seed(0, "p1")
    assert plan.prompt_seed(0, "p1") != plan.prompt_seed(1, "p1")
    assert plan.prompt_seed(0, "p1") != plan.prompt_seed(0, "p2")
    assert 0 <= plan.prompt_seed(123, "scene-heldout-0-00001") < 2**31
    assert plan.prompt_seed(0, "abc") == 380497770


def test_resolve_seed_prefers_the_row_then_the_protocol_then_the_hash():
    rows = parse_prompts('{"prompt": "a", "seed": 5}\n{"prompt": "b"}\n', "jsonl")
    assert plan.resolve_seed(rows[0], 0, fixed_seed=1) == 5
    assert plan.resolve_seed(rows[1], 0, fixed_seed=1) == 1
    assert plan.resolve_seed(rows[1], 0) == plan.prompt_seed(0, rows[1].id)


def test_run_order_is_a_fixed_permutation_independent_of_file_order():
    rows = parse_prompts("\n".join(f"prompt {i}" for i in range(20)), "txt")
    order = [r.id for r in plan.run_order(rows)]
    assert order == [r.id for r in plan.run_order(list(reversed(rows)))]
    assert sorted(order) == sorted(r.id for r in rows) and order != [r.id for r in rows]


@pytest.mark.parametrize("n, world", [(0, 2), (1, 2), (5, 2), (7, 3), (8, 4)])
def test_contiguous_split_covers_everything_once_like_accelerate(n, world):
    items = list(range(n))
    parts = [plan.contiguous_split(items, r, world) for r in range(world)]
    assert sum(parts, []) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    if n:
        assert len(parts[0]) >= len(parts[-1])  # the first parts take the remainder, as accelerate's


def test_many_processes_without_accelerate_say_how_to_install_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_accelerate(name, *args, **kwargs):
        if name == "accelerate" or name.startswith("accelerate."):
            raise ImportError("no accelerate")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_accelerate)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(plan.LaunchError, match=r"pip install accelerate"):
        plan.processes("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    alone = plan.processes("cpu")
    assert (alone.rank, alone.world, alone.state) == (0, 1, None)
    assert alone.split([1, 2, 3]) == [1, 2, 3]
