"""Progress bars (rate and ETA) for long non-training work, on stderr; durations as people read them."""

from tqdm import tqdm


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "img", disable: bool = False):
    return tqdm(
        iterable, desc=desc, total=total, unit=unit, mininterval=1.0, dynamic_ncols=True, disable=disable
    )


def format_duration(seconds: float) -> str:
    """45 s, 3 min 20 s, 2 h 05 min."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {rest:02d} s"
