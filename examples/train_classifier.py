"""Example: embed a labelled folder (root/<label>/<image>) and train a small classifier on the vectors.

    python examples/train_classifier.py --data photos/ --work /tmp/clf \
        --backbones mobilenet_v2 [--weights imagenet] [any embed-images option]

Labels come from the folder names (--label-from-dir); a softmax regression is trained on a
deterministic 75/25 split of each label's files (by a digest of the file's path under --data) and
its held-out accuracy printed.
"""

import argparse
import hashlib
import sys

import numpy as np

from pipeline import read_embeddings
from pipeline.main import run


def split_by_uri(uris, labels, root, test_fraction=0.25):
  """Same split on every run, machine and copy of the folder: within each label, the files whose digest
  of their path under `root` ranks lowest are held out (a quarter, at least one of two or more), not
  a random draw, and not the absolute path's, which would change with where the folder sits."""
  def key(uri):
    return hashlib.sha1((uri[len(root):] if uri.startswith(root) else uri).lstrip("/").encode()).hexdigest()

  test = np.zeros(len(uris), bool)
  for label in set(labels):
    members = sorted((i for i, each in enumerate(labels) if each == label), key=lambda i: key(uris[i]))
    held_out = max(1, round(test_fraction * len(members))) if len(members) >= 2 else 0
    test[members[:held_out]] = True
  return test


def train_softmax(x, y, classes, epochs=300, learning_rate=0.5, l2=1e-3):
  """Multinomial logistic regression by full-batch gradient descent on standardised features."""
  # Scale-free: pooled features range from ~1e-12 (untrained weights) to ~1e2.
  mean, std = x.mean(0), x.std(0)
  std = np.where(std > 0, std, 1.0)
  x = (x - mean) / std
  w = np.zeros((x.shape[1], classes), np.float64)
  b = np.zeros(classes, np.float64)
  onehot = np.eye(classes)[y]
  for _ in range(epochs):
    logits = x @ w + b
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    grad = (p - onehot) / len(x)
    w -= learning_rate * (x.T @ grad + l2 * w)
    b -= learning_rate * grad.sum(0)
  return lambda z: np.argmax(((z - mean) / std) @ w + b, axis=1)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="folder with one subfolder of images per label")
  parser.add_argument("--work", required=True, help="output directory for the embeddings")
  args, embed_args = parser.parse_known_args(argv)
  data = args.data.rstrip("/")
  status = run(["--input", f"{data}/*/*", "--output", args.work, "--label-from-dir", "--overwrite",
                *embed_args])
  if status != 0:
    return status
  emb = read_embeddings(args.work)
  labels = emb.column("label")
  names = sorted(set(labels))
  y = np.array([names.index(label) for label in labels])
  test = split_by_uri(emb.uris, labels, data)
  if test.all() or not test.any():
    print("not enough images for a train/test split", file=sys.stderr)
    return 1
  x = emb.vectors.astype(np.float64)
  predict = train_softmax(x[~test], y[~test], len(names))
  accuracy = float((predict(x[test]) == y[test]).mean())
  chance = float(np.bincount(y[test]).max() / test.sum())
  print(f"classes: {names}; train {int((~test).sum())}, test {int(test.sum())}; "
        f"accuracy {accuracy:.3f} (majority class {chance:.3f})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
