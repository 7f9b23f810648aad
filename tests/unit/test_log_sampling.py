from tessera.clock import FakeClock
from tessera.log_sampling import LogSampler


def test_at_most_n_lines_per_second_and_the_rest_are_counted():
    clock = FakeClock()
    sampler = LogSampler(per_second=3, clock=clock)
    results = [sampler.admit() for _ in range(10)]
    assert results == [0, 0, 0, None, None, None, None, None, None, None]
    clock.advance(1.0)
    assert sampler.admit() == 7  # the next line carries how many were dropped
    assert sampler.admit() == 0
