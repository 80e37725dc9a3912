"""The supervisor's restart decisions: back-off, limit, clean exits, forgiveness."""

from dynvllm.restarts import RestartPolicy, SlotState


def test_crashes_back_off_exponentially_then_give_up():
    policy = RestartPolicy(max_restarts=3, first_delay=1, max_delay=3)
    slot = SlotState(started_at=0)
    delays = []
    now = 10.0
    for _ in range(3):
        assert slot.on_exit(policy, -9, now) == "restart"
        assert not slot.due(now)
        delays.append(slot.restart_at - now)
        now = slot.restart_at
        assert slot.due(now)
        slot.restarted(now)
        now += 5
    assert delays == [1, 2, 3]  # doubled, capped
    assert slot.on_exit(policy, 1, now) == "give-up" and slot.given_up and slot.restart_at is None


def test_clean_exit_is_not_restarted():
    slot = SlotState(started_at=0)
    assert slot.on_exit(RestartPolicy(), 0, 5) == "done" and slot.restart_at is None


def test_a_long_healthy_run_resets_the_count():
    policy = RestartPolicy(max_restarts=1, stable_after=600)
    slot = SlotState(restarts=1, started_at=0)
    assert slot.on_exit(policy, 1, 100) == "give-up"
    slot = SlotState(restarts=1, started_at=0)
    assert slot.on_exit(policy, 1, 700) == "restart" and slot.restart_at == 701


def test_zero_restarts_means_never():
    assert SlotState().on_exit(RestartPolicy(max_restarts=0), 1, 1) == "give-up"
