"""Progress lines: a long phase reports as it goes where the output is a log file, not only when it ends."""

from minidpo.progress import ProgressLine


def test_off_a_terminal_progress_is_logged_every_ten_seconds_and_at_the_end(capsys):
    times = iter([0.0, *(4.0 * k for k in range(1, 11))])  # 10 updates, 4 s apart
    lines: list[str] = []
    progress = ProgressLine("pairs: generated prompts", lines.append, tty=False, clock=lambda: next(times))
    for done in range(1, 11):
        progress.update(done, 10)
    assert lines == ["pairs: generated prompts 3/10 (12s)", "pairs: generated prompts 6/10 (24s)",
                     "pairs: generated prompts 9/10 (36s)", "pairs: generated prompts 10/10 (40s)"]
    assert capsys.readouterr() == ("", "")


def test_off_a_terminal_a_short_phase_is_one_line():
    times = iter([0.0, 1.0, 2.0, 3.0])
    lines: list[str] = []
    progress = ProgressLine("pairs: scored", lines.append, tty=False, clock=lambda: next(times))
    for done in (4, 8, 12):
        progress.update(done, 12)
    assert lines == ["pairs: scored 12/12 (3s)"]
