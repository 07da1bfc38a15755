from pipeline.core.progress import Progress


def test_progress_prints_rate_and_eta_when_not_a_terminal(capsys):
    with Progress(1000, "scoring images", every_s=0.0) as bar:
        bar.update(250)
        bar.update(250)
    lines = [l.strip() for l in capsys.readouterr().err.splitlines()]
    assert lines[0].startswith("scoring images: 250/1000, ") and "/s, ETA " in lines[0]
    assert lines[1].startswith("scoring images: 500/1000, ")


def test_progress_is_quiet_between_reports(capsys):
    with Progress(10, "images", every_s=3600) as bar:
        bar.update(5)
    assert capsys.readouterr().err == ""


def test_progress_is_silent_under_quiet(capsys):
    import logging

    logger = logging.getLogger("pipeline")
    level = logger.level
    logger.setLevel(logging.WARNING)   # what -q sets
    try:
        with Progress(1000, "scoring images", every_s=0.0) as bar:
            bar.update(250)
    finally:
        logger.setLevel(level)
    assert capsys.readouterr().err == ""
