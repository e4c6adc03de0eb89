"""benchmarks/run.py --syscalls: perf stat's CSV read into counts (an event perf could not count is
None, not 0), and the report's table of each run's calls a second and per request or stream."""

from test_bench_rounds import load_run

PERF_OUTPUT = """\
14607,,syscalls:sys_enter_recvfrom,6001768214,100.00,,
14608,,syscalls:sys_enter_sendto,6001768214,100.00,,
<not counted>,,syscalls:sys_enter_epoll_wait,0,0.00,,
some other line perf printed
"""


def test_perf_stat_csv_is_read_into_counts():
    """Each syscalls:sys_enter_* line gives its count under the call's name; "<not counted>" is
    None; lines that are not counts are skipped."""
    run = load_run()
    assert run.parse_perf_stat(PERF_OUTPUT) == {"recvfrom": 14607, "sendto": 14608, "epoll_wait": None}
    assert run.parse_perf_stat("") == {}
    assert [event.rpartition("sys_enter_")[2] for event in run.SYSCALL_EVENTS] == [
        "recvfrom", "sendto", "epoll_wait"]


def test_the_report_lists_each_run_per_second_and_per_unit():
    """One row a run: the calls a second and per request (or stream); an uncounted call is blank."""
    run = load_run()
    counts = run.parse_perf_stat(PERF_OUTPUT)
    syscalls = {"nonstream-c32": {
        "label": "nonstream-c32", "seconds": 6.0, "unit": "request", "counts": counts,
        "per_second": {k: round(v / 6.0, 1) for k, v in counts.items() if v is not None},
        "per_unit": {k: round(v / 7303, 2) for k, v in counts.items() if v is not None}}}
    lines = run.syscall_lines(syscalls)
    assert lines[1].startswith("System calls of the daemon")
    assert lines[2].splitlines()[-1].split() == ["nonstream-c32", "6", "2,434", "2,435", "-", "2.00", "2.00",
                                                 "-", "request"]
    assert run.syscall_lines({}) == []
