"""Progress bars (rate and ETA) for long non-training work, on stderr."""

from tqdm import tqdm


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "img", disable: bool = False):
    return tqdm(
        iterable, desc=desc, total=total, unit=unit, mininterval=1.0, dynamic_ncols=True, disable=disable
    )
