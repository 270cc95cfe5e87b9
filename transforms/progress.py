"""Progress bars of a local run: one tqdm bar per counter per process, shared by its DoFns."""

import threading

_BARS = {}
_LOCK = threading.Lock()


def progress_bar(desc: str):
  with _LOCK:
    bar = _BARS.get(desc)
    if bar is None:
      from tqdm import tqdm
      position = len(_BARS)
      bar = _BARS[desc] = tqdm(desc=f"{desc:>9}", unit=" img", position=position)
    return bar


class CountProgress:
  """Map-like callable that advances a bar per element; passes the element through."""

  def __init__(self, desc):
    self._desc = desc
    self._bar = None

  def __call__(self, element):
    if self._bar is None:
      self._bar = progress_bar(self._desc)
    self._bar.update(1)
    return element


def close_all():
  """Draws each bar's final count and releases the terminal lines (in-process runs)."""
  with _LOCK:
    for bar in _BARS.values():
      bar.close()
    _BARS.clear()
