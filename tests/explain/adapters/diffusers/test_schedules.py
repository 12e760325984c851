import pytest

from explain.adapters.diffusers.schedules import diffusers_timesteps
from tests.explain.test_schedules import PAPER


@pytest.mark.parametrize("name", ["dpm++", "ddpm", "euler", "heun"])
def test_diffusers_schedulers_that_accept_custom_timesteps_run_them(name):
    from explain.testing import make_scheduler

    sched = make_scheduler(name)
    kwargs = diffusers_timesteps(sched, 20, "early", 60)
    sched.set_timesteps(**kwargs)
    visited = [int(t) for t in sched.timesteps]
    if name == "heun":
        visited = visited[::2] + visited[-1:]  # Heun lists each timestep twice (two model calls)
    assert sorted(set(visited), reverse=True) == PAPER[(20, 60)][0]

@pytest.mark.parametrize("name", ["ddim", "euler_a", "pndm"])
def test_schedulers_without_custom_timesteps_give_a_clear_error(name):
    from explain.testing import make_scheduler

    sched = make_scheduler(name)
    assert diffusers_timesteps(sched, 20, "uniform") == {"num_inference_steps": 20}
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler"):
        diffusers_timesteps(sched, 20, "latter", 60)

@pytest.mark.parametrize("name", ["pndm", "ddim"])
def test_paper_schedules_swap_in_dpm_solver_where_the_scheduler_cannot_take_time_steps(name):
    # SD 1.x ships PNDM and SD 2.x DDIM's hub configs; neither takes `timesteps=`
    from explain.adapters.diffusers.schedules import (
        scheduler_accepts,
        use_paper_scheduler_if_needed,
    )
    from explain.testing import make_scheduler

    class Pipe:
        scheduler = make_scheduler(name)

    pipe = Pipe()
    assert not scheduler_accepts(pipe.scheduler, "timesteps")
    assert use_paper_scheduler_if_needed(pipe, "uniform") is None
    assert use_paper_scheduler_if_needed(pipe, "early") == type(make_scheduler(name)).__name__
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert use_paper_scheduler_if_needed(pipe, "latter") is None  # already one that can
