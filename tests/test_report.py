"""`embed-images report`: a real two-backbone run on labelled folders, its page's data read back, and the page in headless Chromium."""

import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import report
from tests.hostile import ABORT_MAGIC, PLUGIN_MODULE, blank_png, plugin_file
from transforms import decode_pool
from transforms.write import LAYOUT_KEY, SUCCESS_FILE, rows_to_table

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
BACKBONES = ("mobilenet_v3_small", "mobilenet_v2")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
FOLDERS = {"people": ["astronaut", "grace_hopper", "chelsea", "coffee"],
           "things": ["coins", "hubble_deep_field", "rocket"]}


def _python(*args):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=600)


def page_data(html: str, element_id: str = report.DATA_ID):
  found = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', html, re.S)
  return json.loads(found.group(1))


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
  """(output, the page's data, its thumbnails, the inputs): the sample photos in two label folders, one
  of them copied under a second name, one truncated file; embedded with two backbones, then reported."""
  root = tmp_path_factory.mktemp("report")
  inputs = root / "photos"
  for label, names in FOLDERS.items():
    (inputs / label).mkdir(parents=True)
    for name in names:
      shutil.copy(SAMPLES / f"{name}.jpg", inputs / label / f"{name}.jpg")
  shutil.copy(SAMPLES / "astronaut.jpg", inputs / "people" / "astronaut_copy.jpg")
  (inputs / "things" / "broken.jpg").write_bytes((SAMPLES / "rocket.jpg").read_bytes()[:3000])
  output = root / "emb"
  run = _python("-m", "pipeline", "--input", f"{inputs}/**/*.jpg", "--output", str(output),
                "--backbones", ",".join(BACKBONES), "--image-size", "32", "--weights", "random",
                "--label-from-dir", "--max-failure-fraction", "0.5")
  assert run.returncode == 0, run.stderr
  made = _python("-m", "pipeline", "report", str(output))
  assert made.returncode == 0, made.stderr
  assert made.stderr.strip().endswith(f"-> {output}/report.html")
  html = (output / "report.html").read_text()
  return output, page_data(html), page_data(html, "report-thumbnails"), inputs


def test_report_data_has_points_duplicates_errors_and_probes_per_slice(labelled_run):
  output, data, thumbs, inputs = labelled_run
  photos = sorted(str(p) for p in inputs.glob("*/*.jpg") if p.name != "broken.jpg")
  assert sorted(p["uri"] for p in data["points"]) == photos
  assert data["summary"]["report"]["every_row"] and data["summary"]["status"] == "ok"
  assert {p["color"] for p in data["points"]} == set(FOLDERS)
  original, copy = str(inputs / "people" / "astronaut.jpg"), str(inputs / "people" / "astronaut_copy.jpg")
  for a, b in ((original, copy), (copy, original)):
    first = data["neighbours"][a][0]
    assert first["uri"] == b and first["cosine"] >= 0.999
  assert all(len(n) == len(photos) - 1 for n in data["neighbours"].values())  # k=8 capped by the 8 rows
  pair = next(d for d in data["duplicates"] if {d["a"], d["b"]} == {original, copy})
  assert pair["same_bytes"] and pair["cosine"] >= 0.999
  assert not any(d["same_bytes"] for d in data["duplicates"] if d is not pair)
  assert data["summary"]["report"]["byte_copies"] == {"groups": 1, "rows": 2, "over": "every row (sha256)",
                                                       "pairs_listed": 1}
  broken = str(inputs / "things" / "broken.jpg")
  assert [(e["uri"], e["stage"], e["error_type"]) for e in data["errors"]] == [(broken, "decode", "truncated_image")]
  assert data["error_groups"][0]["count"] == 1
  assert set(data["probe"]) == {"all", *BACKBONES}
  for entry in data["probe"].values():
    assert 0 <= entry["knn_accuracy"] <= 1 and 0 <= entry["linear_accuracy"] <= 1 and entry["folds"] == 3
  assert data["confusion"]["classes"] == sorted(FOLDERS) and np.sum(data["confusion"]["matrix"]) == len(photos)
  assert set(data["slice_neighbours"]) == {"all", *BACKBONES}
  assert len(data["outliers"]) == len(photos)
  # Every photo shown has its thumbnail, a 96 px JPEG; the broken file has none.
  assert set(thumbs) == set(photos)
  from PIL import Image
  import base64
  image = Image.open(io.BytesIO(base64.b64decode(thumbs[original].split(",", 1)[1])))
  assert image.format == "JPEG" and image.size == (report.THUMBNAIL_SIZE, report.THUMBNAIL_SIZE)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Debian's chromium at {CHROMIUM}")
def test_page_in_headless_chromium_offline_hover_and_click(labelled_run, tmp_path):
  playwright = pytest.importorskip("playwright.sync_api")
  output, data, _, _ = labelled_run
  page_url = (output / "report.html").as_uri()
  left, problems = [], []
  with playwright.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
      page = browser.new_page(viewport={"width": 1280, "height": 1000})
      page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
      page.on("pageerror", lambda e: problems.append(str(e)))

      def route(r):
        if r.request.url.startswith(("file:", "data:")):
          r.continue_()
        else:
          left.append(r.request.url)
          r.abort()

      page.route("**/*", route)
      page.goto(page_url)
      page.wait_for_selector("body[data-ready=true]")
      dots = page.locator("#map circle")
      assert dots.count() == len(data["points"])
      # The byte copies sit on one spot: the later one is drawn on top, and is the one the mouse reaches.
      query = [p["uri"] for p in data["points"] if "astronaut" in p["uri"]][-1]
      dot = page.locator(f'#map circle[data-uri="{query}"]')
      dot.hover()
      tip = page.locator("#tooltip")
      assert tip.is_visible()
      assert tip.locator("img").get_attribute("src").startswith("data:image/jpeg;base64,")
      assert page.locator("#tooltip-uri").text_content() == query
      dot.click()
      shown = page.locator("#neighbours-sheet .neighbour .uri").all_text_contents()
      assert shown == [n["uri"] for n in data["neighbours"][query]]
      assert "astronaut" in shown[0] and shown[0] != query
      assert page.locator("#neighbours-sheet img").count() == len(shown) + 1
      shot = tmp_path / "report.png"
      page.screenshot(path=str(shot), full_page=True)
      print(f"screenshot: {shot}")
      assert shot.stat().st_size > 10_000
    finally:
      browser.close()
  assert left == [] and problems == []


def test_bad_outputs_are_one_line_and_exit_2(labelled_run, tmp_path, capsys):
  output, _, _, _ = labelled_run
  empty = tmp_path / "empty"
  empty.mkdir()
  assert report.run([str(empty)]) == 2
  assert capsys.readouterr().err == (f"embed-images: error: OUTPUT {str(empty)!r} has no {SUCCESS_FILE}: "
                                     "not a finished run and no committed checkpoints\n")
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / SUCCESS_FILE).write_text(json.dumps({"status": "ok"}))
  assert report.run([str(foreign)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("embed-images: error: ") and "not written by embed-images" in err
  assert report.run([str(output), "--color-by", "colour"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("embed-images: error: --color-by: no column 'colour'") and err.count("\n") == 1
  assert report.run([str(output), "--sample", "x"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("embed-images: error: argument --sample: invalid int value: 'x'") and err.count("\n") == 1


def test_partial_run_is_reported_from_its_checkpoints_only_when_asked(labelled_run, tmp_path, capsys):
  output, data, _, _ = labelled_run
  partial = tmp_path / "partial"
  (partial / "_checkpoints").mkdir(parents=True)
  rows = next(output.glob("embeddings-*.parquet"))
  # Two commits of the same rows, as a bundle retried after its first commit leaves them.
  shutil.copy(rows, partial / "_checkpoints" / "embeddings-a-0.parquet")
  shutil.copy(rows, partial / "_checkpoints" / "embeddings-b-0.parquet")
  assert report.run([str(partial)]) == 2
  assert "add --partial" in capsys.readouterr().err
  assert report.run([str(partial), "--partial", "--html", str(tmp_path / "p.html")]) == 0
  got = page_data((tmp_path / "p.html").read_text())
  assert got["summary"]["status"] == "partial" and got["summary"]["report"]["partial"]
  assert sorted(p["uri"] for p in got["points"]) == sorted(p["uri"] for p in data["points"])
  assert got["summary"]["warnings"][0].startswith("partial run")


def test_without_the_report_extra_it_says_what_to_install(labelled_run):
  output, _, _, _ = labelled_run
  blocked = ("import runpy, sys\nsys.modules['sklearn'] = None\n"
             "runpy.run_module('pipeline', run_name='__main__', alter_sys=True)\n")
  result = _python("-c", blocked, "report", str(output), "--html", str(output / "never.html"))
  assert result.returncode == 2
  assert result.stderr.count("\n") == 1 and 'pip install ".[report]"' in result.stderr
  assert not (output / "never.html").exists()


def _synthetic_run(path: pathlib.Path, n: int, dim: int, row_group: int, files: int, copies: dict):
  """A run's output of `n` rows of seeded random vectors, in `files` files of `row_group`-row groups;
  `copies` maps a row number to the row whose sha256 it repeats."""
  path.mkdir()
  layout = {"dim": dim, "backbones": [{"name": "a", "offset": 0, "dim": dim // 2},
                                      {"name": "b", "offset": dim // 2, "dim": dim - dim // 2}]}
  vectors = np.random.default_rng(1).standard_normal((n, dim)).astype(np.float32)
  shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
  for row, of in copies.items():
    shas[row] = shas[of]
  uris = [f"/nowhere/{i}.jpg" for i in range(n)]
  for part, rows in enumerate(np.array_split(np.arange(n), files)):
    table = rows_to_table([uris[i] for i in rows], [shas[i] for i in rows], [1] * len(rows), [1] * len(rows),
                          vectors[rows])
    table = table.replace_schema_metadata({LAYOUT_KEY: json.dumps(layout).encode()})
    pq.write_table(table, path / f"embeddings-{part:05d}-of-{files:05d}.parquet", row_group_size=row_group)
  (path / SUCCESS_FILE).write_text(json.dumps({"status": "ok", "counts": {"matched": n}, "layout": layout}))
  return vectors, uris


def test_rows_sample_uniformly_and_byte_copies_are_found_over_every_row(tmp_path):
  vectors, uris = _synthetic_run(tmp_path / "run", 1000, 16, 64, 3, {999: 3, 500: 3, 700: 10})
  source = report.open_source(str(tmp_path / "run"))
  rows = report.read_rows(source, 50, None)
  index = report.sample_index(1000, 50)
  assert rows.total == 1000 and len(set(index)) == 50 and list(rows.index) == list(index)
  assert rows.uris == [uris[i] for i in index]
  np.testing.assert_array_equal(rows.vectors, vectors[index])
  assert (rows.copy_groups, rows.copy_rows) == (2, 5)
  assert sorted((a, b) for a, b, _ in rows.copy_pairs) == sorted(
      [(uris[3], uris[500]), (uris[3], uris[999]), (uris[10], uris[700])])


def test_thumbnails_of_hostile_files_are_missing_not_fatal_and_shard_members_are_read(tmp_path, monkeypatch):
  monkeypatch.setenv(decode_pool.PLUGINS_ENV, PLUGIN_MODULE)
  photo = SAMPLES / "coffee.jpg"
  files = {"crash.img": plugin_file(ABORT_MAGIC), "bomb.png": blank_png(20000, 20000, complete=False),
           "empty.jpg": b"", "photo.jpg": photo.read_bytes()}
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  shard = tmp_path / "shard.tar"
  with tarfile.open(shard, "w") as tar:
    for key, source in (("000", photo), ("001", SAMPLES / "rocket.jpg")):
      info = tarfile.TarInfo(f"{key}.jpg")
      info.size = source.stat().st_size
      tar.addfile(info, io.BytesIO(source.read_bytes()))
  wanted = [str(tmp_path / name) for name in files] + [str(tmp_path / "missing.jpg"), f"{shard}#001"]
  thumbs = report.thumbnails(wanted)
  assert set(thumbs) == {str(tmp_path / "photo.jpg"), f"{shard}#001"}
  assert all(t.startswith("data:image/jpeg;base64,") for t in thumbs.values())


def test_report_reads_and_writes_gs_with_thumbnails_of_objects_and_shard_members(tmp_path):
  from apache_beam.io.filesystems import FileSystems
  from tests.gcs_emulator import gcs_emulator

  def write(uri, data):
    with FileSystems.create(uri) as f:
      f.write(data)

  with gcs_emulator("report-bucket") as bucket:
    root = f"gs://{bucket}"
    photos = [f"{root}/photos/{name}.jpg" for name in ("coffee", "coins", "rocket")]
    for uri in photos:
      write(uri, (SAMPLES / uri.rsplit("/", 1)[1]).read_bytes())
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
      info = tarfile.TarInfo("000.jpg")
      info.size = (SAMPLES / "chelsea.jpg").stat().st_size
      tar.addfile(info, io.BytesIO((SAMPLES / "chelsea.jpg").read_bytes()))
    write(f"{root}/shards/0.tar", shard.read_bytes())
    local = tmp_path / "run"
    _synthetic_run(local, 4, 8, 4, 1, {})
    uris = photos + [f"{root}/shards/0.tar#000"]
    table = pq.read_table(next(local.glob("embeddings-*.parquet")))
    table = table.set_column(0, "uri", pa.array(uris, pa.string()))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    write(f"{root}/emb/embeddings-00000-of-00001.parquet", sink.getvalue())
    write(f"{root}/emb/{SUCCESS_FILE}", (local / SUCCESS_FILE).read_bytes())
    assert report.run([f"{root}/emb", "--html", f"{root}/pages/r.html"]) == 0
    with FileSystems.open(f"{root}/pages/r.html") as f:
      html = f.read().decode()
  assert sorted(p["uri"] for p in page_data(html)["points"]) == sorted(uris)
  assert set(page_data(html, "report-thumbnails")) == set(uris)
