"""Progress bars: one per description per process, advanced by pass-through callables."""

import pickle

import pytest

from transforms import progress
from transforms.progress import CountProgress, progress_bar


@pytest.fixture(autouse=True)
def fresh_bars(monkeypatch):
  bars = {}
  monkeypatch.setattr(progress, "_BARS", bars)
  yield bars
  for bar in bars.values():
    bar.close()


def test_count_progress_passes_elements_through_and_counts():
  count = CountProgress("matched")
  elements = ["a.jpg", ("b.jpg", 1), None]
  assert [count(e) for e in elements] == elements
  assert progress_bar("matched").n == 3


def test_one_bar_per_description_shared_by_every_counter(fresh_bars):
  assert progress_bar("embedded") is progress_bar("embedded")
  assert progress_bar("matched") is not progress_bar("embedded")
  # Stacked, not drawn over each other (tqdm keeps a fixed position as -position).
  assert sorted(abs(bar.pos) for bar in fresh_bars.values()) == [0, 1]
  # Beam pickles a Map's callable into each worker: copies made before the first
  # element all advance the one bar of this process.
  first, second = pickle.loads(pickle.dumps(CountProgress("matched"))), CountProgress("matched")
  first("x"), second("y"), second("z")
  assert progress_bar("matched").n == 3 and set(fresh_bars) == {"embedded", "matched"}
