"""`embed-images report OUTPUT`: a run's rows -> sample, map, neighbours, duplicates, outliers, probes -> one offline HTML page."""

import argparse
import base64
import concurrent.futures
import dataclasses
import io
import json
import os
import sys
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms import checkpoint, decode, decode_pool, shards
from transforms.read import read_bytes
from transforms.write import LAYOUT_KEY, SUCCESS_FILE, embedding_matrix, read_summary

PROG = "embed-images"
INSTALL_HINT = 'pip install "embed-images[report]" (from a checkout: pip install ".[report]")'
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report.html")
DATA_ID = "report-data"
THUMBNAIL_SIZE = 96
SEED = 0  # the sample, the contact sheets' queries and the projection are the same on every rerun
CONTACT_QUERIES = 8
OUTLIERS = 24
ERROR_EXAMPLES = 3
MAX_ERRORS = 1000  # error rows listed in the data; the groups count all of them
MAX_COPY_PAIRS = 1000  # exact byte-copy pairs listed; the summary counts all of them
ALL = "all"
PROBE_FOLDS = 3  # cross-validation folds of the linear probe (fewer when a class has fewer rows)
PROBE_ITERATIONS = 300
_READ_WINDOW = 32  # files read (and held) at once for thumbnails: memory is this many files' bytes
_READ_THREADS = 16


class ReportError(Exception):
  """Bad input to `report`: one line for stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    # One line, as every other bad option of the command: not argparse's usage block.
    raise ReportError(message)


def parse_args(argv) -> argparse.Namespace:
  parser = _Parser(prog=f"{PROG} report", description="Write one offline HTML page about a run.")
  parser.add_argument("output", metavar="OUTPUT", help="a run's --output directory (local or gs://)")
  parser.add_argument("--html", metavar="PATH", help="where to write the page (local or gs://); default OUTPUT/report.html")
  parser.add_argument("--color-by", metavar="COLUMN", help="colour the map by this column; default: label when present")
  parser.add_argument("--sample", metavar="N", type=int, default=5000,
                      help="rows on the map, the neighbours, outliers and probes (a uniform sample); default 5000")
  parser.add_argument("--neighbours", metavar="K", type=int, default=8, help="nearest neighbours shown per image; default 8")
  parser.add_argument("--duplicate-cosine", metavar="C", type=float, default=0.98,
                      help="pairs at or above this cosine are near-duplicates; default 0.98")
  parser.add_argument("--partial", action="store_true",
                      help="report an interrupted run (no _SUCCESS.json) from its committed checkpoints")
  args = parser.parse_args(argv)
  if args.sample < 2:
    raise ReportError(f"--sample must be at least 2; got {args.sample}")
  if args.neighbours < 1:
    raise ReportError(f"--neighbours must be at least 1; got {args.neighbours}")
  if not 0 < args.duplicate_cosine <= 1:
    raise ReportError(f"--duplicate-cosine must be in (0, 1]; got {args.duplicate_cosine}")
  return args


# --- Where the rows are -------------------------------------------------------------------------

@dataclasses.dataclass
class Source:
  """A run's output as the report reads it: its summary, layout, and Parquet files."""
  output: str
  summary: dict
  layout: dict
  embedding_files: list
  error_files: list
  partial: bool


def _match(pattern: str) -> list:
  try:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
  except Exception:  # no such directory: gs:// raises where local matches nothing
    return []


def _file_layout(path: str) -> Optional[dict]:
  try:
    metadata = _parquet_file(path).schema_arrow.metadata or {}
    return json.loads(metadata[LAYOUT_KEY]) if LAYOUT_KEY in metadata else None
  except Exception:
    return None


def open_source(output: str, partial: bool = False) -> Source:
  """The run in `output`; raises ReportError when it is not a finished run of this tool (or, with
  `partial`, has no committed checkpoints)."""
  output = output.rstrip("/") or output
  has_summary = FileSystems.exists(FileSystems.join(output, SUCCESS_FILE))
  if partial and not has_summary:
    files = _match(checkpoint.embeddings_glob(output))
    if not files:
      raise ReportError(f"OUTPUT {output!r} has neither {SUCCESS_FILE} nor committed rows in "
                        f"{checkpoint.directory(output)}/embeddings-*.parquet: nothing to report")
    layout = checkpoint.read_layout(output) or _file_layout(files[0])
    if not _is_layout(layout):
      raise ReportError(f"OUTPUT {output!r}: its checkpoints carry no embedding layout: not written by {PROG}")
    summary = {"status": "partial", "output": output, "layout": layout,
               "warnings": [f"partial run: no {SUCCESS_FILE}; these are the rows its checkpoints had committed"]}
    return Source(output, summary, layout, files, _match(checkpoint.errors_glob(output)), True)
  if not has_summary:
    hint = (" and no committed checkpoints" if not _match(checkpoint.embeddings_glob(output))
            else "; it holds an interrupted run's checkpoints: add --partial to report them")
    raise ReportError(f"OUTPUT {output!r} has no {SUCCESS_FILE}: not a finished run{hint}")
  try:
    summary = read_summary(output)
  except Exception as e:
    raise ReportError(f"OUTPUT {output!r}: {SUCCESS_FILE} is not readable JSON ({type(e).__name__}): "
                      f"not written by {PROG}") from None
  layout = summary.get("layout") if isinstance(summary, dict) else None
  if not _is_layout(layout) or "counts" not in summary:
    raise ReportError(f"OUTPUT {output!r}: {SUCCESS_FILE} has no counts and layout: not written by {PROG}")
  files = _match(FileSystems.join(output, "embeddings-*.parquet"))
  if files and not _is_layout(_file_layout(files[0])):
    raise ReportError(f"OUTPUT {output!r}: {FileSystems.split(files[0])[1]} has no embedding layout: "
                      f"not written by {PROG}")
  return Source(output, summary, layout, files, _match(FileSystems.join(output, "errors-*.parquet")), False)


def _is_layout(layout) -> bool:
  return (isinstance(layout, dict) and isinstance(layout.get("dim"), int) and isinstance(layout.get("backbones"), list)
          and all({"name", "offset", "dim"} <= set(b) for b in layout["backbones"]))


def _parquet_file(path: str) -> pq.ParquetFile:
  if FileSystems.get_scheme(path) is None:
    # Read, not memory-mapped: a mapping's touched pages count in the process's RSS, 8 GB of them
    # for 1M x 2,048 vectors; reads cost one row group at a time.
    return pq.ParquetFile(path)
  return pq.ParquetFile(FileSystems.open(path, compression_type="uncompressed"))


# --- Reading: light columns of every row, vectors of the sampled ones ---------------------------

@dataclasses.dataclass
class Rows:
  """What the report works from: counts over every row, vectors of the sample (and of byte copies)."""
  total: int  # rows in the output (partial: distinct uris)
  index: np.ndarray  # int64 [n]: global row numbers of the sample, ascending
  uris: list
  sha256: list
  vectors: np.ndarray  # float32 [n, D]
  colors: Optional[list]
  labels: Optional[list]
  copy_groups: int  # groups of rows with equal sha256, over every row
  copy_rows: int
  copy_pairs: list  # [(uri a, uri b, cosine)] up to MAX_COPY_PAIRS
  columns: list  # the output's columns other than the embedding
  color_by: Optional[str]


def sample_index(total: int, n: int, seed: int = SEED) -> np.ndarray:
  """A uniform sample of `n` of `total` row numbers (all of them when n >= total), ascending."""
  if n >= total:
    return np.arange(total, dtype=np.int64)
  return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False)).astype(np.int64)


def _light_table(files, columns) -> pa.Table:
  tables = []
  for path in files:
    f = _parquet_file(path)
    names = [c for c in columns if c in f.schema_arrow.names]
    tables.append(f.read(columns=names))
  return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def copy_groups(sha: pa.Array, kept: np.ndarray) -> list:
  """Row numbers (among `kept`) sharing a sha256 with another kept row: [array of row numbers], one per
  digest. Arrow's hash grouping, over every row: no pairwise work."""
  table = pa.table({"sha256": sha.take(pa.array(kept)), "row": pa.array(kept)})
  grouped = table.group_by("sha256").aggregate([("row", "list")])
  rows = grouped.column("row_list")
  lengths = pc.list_value_length(rows).to_numpy()
  # Sorted: the hash aggregation's order within a group depends on its threads.
  groups = [np.sort(np.asarray(r, dtype=np.int64)) for r in rows.filter(pa.array(lengths > 1)).to_pylist()]
  return sorted(groups, key=lambda g: g[0])


def read_rows(source: Source, sample: int, color_by: Optional[str]) -> Rows:
  """Streams the output: the light columns of every row first (uri, sha256, the colour and label
  columns), then the embedding column one row group at a time, keeping only the sampled rows and the
  byte copies listed. Memory: one row group of vectors plus the light columns."""
  files = source.embedding_files
  names = list(_parquet_file(files[0]).schema_arrow.names) if files else []
  if color_by is not None and color_by not in names or color_by == "embedding":
    raise ReportError(f"--color-by: no column {color_by!r} in {source.output!r}; it has "
                      f"{[n for n in names if n != 'embedding']}")
  color_by = color_by or ("label" if "label" in names else None)
  light = _light_table(files, list(dict.fromkeys(c for c in ("uri", "sha256", color_by, "label") if c)))
  total_rows = len(light)
  kept = np.arange(total_rows, dtype=np.int64)
  if source.partial and total_rows:
    # A bundle retried after its first commit commits its rows twice: one row per uri.
    first = pa.table({"uri": light.column("uri"), "row": pa.array(kept)}).group_by("uri").aggregate([("row", "min")])
    kept = np.sort(first.column("row_min").to_numpy())
  index = kept[sample_index(len(kept), sample)]
  groups = copy_groups(light.column("sha256").combine_chunks(), kept) if total_rows else []
  pairs = [(int(g[0]), int(r)) for g in groups for r in g[1:]][:MAX_COPY_PAIRS]
  wanted = np.union1d(index, np.array([r for p in pairs for r in p], dtype=np.int64))
  vectors = _gather_vectors(files, wanted, source.layout["dim"])
  position = {int(r): i for i, r in enumerate(wanted)}
  at = np.searchsorted(wanted, index)
  uris = light.column("uri")
  pick = lambda column: column.take(pa.array(index)).to_pylist()
  unit = _normalized(vectors)
  copy_pairs = [(uris[a].as_py(), uris[b].as_py(), float(unit[position[a]] @ unit[position[b]])) for a, b in pairs]
  colors = [None if v is None else str(v) for v in pick(light.column(color_by))] if color_by else None
  labels = pick(light.column("label")) if "label" in light.column_names else None
  return Rows(len(kept), index, pick(uris), pick(light.column("sha256")), vectors[at], colors, labels,
              len(groups), int(sum(len(g) for g in groups)), copy_pairs, [n for n in names if n != "embedding"],
              color_by)


def _gather_vectors(files, wanted: np.ndarray, dim: int) -> np.ndarray:
  """The embeddings of global rows `wanted` (ascending), reading only the row groups that hold them."""
  out = np.empty((len(wanted), dim), np.float32)
  start = filled = 0
  for path in files:
    f = _parquet_file(path)
    for group in range(f.metadata.num_row_groups):
      rows = f.metadata.row_group(group).num_rows
      lo, hi = np.searchsorted(wanted, [start, start + rows])
      if hi > lo:
        matrix = embedding_matrix(f.read_row_group(group, columns=["embedding"]).column("embedding"))
        out[lo:hi] = matrix[wanted[lo:hi] - start]
        filled += hi - lo
        del matrix
      start += rows
  return out[:filled]


# --- Computing: neighbours, map, duplicates, outliers, probes ----------------------------------

def _normalized(x: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.where(norms > 0, norms, 1)


def slices(vectors: np.ndarray, layout: dict) -> dict:
  """{"all": whole vectors, backbone name: its part}, each row L2-normalised (cosine = dot)."""
  parts = {ALL: vectors}
  for b in layout["backbones"]:
    parts.setdefault(b["name"], vectors[:, b["offset"]:b["offset"] + b["dim"]])
  return {name: _normalized(np.asarray(x, np.float32)) for name, x in parts.items()}


def nearest(x: np.ndarray, k: int) -> tuple:
  """(indices [n, k], cosines [n, k]) of each row's k nearest other rows: exact, scikit-learn's blocked
  brute force (a row is not its own neighbour; an identical copy is)."""
  from sklearn.neighbors import NearestNeighbors
  k = min(k, len(x) - 1)
  if k < 1:
    return np.zeros((len(x), 0), np.int64), np.zeros((len(x), 0), np.float32)
  distances, indices = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(x).kneighbors()
  return indices, (1 - distances).astype(np.float32)


def projection(x: np.ndarray) -> np.ndarray:
  """2-D coordinates: PCA (deterministic, linear, seconds for 5,000 x 2,048), scaled to [0, 1]."""
  from sklearn.decomposition import PCA
  if len(x) < 3:
    xy = np.zeros((len(x), 2))
  else:
    xy = PCA(n_components=2, random_state=SEED).fit_transform(x)
  low, span = xy.min(axis=0), np.ptp(xy, axis=0)
  return (xy - low) / np.where(span > 0, span, 1)


def near_duplicates(uris, sha256, indices, cosines, threshold: float, copy_pairs) -> list:
  """{a, b, cosine, same_bytes}: neighbour pairs at or above `threshold` within the sample, and the
  byte copies found over every row; each pair once, highest cosine first."""
  pairs = {}
  for i, (row, cos) in enumerate(zip(indices, cosines)):
    for j, c in zip(row, cos):
      if c >= threshold:
        a, b = sorted((uris[i], uris[j]))
        pairs[(a, b)] = {"a": a, "b": b, "cosine": round(float(c), 6), "same_bytes": sha256[i] == sha256[j]}
  for a, b, c in copy_pairs:
    a, b = sorted((a, b))
    pairs.setdefault((a, b), {"a": a, "b": b, "cosine": round(c, 6), "same_bytes": True})
  return sorted(pairs.values(), key=lambda p: (-p["cosine"], p["a"], p["b"]))


def outliers(uris, cosines, count: int = OUTLIERS) -> list:
  """The rows farthest from their neighbours: lowest mean cosine to their k nearest."""
  if not cosines.size:
    return []
  mean = cosines.mean(axis=1)
  return [{"uri": uris[i], "mean_neighbour_cosine": round(float(mean[i]), 6)} for i in np.argsort(mean)[:count]]


def knn_vote(codes: np.ndarray, neighbours: np.ndarray, classes: int) -> np.ndarray:
  """Each row's predicted class code: the majority among its neighbours' codes (the row itself is not
  among them: leave-one-out), a tie going to the class of the nearer neighbours."""
  n, k = neighbours.shape
  votes = np.zeros((n, classes))
  weights = 1 + 1e-3 * (k - np.arange(k)) / k  # ranks break ties, never outvote a count
  np.add.at(votes, (np.repeat(np.arange(n), k), codes[neighbours].ravel()), np.tile(weights, n))
  return votes.argmax(axis=1)


def probes(parts: dict, labels, found: dict) -> tuple:
  """({slice: {knn_accuracy, linear_accuracy, folds}}, the best one's confusion matrix) on the labelled
  rows: leave-one-out kNN over the neighbours `found` per slice (the page's own, cosine) and a
  cross-validated logistic regression (scikit-learn, standardised features)."""
  import warnings
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import confusion_matrix
  from sklearn.model_selection import StratifiedKFold, cross_val_predict
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  keep = np.array([v is not None for v in labels], bool)
  y = np.array([str(v) for v in labels if v is not None])
  classes, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
  if len(classes) < 2:
    return {}, None
  folds = int(min(PROBE_FOLDS, counts.min()))
  result, predictions = {}, {}
  for name, x in parts.items():
    x = x[keep]
    neighbours = found[name][0] if keep.all() else nearest(x, found[name][0].shape[1])[0]
    knn_pred = classes[knn_vote(codes, neighbours, len(classes))]
    entry = {"knn_accuracy": round(float(np.mean(knn_pred == y)), 6), "linear_accuracy": None, "folds": None}
    predictions[(name, "knn")] = knn_pred
    if folds >= 2:
      cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=SEED)
      model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=PROBE_ITERATIONS))
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a probe, not a model to ship
        linear_pred = cross_val_predict(model, x, y, cv=cv)
      entry.update(linear_accuracy=round(float(np.mean(linear_pred == y)), 6), folds=folds)
      predictions[(name, "linear")] = linear_pred
    result[name] = entry
  best = max(predictions, key=lambda key: (np.mean(predictions[key] == y), key[1] == "linear"))
  matrix = confusion_matrix(y, predictions[best], labels=classes)
  return result, {"slice": best[0], "probe": best[1], "classes": classes.tolist(), "matrix": matrix.tolist(),
                  "rows": int(len(y))}


# --- Thumbnails ---------------------------------------------------------------------------------

def _shard_member(uri: str):
  """(shard, format, key) when `uri` names an image inside a shard, else None."""
  shard, sep, key = uri.rpartition("#")
  kind = shards.shard_format(shard) if sep else None
  return (shard, kind, key) if kind else None


def _shard_bytes(shard: str, kind: str, keys: set) -> dict:
  """{key: bytes} of the wanted members, streaming the shard once and stopping when all are found."""
  try:
    layout = shards.shard_layout(shard, kind)
  except ValueError:
    layout = shards.ShardLayout(kind)
  found = {}
  for member in shards.read_members(shard, layout):
    if member.key in keys and member.error is None:
      try:
        found[member.key] = member.data if member.data is not None else read_bytes(member.source)
      except Exception:
        pass
      if len(found) == len(keys):
        break
  return found


def _jpeg_data_uri(array: np.ndarray) -> str:
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "JPEG", quality=75)
  return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnails(uris, size: int = THUMBNAIL_SIZE, processes: int = 2, pool=None) -> dict:
  """{uri: JPEG data URI} of `size` px (long side, padded on white) for each uri whose bytes can be
  read and decoded. The decode runs in decode processes under the pipeline's limits: a hostile file
  is only "no thumbnail"."""
  uris = list(dict.fromkeys(uris))
  spec = decode.DecodeSpec(sizes=(size,), resize="pad", max_pixels=decode.PIL_MAX_PIXELS, timeout=30.0)
  own = pool is None
  pool = pool or decode_pool.DecodePool(processes, decode_pool.default_memory_ceiling(decode.PIL_MAX_PIXELS))
  out = {}
  try:
    members, files = {}, []
    for uri in uris:
      member = _shard_member(uri)
      if member and not FileSystems.exists(uri):
        members.setdefault((member[0], member[1]), {})[member[2]] = uri
      else:
        files.append(uri)
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as readers, \
        concurrent.futures.ThreadPoolExecutor(pool.processes) as decoders:
      def read(uri):
        try:
          return read_bytes(uri)
        except Exception:
          return None

      def decode_group(pairs):
        results = pool.decode_many([data for _, data in pairs], spec)
        return {u: _jpeg_data_uri(r.arrays[size]) for (u, _), r in zip(pairs, results)
                if not isinstance(r, BaseException)}

      def decode_window(pairs):
        pairs = [(u, d) for u, d in pairs if d]
        step = max(1, -(-len(pairs) // pool.processes))
        for part in decoders.map(decode_group, [pairs[i:i + step] for i in range(0, len(pairs), step)]):
          out.update(part)

      for start in range(0, len(files), _READ_WINDOW):
        window = files[start:start + _READ_WINDOW]
        decode_window(list(zip(window, readers.map(read, window))))
      for (shard, kind), keys in members.items():
        found = _shard_bytes(shard, kind, set(keys))
        decode_window([(keys[k], data) for k, data in found.items()])
  finally:
    if own:
      pool.close()
  return out


# --- The page -----------------------------------------------------------------------------------

def read_errors(files) -> tuple:
  """(groups [{stage, error_type, count, examples}], rows listed (up to MAX_ERRORS), total)."""
  table = _light_table(files, ["uri", "stage", "error_type", "message"])
  if not len(table):
    return [], [], 0
  counts = table.group_by(["stage", "error_type"]).aggregate([("uri", "count")])
  groups = []
  for g in sorted(counts.to_pylist(), key=lambda g: (-g["uri_count"], g["stage"], g["error_type"])):
    mask = pc.and_(pc.equal(table.column("stage"), g["stage"]), pc.equal(table.column("error_type"), g["error_type"]))
    examples = table.filter(mask).slice(0, ERROR_EXAMPLES).to_pylist()
    groups.append({"stage": g["stage"], "error_type": g["error_type"], "count": g["uri_count"], "examples": examples})
  return groups, table.slice(0, MAX_ERRORS).to_pylist(), len(table)


def build_data(source: Source, rows: Rows, k: int, threshold: float, error_groups, errors, total_errors) -> dict:
  """The page's data (the `report-data` JSON), thumbnails aside."""
  n = len(rows.uris)
  parts = slices(rows.vectors, source.layout)
  found = {name: nearest(x, k) for name, x in parts.items()}
  indices, cosines = found[ALL]
  xy = projection(parts[ALL]) if n else np.zeros((0, 2))
  as_list = lambda i, idx, cos: [{"uri": rows.uris[j], "cosine": round(float(c), 6)} for j, c in zip(idx[i], cos[i])]
  queries = sorted(np.random.default_rng(SEED).choice(n, size=min(CONTACT_QUERIES, n), replace=False).tolist()) if n else []
  probe, confusion = probes(parts, rows.labels, found) if rows.labels is not None and n > 2 else ({}, None)
  summary = dict(source.summary)
  summary["report"] = {
      "rows": rows.total, "sampled": n, "every_row": n == rows.total, "seed": SEED, "partial": source.partial,
      "projection": "PCA (scikit-learn), on the L2-normalised whole vectors of the sample",
      "neighbours": f"exact cosine k-NN (scikit-learn, brute force), k={k}, within the sample",
      "duplicate_cosine": threshold,
      "byte_copies": {"groups": rows.copy_groups, "rows": rows.copy_rows, "over": "every row (sha256)",
                      "pairs_listed": len(rows.copy_pairs)},
      "errors": {"total": total_errors, "listed": len(errors)},
      "color_by": rows.color_by,
  }
  return {
      "summary": summary,
      "points": [{"uri": rows.uris[i], "x": round(float(xy[i, 0]), 5), "y": round(float(xy[i, 1]), 5),
                  "color": None if rows.colors is None else rows.colors[i]} for i in range(n)],
      "neighbours": {rows.uris[i]: as_list(i, indices, cosines) for i in range(n)},
      "slice_neighbours": {name: {rows.uris[i]: as_list(i, *found[name]) for i in queries} for name in parts},
      "duplicates": near_duplicates(rows.uris, rows.sha256, indices, cosines, threshold, rows.copy_pairs),
      "outliers": outliers(rows.uris, cosines),
      "errors": errors,
      "error_groups": error_groups,
      "probe": probe,
      "confusion": confusion,
  }


def _script_json(value) -> str:
  # "<" escaped: no "</script>" (or "<!--") inside a uri or message can end the element early.
  return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def render(data: dict, thumbs: dict) -> str:
  with open(TEMPLATE, encoding="utf-8") as f:
    template = f.read()
  return (template.replace("/*REPORT_DATA*/", _script_json(data), 1)
          .replace("/*REPORT_THUMBNAILS*/", _script_json(thumbs), 1))


def shown_uris(data: dict) -> list:
  """Every uri the page shows an image for: the map's points, the duplicates, the error examples."""
  uris = [p["uri"] for p in data["points"]]
  uris += [u for d in data["duplicates"] for u in (d["a"], d["b"])]
  uris += [e["uri"] for g in data["error_groups"] for e in g["examples"]]
  return list(dict.fromkeys(uris))


def write_page(path: str, html: str):
  with FileSystems.create(path, mime_type="text/html") as f:
    f.write(html.encode("utf-8"))


def report(output: str, html_path: Optional[str] = None, color_by: Optional[str] = None, sample: int = 5000,
           neighbours: int = 8, duplicate_cosine: float = 0.98, partial: bool = False) -> tuple:
  """Writes the page; returns (its path, its data)."""
  source = open_source(output, partial)
  rows = read_rows(source, sample, color_by)
  error_groups, errors, total_errors = read_errors(source.error_files)
  data = build_data(source, rows, neighbours, duplicate_cosine, error_groups, errors, total_errors)
  thumbs = thumbnails(shown_uris(data))
  path = html_path or FileSystems.join(source.output, "report.html")
  write_page(path, render(data, thumbs))
  return path, data


def run(argv) -> int:
  """`embed-images report ...`; the exit status (0 written, 2 bad input or the extra not installed)."""
  try:
    import sklearn  # noqa: F401
  except ImportError:
    print(f"{PROG}: error: report needs scikit-learn, which is not installed: {INSTALL_HINT}", file=sys.stderr)
    return 2
  try:
    args = parse_args(argv)
    path, data = report(args.output, args.html, args.color_by, args.sample, args.neighbours,
                        args.duplicate_cosine, args.partial)
  except ReportError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  info = data["summary"]["report"]
  sampled = "every row" if info["every_row"] else f"a uniform sample of {info['sampled']:,} of {info['rows']:,} rows"
  print(f"{PROG}: report of {info['rows']:,} rows ({sampled} on the map) -> {path}", file=sys.stderr)
  return 0
