"""The scheduler over units: models of one backend placed one by one, requests that grow what
their unit holds, a cache freed to make room, exclusive rules and memory nobody owns."""

from __future__ import annotations

import random

import pytest

from gpubroker.scheduling.effects import Admit, Load, Note, Refuse, SwapDone, WaitIdle
from gpubroker.scheduling.scheduler import BackendSpec, Scheduler, State
from gpubroker.scheduling.victims import Candidate
from scheduler_harness import Harness

G = 2**30


def ollama_units(*models: tuple[str, int], **kw: object) -> list[BackendSpec]:
    """An Ollama backend's own unit (absent once reconciled) and one unit per model."""
    base = BackendSpec("ollama", cost=2)
    return [
        base,
        *(
            BackendSpec(f"ollama/{m}", need=n, group="ollama", model=m, **kw)  # type: ignore[arg-type]
            for m, n in models
        ),
    ]


def budget(specs: list[BackendSpec], cap: int = 24 * G, **kw: object) -> Harness:
    sched = Scheduler(specs, capacities={"0": cap}, policy="budget", min_residency=0, **kw)  # type: ignore[arg-type]
    for s in specs:
        sched.reconciled(s.name, False)
    return Harness(sched)


def ask(h: Harness, lease: int, unit: str, need: int | None = None, fresh: int | None = None):
    return h.feed(h.sched.request(lease, unit, h.now, need, fresh))


def serve(h: Harness, lease: int, unit: str, need: int | None = None) -> None:
    """Ask, carry out whatever it takes, check it was admitted, then end the lease."""
    ask(h, lease, unit, need)
    h.run_io()
    assert lease in h.admitted(), h.effects
    h.release(lease)


def test_a_small_model_stays_resident_beside_another_backend_a_big_one_evicts_both() -> None:
    specs = [
        *ollama_units(("llama3.2:3b", 3 * G), ("llama3:70b", 22 * G)),
        BackendSpec("sdxl", need=8 * G),
    ]
    h = budget(specs)
    serve(h, 1, "ollama/llama3.2:3b")
    h.now = 1
    serve(h, 2, "sdxl")
    assert h.unloads() == []  # 3 + 8 of 24: nothing had to go
    assert h.sched.resident_units() == ["sdxl", "ollama/llama3.2:3b"]
    serve(h, 3, "ollama/llama3:70b")
    assert sorted(h.unloads()) == ["ollama/llama3.2:3b", "sdxl"]
    assert h.sched.state("ollama") is State.ABSENT  # the backend's own unit was never needed


def test_only_the_model_asked_for_goes_not_its_siblings() -> None:
    specs = [*ollama_units(("a", 6 * G), ("b", 6 * G), ("c", 14 * G))]
    h = budget(specs, cap=20 * G)
    serve(h, 1, "ollama/a")
    h.now = 1
    serve(h, 2, "ollama/b")
    h.now = 2
    serve(h, 3, "ollama/c")  # 6 + 6 + 14 > 20: one of a, b must go — the least recently used
    assert h.unloads() == ["ollama/a"]
    assert h.sched.state("ollama/b") is State.RESIDENT
    assert h.sched.backend_state("ollama") is State.RESIDENT
    assert h.sched.residents() == ["ollama"]  # backends, once each


def test_a_longer_context_that_fits_grows_the_unit_without_a_swap() -> None:
    h = budget([*ollama_units(("m", 5 * G)), BackendSpec("other", need=10 * G)])
    serve(h, 1, "other")
    serve(h, 2, "ollama/m")
    effects = ask(h, 3, "ollama/m", need=8 * G)  # num_ctx 32k: 8 GiB, and 18 of 24 fit
    assert any(isinstance(e, Admit) and e.lease == 3 for e in effects)
    assert h.sched.size("ollama/m", "0") == 8 * G
    assert h.unloads() == []


def test_a_longer_context_that_does_not_fit_evicts_others_not_the_model_itself() -> None:
    h = budget([*ollama_units(("m", 5 * G)), BackendSpec("other", need=10 * G)])
    serve(h, 1, "other")
    serve(h, 2, "ollama/m")
    loads = len(h.pending(Load))
    effects = ask(h, 3, "ollama/m", need=16 * G)
    assert not any(isinstance(e, Admit) for e in effects)  # 10 + 16 > 24
    h.run_io()
    assert 3 in h.admitted()
    assert h.unloads() == ["other"]  # Ollama reloads the model with the longer context itself
    assert len(h.pending(Load)) == loads  # nothing to load: the unit stayed resident


def test_a_request_that_could_never_fit_is_refused_with_the_numbers() -> None:
    h = budget([*ollama_units(("m", 5 * G))])
    [refuse] = [e for e in ask(h, 1, "ollama/m", need=30 * G) if isinstance(e, Refuse)]
    assert refuse.status == 507 and "30.0 GiB" in refuse.message


def test_a_cache_that_would_not_fit_with_a_workflow_is_freed_first() -> None:
    # ComfyUI holds 10 GiB of cached checkpoints; a workflow's own files need 8 GiB more.
    h = budget([BackendSpec("comfy"), BackendSpec("chat", need=6 * G)])
    serve(h, 1, "chat")
    serve(h, 2, "comfy", need=10 * G)
    effects = ask(h, 3, "comfy", need=20 * G, fresh=8 * G)  # 6 + 20 > 24, 6 + 8 fits
    assert not any(isinstance(e, Admit) for e in effects)
    h.run_io()
    assert 3 in h.admitted()
    assert h.unloads() == ["comfy"]  # freed itself; the chat model stayed
    assert h.sched.state("chat") is State.RESIDENT
    assert h.sched.size("comfy", "0") == 8 * G  # what it holds now: the workflow's own files


def test_a_cache_that_fits_is_kept() -> None:
    h = budget([BackendSpec("comfy"), BackendSpec("chat", need=6 * G)])
    serve(h, 1, "chat")
    serve(h, 2, "comfy", need=6 * G)
    effects = ask(h, 3, "comfy", need=12 * G, fresh=6 * G)
    assert any(isinstance(e, Admit) and e.lease == 3 for e in effects)
    assert h.unloads() == []


def test_exclusive_units_are_never_resident_together_whatever_the_sizes() -> None:
    h = budget(
        [BackendSpec("a", need=2 * G, exclusive=frozenset({"b"})), BackendSpec("b", need=2 * G)]
    )
    serve(h, 1, "b")
    serve(h, 2, "a")  # 2 + 2 of 24 would fit
    assert h.unloads() == ["b"]
    serve(h, 3, "b")  # and the other way round: the rule binds both sides
    assert h.unloads() == ["b", "a"]


def test_exclusive_with_a_backend_covers_its_models() -> None:
    specs = [
        *ollama_units(("m", 2 * G)),
        BackendSpec("comfy", need=4 * G, exclusive=frozenset({"ollama"})),
    ]
    h = budget(specs)
    serve(h, 1, "ollama/m")
    serve(h, 2, "comfy")
    assert h.unloads() == ["ollama/m"]


def test_exclusive_with_a_pinned_unit_is_refused_at_once() -> None:
    h = budget(
        [
            BackendSpec("a", need=2 * G, exclusive=frozenset({"b"})),
            BackendSpec("b", need=2 * G, pinned=True),
        ]
    )
    serve(h, 1, "b")
    [refuse] = [e for e in ask(h, 2, "a") if isinstance(e, Refuse)]
    assert refuse.status == 507 and "pinned" in refuse.message


def test_freeing_a_backend_frees_its_models() -> None:
    h = budget([*ollama_units(("a", 2 * G), ("b", 2 * G))])
    serve(h, 1, "ollama/a")
    serve(h, 2, "ollama/b")
    _, effects = h.sched.evict("ollama", False, h.now)
    h.feed(effects)
    h.run_io()
    assert sorted(h.unloads()) == ["ollama/a", "ollama/b"]
    assert h.sched.backend_state("ollama") is State.ABSENT


def test_max_concurrency_counts_the_backend_over_its_models() -> None:
    h = budget([*ollama_units(("a", 2 * G), ("b", 2 * G), max_concurrency=1)])
    serve(h, 1, "ollama/b")
    ask(h, 2, "ollama/a")
    h.run_io()
    assert 2 in h.admitted()
    effects = ask(h, 3, "ollama/b")  # a holds the backend's one slot
    assert not any(isinstance(e, Admit) for e in effects)
    h.release(2)
    assert 3 in h.admitted()


def test_memory_nobody_owns_is_not_planned_with() -> None:
    h = budget([BackendSpec("a", need=10 * G), BackendSpec("b", need=10 * G)])
    serve(h, 1, "a")
    h.feed(h.sched.unmanaged("0", 6 * G, h.now))  # a notebook took 6 GiB: 10 + 10 + 6 > 24
    ask(h, 2, "b")
    h.run_io()
    assert h.unloads() == ["a"]
    assert 2 in h.admitted()


def test_memory_nobody_owns_growing_reclaims_the_cheapest_and_says_so() -> None:
    h = budget([BackendSpec("a", need=10 * G, cost=1), BackendSpec("b", need=10 * G, cost=3)])
    serve(h, 1, "a")
    serve(h, 2, "b")
    effects = h.feed(h.sched.unmanaged("0", 8 * G, h.now))  # 28 of 24: an OOM waiting to happen
    [started] = [e for e in effects if isinstance(e, Note) and e.kind == "swap_started"]
    assert started.detail["reason"] == "unmanaged" and started.detail["victims"] == ["a"]
    h.run_io()
    assert h.unloads() == ["a"]  # the cheapest to bring back; b stays
    assert h.sched.used("0") <= 24 * G
    assert h.feed(h.sched.unmanaged("0", 8 * G, h.now)) == []  # no change, nothing to do


def test_memory_nobody_owns_is_ignored_under_exclusive() -> None:
    sched = Scheduler([BackendSpec("a")], capacities={"0": 24 * G}, policy="exclusive")
    sched.reconciled("a", True)
    assert sched.unmanaged("0", 8 * G, 0.0) == []
    assert sched.state("a") is State.RESIDENT


def test_a_model_the_service_let_go_or_loaded_itself_is_seen() -> None:
    h = budget([*ollama_units(("a", 2 * G))])
    serve(h, 1, "ollama/a")
    h.feed(h.sched.observed("ollama/a", False, h.now))  # its keep_alive ran out
    assert h.sched.state("ollama/a") is State.ABSENT
    h.feed(h.sched.observed("ollama/a", True, h.now))  # a client of Ollama's own loaded it
    assert h.sched.state("ollama/a") is State.RESIDENT


def test_a_unit_serving_or_in_a_plan_is_not_changed_by_what_is_observed() -> None:
    h = budget([*ollama_units(("a", 2 * G))])
    ask(h, 1, "ollama/a")
    h.run_io()
    assert h.feed(h.sched.observed("ollama/a", False, h.now)) == []  # loading under a lease
    assert h.sched.state("ollama/a") is State.RESIDENT


def test_units_found_later_are_absent_until_told() -> None:
    h = budget([BackendSpec("ollama")])
    h.sched.add_unit(BackendSpec("ollama/new", group="ollama", model="new", need=G))
    assert h.sched.state("ollama/new") is State.ABSENT
    assert h.sched.units_of("ollama") == ["ollama", "ollama/new"]
    serve(h, 1, "ollama/new")


def test_the_victim_rule_can_be_replaced() -> None:
    picked: list[list[str]] = []

    def newest_first(shortfall: int, candidates: list[Candidate], now: float) -> list[str] | None:
        names = [c.name for c in sorted(candidates, key=lambda c: -c.last_used)]
        picked.append(names)
        return names[:1]

    specs = [
        BackendSpec("a", need=10 * G),
        BackendSpec("b", need=10 * G),
        BackendSpec("c", need=10 * G),
    ]
    h = budget(specs, choose=newest_first)
    serve(h, 1, "a")
    h.now = 1
    serve(h, 2, "b")
    serve(h, 3, "c")
    assert h.unloads() == ["b"] and picked == [["b", "a"]]


# --- randomized traces ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_random_traces_never_overcommit_and_serve_everyone(seed: int) -> None:
    rng = random.Random(seed)
    cap = 24 * G
    models = [(f"m{i}", rng.randint(1, 12) * G) for i in range(rng.randint(1, 4))]
    specs = ollama_units(*models)
    specs += [
        BackendSpec(
            f"svc{i}",
            need=rng.randint(1, 12) * G,
            cost=rng.randint(1, 3),
            priority=rng.randint(0, 2),
        )
        for i in range(rng.randint(1, 4))
    ]
    h = budget(specs, cap=cap, queue_timeout=1e9)
    units = [s.name for s in specs if s.name != "ollama"]
    held: set[int] = set()
    admitted: set[int] = set()

    def settle() -> None:
        h.run_io()
        assert h.sched.used("0") <= cap, "over-committed"
        for lease in set(h.admitted()) - admitted:
            admitted.add(lease)
            held.add(lease)

    n = 150
    for lease in range(1, n):
        h.now += rng.uniform(0, 2)
        unit = rng.choice(units)
        need = None
        if unit.startswith("ollama/") and rng.random() < 0.3:  # a longer context
            base = h.sched.slots[unit].spec.need or 0
            need = base + rng.randint(0, 14) * G
        ask(h, lease, unit, need)
        settle()
        while held and rng.random() < 0.6:
            end = rng.choice(sorted(held))
            held.discard(end)
            h.release(end)
            settle()
    while held:  # everyone still in flight finishes: no one may be left waiting
        end = min(held)
        held.discard(end)
        h.release(end)
        settle()
    refused = {e.lease: e for e in h.pending(Refuse)}
    assert all(e.code == "never_fits" for e in refused.values())
    assert not h.sched.queue, "a request starved"
    assert admitted | set(refused) == set(range(1, n))


def test_a_second_waiter_behind_a_draining_plan_leaves_no_past_deadline() -> None:
    # Found by bench/replay.py: the broker's clock loop would have ticked without pause.
    sched = Scheduler([BackendSpec(n) for n in "abc"], policy="exclusive", hold_time=10.0)
    for n in "abc":
        sched.reconciled(n, n == "a")
    h = Harness(sched)
    h.request(1, "a")
    h.now = 1.0
    h.request(2, "b")
    h.now = 2.0
    h.request(3, "c")
    h.now = 11.0
    h.feed(sched.tick(h.now))  # b's plan drains a, still serving lease 1
    deadline = sched.next_deadline()
    assert deadline is None or deadline > h.now
    h.release(1)
    h.run_io()
    assert 2 in h.admitted()


def test_a_unit_of_unknown_size_takes_what_the_card_has_beside_memory_nobody_owns() -> None:
    h = budget([BackendSpec("a")])  # no vram declared, nothing measured yet
    h.feed(h.sched.unmanaged("0", G // 2, h.now))  # a desktop's half GiB
    serve(h, 1, "a")  # not "the whole GPU", which could never fit beside it
    assert h.sched.size("a", "0") == 24 * G - G // 2


def test_an_idle_deadline_the_last_pump_kept_is_no_tick_to_spin_on() -> None:
    # b's idle timeout passes while a request for it waits for the backend's one slot
    h = budget([*ollama_units(("a", 2 * G), ("b", 2 * G), max_concurrency=1, idle_timeout=5.0)])
    serve(h, 1, "ollama/b")
    h.now = 1
    ask(h, 2, "ollama/a")
    h.run_io()
    ask(h, 3, "ollama/b")
    h.now = 10
    h.feed(h.sched.tick(h.now))
    deadline = h.sched.next_deadline()
    assert deadline is None or deadline > h.now
    h.release(2)
    assert 3 in h.admitted()


def test_a_unit_of_unknown_size_beside_a_pinned_one_is_not_refused() -> None:
    h = budget([*ollama_units(("embed", G), pinned=True)])
    serve(h, 1, "ollama/embed")
    h.sched.add_unit(BackendSpec("ollama/x", group="ollama", model="x", source="unknown"))
    serve(h, 2, "ollama/x")  # all the card has beside the pinned embedder
    assert h.sched.size("ollama/x", "0") == 23 * G
    assert h.sched.state("ollama/embed") is State.RESIDENT


def test_a_flush_that_freed_nothing_is_no_swap_and_is_not_tried_again() -> None:
    h = budget([BackendSpec("comfy"), BackendSpec("chat", need=6 * G)])
    serve(h, 1, "chat")
    serve(h, 2, "comfy", need=10 * G)
    seen = len(h.effects)
    ask(h, 3, "comfy", need=20 * G, fresh=8 * G)
    [wait] = [e for e in h.effects[seen:] if isinstance(e, WaitIdle)]
    h.feed(h.sched.idle(wait.swap, "comfy", h.now))
    h.feed(h.sched.unloaded(wait.swap, "comfy", "timed out", h.now, holding=True))
    assert h.sched.swap_count == 0
    assert not any(isinstance(e, SwapDone) for e in h.effects[seen:])
    # planned afresh, freeing the chat model instead of ComfyUI again
    assert [e.backend for e in h.effects[seen:] if isinstance(e, WaitIdle)] == ["comfy", "chat"]
